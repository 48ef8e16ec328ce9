"""Input pipelines (tf.data over TFDS tfrecords) for training and evaluation.

cfg is one entry of config.dataset: name, split, process (pp string), batch_size
(GLOBAL, over all processes), and optionally shuffle_buffer, cache, prefetch,
data_dir, process_batch (batch pp string, e.g. 'mixup(0.2)'), manual_dir and
prefetch_device (the last two are read by others, accepted here).

Determinism: the training stream is a pure function of (dataset, split, pp,
seed, process_index, process_count, batch_size). Epoch e of a process reads its
shard's files in an order drawn from (seed, e) and shuffles records with a
buffer seeded by (seed, e); the example at position p of the process's stream
is preprocessed with the seed fold_in(seed, p). So resuming at batch n starts
at epoch (n * B_local) // N_local, skips the remaining serialized records
without parsing them, and then yields exactly what an uninterrupted run would.

Nothing here ever downloads: a dataset that is not prepared in the data dir is
a ValueError saying how to prepare it ('digits' is built on first use).
"""
import math
import os
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vmoe.data import digits
from vmoe.data import pp_ops
from vmoe.data.registry import VALID_KEY

KNOWN_KEYS = frozenset({
    'name', 'split', 'process', 'batch_size', 'shuffle_buffer', 'cache',
    'prefetch', 'data_dir', 'process_batch', 'manual_dir', 'prefetch_device'})
DEFAULT_SHUFFLE_BUFFER = 10_000
_CYCLE = 16  # Files read in parallel (interleave cycle length).
_fold_in = tf.random.experimental.stateless_fold_in
# pp code branches with tf.cond / tf.switch_case, never on tensors in Python:
# autograph would only add seconds of tracing (randaug: ~10 s).
_no_autograph = tf.autograph.experimental.do_not_convert


def _get(cfg, key: str, default=None):
  value = cfg.get(key, default)
  return default if value is None else value


def _check_cfg(cfg, required=('name', 'split', 'process', 'batch_size')):
  unknown = sorted(set(cfg.keys()) - KNOWN_KEYS)
  if unknown:
    raise ValueError(f'Unknown dataset config keys {unknown}; known keys: '
                     f'{sorted(KNOWN_KEYS)}.')
  missing = [k for k in required if cfg.get(k) is None]
  if missing:
    raise ValueError(f'Dataset config {dict(cfg)} lacks keys {missing}.')


