"""Input pipelines (tf.data over TFDS tfrecords) for training and evaluation.

cfg is one entry of config.dataset: name, split, process (pp string), batch_size
(GLOBAL, over all processes), and optionally shuffle_buffer, cache, prefetch,
data_dir, process_batch (batch pp string, e.g. 'mixup(0.2)'), manual_dir (named
in the message of a dataset that needs a manual download) and prefetch_device
(train batches the trainer puts on the devices ahead of the step; read by the
trainer). check_config checks an entry without reading any data.

Determinism: the training stream is a pure function of (dataset, split, pp,
seed, process_index, process_count, batch_size). Epoch e of a process reads its
shard's files in an order drawn from (seed, e) and shuffles records with a
buffer seeded by (seed, e); the example at position p of the process's stream
is preprocessed with the seed fold_in(seed, p). So resuming at batch n starts
at epoch (n * B_local) // N_local, skips the remaining serialized records
without parsing them, and then yields exactly what an uninterrupted run would.
A cached training shard keeps its files in one fixed order (its records are
still shuffled anew each epoch), so for a shard stored in several files the
stream also depends on whether it is cached.

cache, as the reference (google-research/vmoe, input_pipeline.py) defines it:

  cache          training split               eval splits
  None, False    nothing is cached            nothing is cached
  'loaded'       the serialized records       the serialized records
  'batched'      rejected                     the preprocessed batches
  True           = 'loaded'                   = 'batched'

'loaded' keeps the records as read from the files, before decoding and
preprocessing: the random augmentation of training is drawn anew each epoch.
A training shard is read into memory when its iterator is made (an iterator
dropped within its first epoch would otherwise discard a partial cache); an
eval split during its first pass. 'batched' keeps the eval batches (before
their padding) after the first pass, so later passes neither read nor
preprocess; a training split repeats without end, and 'batched' would freeze
its augmentation. Every mode yields the same batches, in the same order, as no
cache.

Nothing here ever downloads: a dataset that is not prepared in the data dir is
a ValueError saying how to prepare it. The local datasets of LOCAL_BUILDERS
('digits', 'digit_scenes') are generated on first use instead; those of
MANUAL_BUILDERS ('ade20k') are this package's builders too, but prepared from a
manual download by their own command, never on first use. Each dataset's
builder (and so its info) is loaded once per process.

Segmentation datasets (digit_scenes, ade20k, scene_parse150, oxford_iiit_pet,
cityscapes) go through the same pipeline with the joint image / mask ops of
seg_ops.py in their pp string; see there for each dataset's pp strings.
"""
import functools
import math
import os
import threading
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vmoe.data import ade20k
from vmoe.data import digit_scenes
from vmoe.data import digits
from vmoe.data import pp_ops
from vmoe.data.registry import VALID_KEY
from vmoe.utils import checks

KNOWN_KEYS = frozenset({
    'name', 'split', 'process', 'batch_size', 'shuffle_buffer', 'cache',
    'prefetch', 'data_dir', 'process_batch', 'manual_dir', 'prefetch_device'})
CACHE_VALUES = (None, False, True, 'loaded', 'batched')
_REQUIRED_KEYS = ('name', 'split', 'process', 'batch_size')
_STRING_KEYS = ('name', 'split', 'process', 'process_batch', 'data_dir',
                'manual_dir')
DEFAULT_SHUFFLE_BUFFER = 10_000
_CYCLE = 16  # Files read in parallel (interleave cycle length).
_fold_in = tf.random.experimental.stateless_fold_in
# pp code branches with tf.cond / tf.switch_case, never on tensors in Python:
# autograph would only add seconds of tracing (randaug: ~10 s).
_no_autograph = tf.autograph.experimental.do_not_convert
# (name, data dir) -> its prepared builder. Loading one reads the dataset info
# (TFDS logs 'Load dataset info from ...'); the lock makes concurrent callers
# load it (and build a local dataset) once.
_BUILDERS: dict[tuple[str, str], tfds.core.DatasetBuilder] = {}
_BUILDERS_LOCK = threading.Lock()
# Datasets generated on this machine from bundled data: name -> its module, whose
# prepare(data_dir) builds it there unless it is, and returns its builder.
LOCAL_BUILDERS = {'digits': digits, 'digit_scenes': digit_scenes}
# Datasets of this package read from a manual download, too large to build on
# first use: name -> its module (importing it registers the builder), prepared
# by `python -m MODULE --data_dir=DIR --manual_dir=DIR` with its MANUAL_FILES
# in the manual dir.
MANUAL_BUILDERS = {'ade20k': ade20k}