def data_dir_of(cfg) -> str:
  """cfg.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(_get(cfg, 'data_dir') or
                            os.environ.get('TFDS_DATA_DIR') or
                            '~/tensorflow_datasets')


def _builder(cfg) -> tfds.core.DatasetBuilder:
  """The prepared builder of cfg.name (never downloads; builds 'digits')."""
  name, data_dir = cfg.name, data_dir_of(cfg)
  if name.split(':')[0] == 'digits':
    return digits.prepare(data_dir)
  namespace = tfds.core.naming.parse_builder_name_kwargs(name)[0].namespace
  if namespace:  # Such builders (huggingface:, kaggle:) fetch over the network.
    raise ValueError(f'Dataset {name!r}: namespaced datasets ({namespace}:) '
                     f'are not supported; use a TFDS dataset prepared in '
                     f'data_dir={data_dir!r}.')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'Unknown dataset {name!r}: no TFDS builder has this '
                     f'name (use "digits" for the offline demo).') from None
  if not builder.is_prepared():
    msg = (f'Dataset {name!r} is not prepared in data_dir {data_dir!r} '
           f'(no {builder.data_dir}/dataset_info.json) and this program never '
           f'downloads. Prepare it on a machine with network access: '
           f'`tfds build {name} --data_dir={data_dir}`')
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      manual = _get(cfg, 'manual_dir') or f'{data_dir}/downloads/manual'
      msg += (f' --manual_dir={manual} (this dataset needs a manual download '
              f'first: put the files from {name}\'s TFDS page in {manual})')
    raise ValueError(msg + ', or set data_dir / $TFDS_DATA_DIR to where it is.')
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise ValueError(f'Dataset {name!r} in {data_dir!r} is stored as '
                     f'{builder.info.file_format.value}; only tfrecord is '
                     f'supported: rebuild it with --file_format=tfrecord.')
  return builder


def _split_info(builder, split):
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
  if not isinstance(b, (int, np.integer)) or b <= 0 or b % process_count:
    raise ValueError(f'batch_size={b!r} (global) must be a positive multiple '
                     f'of process_count={process_count}.')
  return b // process_count


def _cache_mode(cfg):
  cache = _get(cfg, 'cache', False)
  if cache not in (False, True, 'batched'):
    raise ValueError(f'cache={cache!r} must be None, False, True or "batched".')
  return bool(cache)


def _prefetch(cfg) -> int:
  return _get(cfg, 'prefetch', tf.data.AUTOTUNE)


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


def _instructions(split_info):
  fis = split_info.file_instructions
  return (tf.constant([fi.filename for fi in fis]),
          tf.constant([fi.skip for fi in fis], tf.int64),
          tf.constant([fi.take for fi in fis], tf.int64))


def _example_fn(builder, cfg, key):
  """(position, serialized) -> preprocessed example, seeded by fold_in(key, p)."""
  pp = pp_ops.get_pp_fn(cfg.process, 'example')
  features = builder.info.features
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
  _check_cfg(cfg, required=('name', 'split'))
  builder = _builder(cfg)
  label = dict(builder.info.features).get('label')
  num_classes = (label.num_classes
                 if isinstance(label, tfds.features.ClassLabel) else None)
  return _split_info(builder, cfg.split).num_examples, num_classes


def make_train_iterator(cfg, *, seed: int, start_batch: int = 0,
                        process_index: int | None = None,
                        process_count: int | None = None
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Endless shuffled batches of this process's disjoint shard of cfg.split.

  Yields dicts of numpy arrays with a leading dim B_local = batch_size /
  process_count (e.g. 'image' float32 [B_local, H, W, 3], 'labels' float32
  [B_local, C], whatever the pp string keeps). start_batch=n yields exactly
  the stream an uninterrupted iterator yields from its (n+1)-th batch on.
  cache=True keeps the shard's serialized records in memory; shuffle_buffer
  (records, default 10,000; 0 or 1: files are still shuffled, records not).
  """
  _check_cfg(cfg)
  process_index, process_count = _processes(process_index, process_count)
  b_local = _local_batch(cfg, process_count)
  if start_batch < 0:
    raise ValueError(f'start_batch={start_batch} must be >= 0.')
  seed, start_batch = int(seed), int(start_batch)
  builder = _builder(cfg)
  _split_info(builder, cfg.split)
  shard = _split_info(builder, tfds.even_splits(cfg.split, process_count)[
      process_index])
  n_local = shard.num_examples
  key = tf.constant([seed, process_index], tf.int64)
  k_files, k_records, k_examples, k_batches = (_fold_in(key, i) for i in range(4))
  example_fn = _example_fn(builder, cfg, k_examples)
  batch_pp = _get(cfg, 'process_batch') and pp_ops.get_pp_fn(
      cfg.process_batch, 'batch')
  shuffle_buffer = _get(cfg, 'shuffle_buffer', DEFAULT_SHUFFLE_BUFFER)
  filenames, skips, takes = _instructions(shard)
  cached = _read((filenames, skips, takes)).cache() if _cache_mode(cfg) else None

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
  cache=True (or 'batched') keeps the preprocessed examples in memory after
  the first pass.
  """

  def __init__(self, cfg, *, process_index: int | None = None,
               process_count: int | None = None):
    _check_cfg(cfg)
    process_index, process_count = _processes(process_index, process_count)
    self.batch_size = _local_batch(cfg, process_count)
    builder = _builder(cfg)
    self.num_examples = _split_info(builder, cfg.split).num_examples
    splits = tfds.even_splits(cfg.split, process_count)
    shards = [builder.info.splits[s].num_examples for s in splits]
    self.num_batches = math.ceil(max(shards) / self.batch_size)
    example_fn = _example_fn(builder, cfg, tf.constant([0, process_index],
                                                        tf.int64))

    def dataset(split) -> tf.data.Dataset:
      records = _read(_instructions(_split_info(builder, split)))
      ds = tf.data.Dataset.zip(tf.data.Dataset.counter(), records)
      ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
      return ds.map(_no_autograph(lambda x: {**x, VALID_KEY: tf.constant(True)}))

    self._dataset = None
    if shards[process_index]:
      self._dataset = dataset(splits[process_index])
      if _cache_mode(cfg):
        self._dataset = self._dataset.cache()
      self._dataset = self._dataset.batch(self.batch_size).prefetch(
          _prefetch(cfg))
    # Shapes of padding batches when this process has no example at all.
    self._first = lambda: next(
        dataset(cfg.split).take(1).batch(1).as_numpy_iterator())

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