def _get(cfg, key: str, default=None):
  value = cfg.get(key, default)
  return default if value is None else value


def check_config(cfg: Any, where: str, *, train: bool):
  """Raises a ValueError naming the first bad key or value of a dataset entry.

  Needs neither the data nor its metadata (builder and split_info check those),
  nor the devices: the caller checks that batch_size divides over its devices.

  Args:
    cfg: one entry of config.dataset (a dict or a ConfigDict).
    where: its dotted name in the messages, e.g. 'config.dataset.train'.
    train: whether make_train_iterator reads it (else make_eval_iterable):
      cache='batched' is for eval splits only.
  """
  if hasattr(cfg, 'to_dict'):  # A ConfigDict (not a Mapping).
    cfg = cfg.to_dict()
  if not isinstance(cfg, Mapping):
    raise ValueError(f'{where} must be a sub-config with keys '
                     f'{sorted(KNOWN_KEYS)}, got {cfg!r}.')
  checks.check_keys(cfg, KNOWN_KEYS, where)
  missing = [k for k in _REQUIRED_KEYS if cfg.get(k) is None]
  if missing:
    raise ValueError(f'{where} lacks {missing}; valid keys: '
                     f'{sorted(KNOWN_KEYS)}.')
  for key in _STRING_KEYS:
    if cfg.get(key) is not None and not isinstance(cfg[key], str):
      raise ValueError(f'{where}.{key}={cfg[key]!r} must be a string.')
  for key, kind in (('process', 'example'), ('process_batch', 'batch')):
    if cfg.get(key):
      try:
        pp_ops.get_pp_fn(cfg[key], kind)
      except ValueError as e:
        raise ValueError(f'{where}.{key}: {e}') from None
  checks.positive_int(cfg['batch_size'], f'{where}.batch_size')
  cache = cfg.get('cache')
  # Not `in CACHE_VALUES`: 1 == True would pass.
  if not (cache is None or isinstance(cache, bool)
          or cache in ('loaded', 'batched')):
    raise ValueError(f'{where}.cache={cache!r} must be one of '
                     f'{CACHE_VALUES}.')
  if train and cache == 'batched':
    raise ValueError(
        f"{where}.cache='batched' keeps preprocessed batches, for eval splits "
        f'only: a training split repeats without end and its random '
        f"augmentation would be frozen; use cache='loaded' (or True) to keep "
        f'its records in memory.')
  buffer = cfg.get('shuffle_buffer')
  if buffer is not None and not (checks.is_int(buffer) and buffer >= 0):
    raise ValueError(f'{where}.shuffle_buffer={buffer!r} must be an integer '
                     f'>= 0 (examples), or None for the default.')
  prefetch = cfg.get('prefetch')
  if prefetch not in (None, 'autotune') and not (checks.is_int(prefetch) and prefetch >= -1):
    raise ValueError(f'{where}.prefetch={prefetch!r} must be an integer >= 0 '
                     f"(batches), or None / -1 / 'autotune' to autotune.")
  ahead = cfg.get('prefetch_device')
  if ahead is not None and not (checks.is_int(ahead) and ahead >= 0):
    raise ValueError(f'{where}.prefetch_device={ahead!r} must be an integer '
                     f'>= 0 (train batches put on the devices ahead of the '
                     f'step), or None.')


def data_dir_of(cfg) -> str:
  """cfg.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(_get(cfg, 'data_dir') or
                            os.environ.get('TFDS_DATA_DIR') or
                            '~/tensorflow_datasets')


def builder(cfg) -> tfds.core.DatasetBuilder:
  """The prepared builder of cfg.name in data_dir_of(cfg).

  Never downloads; builds the LOCAL_BUILDERS datasets (never the
  MANUAL_BUILDERS ones). Loaded once per (name, data dir) for the process's
  lifetime, and the same object is returned after that; a failure is not
  remembered, so a dataset prepared later is found by the next call.
  """
  key = (cfg.name, data_dir_of(cfg))
  with _BUILDERS_LOCK:
    if key not in _BUILDERS:
      _BUILDERS[key] = _load_builder(cfg, *key)
    return _BUILDERS[key]


def _load_builder(cfg, name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  local = LOCAL_BUILDERS.get(name.split(':')[0])
  if local:
    return local.prepare(data_dir)
  namespace = tfds.core.naming.parse_builder_name_kwargs(name)[0].namespace
  if namespace:  # Such builders (huggingface:, kaggle:) fetch over the network.
    raise ValueError(f'Dataset {name!r}: namespaced datasets ({namespace}:) '
                     f'are not supported; use a TFDS dataset prepared in '
                     f'data_dir={data_dir!r}.')
  try:
    b = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'Unknown dataset {name!r}: no TFDS builder has this '
                     f'name (the offline demos: {sorted(LOCAL_BUILDERS)}).'
                     ) from None
  if not b.is_prepared():
    raise ValueError(_not_prepared(cfg, name, data_dir, b))
  if b.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise ValueError(f'Dataset {name!r} in {data_dir!r} is stored as '
                     f'{b.info.file_format.value}; only tfrecord is '
                     f'supported: rebuild it with --file_format=tfrecord.')
  return b


def _not_prepared(cfg, name: str, data_dir: str, b) -> str:
  """The error of an unprepared dataset: the command that prepares it."""
  manual_builder = MANUAL_BUILDERS.get(name.split(':')[0])
  if manual_builder:  # Reads local files only: no network needed.
    where, command = '', f'python -m {manual_builder.__name__}'
    files = manual_builder.MANUAL_FILES
  else:
    where, command = ' on a machine with network access', f'tfds build {name}'
    files = f"the files from {name}'s TFDS page"
  command += f' --data_dir={data_dir}'
  needs = ''
  if b.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual = _get(cfg, 'manual_dir') or f'{data_dir}/downloads/manual'
    command += f' --manual_dir={manual}'
    needs = (f' (this dataset needs a manual download first: put {files} in '
             f'{manual})')
  return (f'Dataset {name!r} is not prepared in data_dir {data_dir!r} (no '
          f'{b.data_dir}/dataset_info.json) and this program never downloads. '
          f'Prepare it{where}: `{command}`{needs}, or set data_dir / '
          f'$TFDS_DATA_DIR to where it is.')


def split_info(builder, split):  # pylint: disable=redefined-outer-name
  """The SplitInfo (or SubSplitInfo) of `split`, e.g. 'train[:90%]'.

  Raises a ValueError listing the dataset's splits if `split` is not one of
  them or selects no example.
  """
  try:
    info = builder.info.splits[split]
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(f'Bad split {str(split)!r} for dataset {builder.name!r} '
                     f'({e}). Its splits: {list(builder.info.splits)}.'
                     ) from None
  if info.num_examples <= 0:
    raise ValueError(f'Split {str(split)!r} of {builder.name!r} selects no '
                     f'examples. Its splits: {dict(builder.info.splits)}.')
  return info


def _processes(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # Only for defaults.
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in '
                     f'[0, process_count={process_count}).')
  return process_index, process_count


def _local_batch(cfg, process_count: int) -> int:
  b = cfg.batch_size
  if b % process_count:
    raise ValueError(f'batch_size={b!r} (global) must be a positive multiple '
                     f'of process_count={process_count}.')
  return b // process_count


def _cache_mode(cfg, *, train: bool) -> str | None:
  """'loaded', 'batched' or None (nothing cached); see the module docstring."""
  cache = _get(cfg, 'cache')
  if cache is True:
    return 'loaded' if train else 'batched'
  return cache or None


def _prefetch(cfg) -> int:
  """cfg.prefetch; None, -1 and 'autotune' (the reference's spelling) autotune."""
  prefetch = _get(cfg, 'prefetch', tf.data.AUTOTUNE)
  return tf.data.AUTOTUNE if prefetch == 'autotune' else prefetch


def _read(instructions) -> tf.data.Dataset:
  """Serialized records of the file instructions, in a deterministic order.

  instructions: (filenames [F], skips [F], takes [F]) tensors.
  """
  files = tf.data.Dataset.from_tensor_slices(instructions)
  return files.interleave(
      _no_autograph(lambda f, skip, take:
                    tf.data.TFRecordDataset(f).skip(skip).take(take)),
      cycle_length=_CYCLE, num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True)


def _instructions(info):
  fis = info.file_instructions
  return (tf.constant([fi.filename for fi in fis]),
          tf.constant([fi.skip for fi in fis], tf.int64),
          tf.constant([fi.take for fi in fis], tf.int64))


def _example_fn(ds_builder, cfg, key):
  """(position, serialized) -> preprocessed example, seeded by fold_in(key, p)."""
  pp = pp_ops.get_pp_fn(cfg.process, 'example')
  features = ds_builder.info.features
  decoders = {k: tfds.decode.SkipDecoding() for k in pp.decode_keys
              if isinstance(dict(features).get(k), tfds.features.Image)}

  @_no_autograph
  def fn(position, record):
    data = features.deserialize_example(record, decoders=decoders)
    return pp(dict(data), _fold_in(key, position))

  return fn


def get_dataset_info(cfg) -> tuple[int, int | None]:
  """(number of examples of cfg.split over all processes, number of classes).

  Reads only metadata (cfg needs only name and split). num_classes is that of
  the 'label' ClassLabel feature (None if the dataset has none).
  """
  checks.check_keys(cfg, KNOWN_KEYS, 'cfg')
  for key in ('name', 'split'):
    checks.required(cfg, key, 'cfg')
  ds_builder = builder(cfg)
  label = dict(ds_builder.info.features).get('label')
  num_classes = (label.num_classes
                 if isinstance(label, tfds.features.ClassLabel) else None)
  return split_info(ds_builder, cfg.split).num_examples, num_classes


def make_train_iterator(cfg, *, seed: int, start_batch: int = 0,
                        process_index: int | None = None,
                        process_count: int | None = None
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Endless shuffled batches of this process's disjoint shard of cfg.split.

  Yields dicts of numpy arrays with a leading dim B_local = batch_size /
  process_count (e.g. 'image' float32 [B_local, H, W, 3], 'labels' float32
  [B_local, C], whatever the pp string keeps). start_batch=n yields exactly
  the stream an uninterrupted iterator yields from its (n+1)-th batch on.
  cache=True or 'loaded' reads the shard's serialized records into memory
  here; shuffle_buffer (records, default 10,000; 0 or 1: files are still
  shuffled, records not).
  """
  check_config(cfg, 'cfg', train=True)
  process_index, process_count = _processes(process_index, process_count)
  b_local = _local_batch(cfg, process_count)
  if start_batch < 0:
    raise ValueError(f'start_batch={start_batch} must be >= 0.')
  seed, start_batch = int(seed), int(start_batch)
  ds_builder = builder(cfg)
  split_info(ds_builder, cfg.split)
  shard = split_info(ds_builder, tfds.even_splits(cfg.split, process_count)[
      process_index])
  n_local = shard.num_examples
  key = tf.constant([seed, process_index], tf.int64)
  k_files, k_records, k_examples, k_batches = (_fold_in(key, i) for i in range(4))
  example_fn = _example_fn(ds_builder, cfg, k_examples)
  batch_pp = _get(cfg, 'process_batch') and pp_ops.get_pp_fn(
      cfg.process_batch, 'batch')
  shuffle_buffer = _get(cfg, 'shuffle_buffer', DEFAULT_SHUFFLE_BUFFER)
  filenames, skips, takes = _instructions(shard)
  cached = None
  if _cache_mode(cfg, train=True) == 'loaded':
    cached = _read((filenames, skips, takes)).cache()
    # Filled now, not by the first epoch: an iterator dropped before that epoch
    # ends (a run shorter than an epoch, an iterator the trainer makes anew)
    # would discard a partial cache, and TF would log a warning for it.
    cached.reduce(np.int64(0), _no_autograph(lambda n, _: n))

  @_no_autograph
  def epoch(e):
    if cached is not None:
      records = cached
    else:
      order = tf.random.experimental.stateless_shuffle(
          tf.range(tf.size(filenames)), _fold_in(k_files, e))
      records = _read(tuple(tf.gather(x, order)
                            for x in (filenames, skips, takes)))
    if shuffle_buffer > 1:
      records = records.shuffle(shuffle_buffer, seed=tf.random.stateless_uniform(
          [], _fold_in(k_records, e), minval=None, maxval=None, dtype=tf.int64))
    return records

  start = start_batch * b_local
  records = tf.data.Dataset.counter(start // n_local).flat_map(epoch)
  records = records.skip(start % n_local)
  ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start), records)
  ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(b_local, drop_remainder=True)
  if batch_pp:
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start_batch), ds)
    ds = ds.map(_no_autograph(lambda i, x: batch_pp(x, _fold_in(k_batches, i))),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(_prefetch(cfg)).as_numpy_iterator()


class EvalIterable:
  """Every example of cfg.split exactly once across processes, per pass.

  Each pass yields num_batches batches (the same on every process) of exactly
  B_local = batch_size / process_count examples, as dicts of numpy arrays plus
  '__valid__' bool [B_local]: False marks the padding of the last batches.
  cache='loaded' keeps the serialized records, cache='batched' (or True) the
  preprocessed batches in memory after the first pass, which must run to its
  end to fill the cache; shapes() reads neither.
  """

  def __init__(self, cfg, *, process_index: int | None = None,
               process_count: int | None = None):
    check_config(cfg, 'cfg', train=False)
    process_index, process_count = _processes(process_index, process_count)
    self.batch_size = _local_batch(cfg, process_count)
    ds_builder = builder(cfg)
    self.num_examples = split_info(ds_builder, cfg.split).num_examples
    splits = tfds.even_splits(cfg.split, process_count)
    shards = [ds_builder.info.splits[s].num_examples for s in splits]
    self.num_batches = math.ceil(max(shards) / self.batch_size)
    example_fn = _example_fn(ds_builder, cfg, tf.constant([0, process_index],
                                                           tf.int64))

    def examples(split, *, cache_records: bool = False) -> tf.data.Dataset:
      """The preprocessed examples of `split`, '__valid__' True, in file order."""
      records = _read(_instructions(split_info(ds_builder, split)))
      if cache_records:
        records = records.cache()
      ds = tf.data.Dataset.zip(tf.data.Dataset.counter(), records)
      ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
      return ds.map(_no_autograph(lambda x: {**x, VALID_KEY: tf.constant(True)}))

    mode = _cache_mode(cfg, train=False)
    self._dataset = None
    if shards[process_index]:
      ds = examples(splits[process_index], cache_records=mode == 'loaded')
      ds = ds.batch(self.batch_size)
      if mode == 'batched':
        ds = ds.cache()
      self._dataset = ds.prefetch(_prefetch(cfg))
    # One example of cfg.split as a batch of 1, read without any cache: the
    # template of the padding batches of a process that has no example, and the
    # shapes of shapes() when the element_spec leaves some dims unknown.
    self._first = functools.cache(lambda: next(
        examples(cfg.split).take(1).batch(1).as_numpy_iterator()))

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """{key: shape} of every batch, e.g. {'image': (B_local, H, W, 3), ...}.

    '__valid__' included. From the pipeline's element_spec where it is fully
    defined, else from one example read without the cache: a pass over a cache
    that stops early (to see one batch) would discard what it cached, and TF
    would log so.
    """
    spec = self._dataset.element_spec if self._dataset is not None else {}
    if spec and all(s.shape[1:].is_fully_defined() for s in spec.values()):
      return {k: (self.batch_size, *s.shape[1:].as_list())
              for k, s in spec.items()}
    return {k: (self.batch_size, *v.shape[1:]) for k, v in self._first().items()}

  def __iter__(self) -> Iterator[dict[str, Any]]:
    count, last = 0, None
    for last in (self._dataset.as_numpy_iterator() if self._dataset else ()):
      count += 1
      yield _pad(last, self.batch_size)
    if count < self.num_batches:
      template = last if last is not None else self._first()
      empty = {k: np.zeros((self.batch_size,) + v.shape[1:], v.dtype)
               for k, v in template.items()}
      for _ in range(self.num_batches - count):
        yield dict(empty)


def _pad(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads a short last batch with zeros ('__valid__' False) to `size`."""
  n = len(batch[VALID_KEY])
  if n == size:
    return batch
  return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def make_eval_iterable(cfg, *, process_index: int | None = None,
                       process_count: int | None = None) -> EvalIterable:
  """See EvalIterable: re-iterable, padded, '__valid__'-marked eval batches."""
  return EvalIterable(cfg, process_index=process_index,
                      process_count=process_count)
