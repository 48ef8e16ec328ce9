"""Train iterator (determinism, resume, sharding), eval iterable (coverage), and
cfg.cache: the same batches as no cache, kept in memory, never a partial cache."""
import collections
import glob
import itertools
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vmoe.data import digits
from vmoe.data import pipeline

PP_TRAIN = ('decode|inception_crop(8, area_min=50)|flip_lr|randaug(2, 10)|'
            'value_range(-1, 1)|onehot(10, key="label", key_result="labels")|'
            'keep("image", "labels")')


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def examples(batches, valid=True):
  """Counter of (image bytes, label) of the (valid) examples of batches."""
  out = collections.Counter()
  for b in batches:
    keep = b['__valid__'] if valid and '__valid__' in b else np.ones(
        len(b['label']), bool)
    out.update((img.tobytes(), int(y))
               for img, y in zip(b['image'][keep], b['label'][keep]))
  return out


def test_get_dataset_info(make_cfg):
  assert pipeline.get_dataset_info(make_cfg(split='train')) == (1437, 10)
  assert pipeline.get_dataset_info(make_cfg(split='train[:10%]+test')) == (
      144 + 360, 10)


@pytest.mark.parametrize('batch_size, process_count', [
    (40, 1), (64, 1), (7, 1), (64, 2), (14, 2)])
def test_eval_covers_split_once(make_cfg, split_examples, batch_size,
                                process_count):
  cfg = make_cfg(batch_size=batch_size)
  iterables = [pipeline.make_eval_iterable(cfg, process_index=i,
                                           process_count=process_count)
               for i in range(process_count)]
  b_local = batch_size // process_count
  seen = collections.Counter()
  for it in iterables:
    assert it.num_examples == 360
    batches = list(it)
    assert len(batches) == it.num_batches == iterables[0].num_batches
    assert all(len(b['__valid__']) == b_local and b['image'].shape[0] == b_local
               for b in batches)
    assert batches[0]['__valid__'].dtype == bool
    seen += examples(batches)
  assert seen == split_examples('test')
  n_valid = sum(b['__valid__'].sum() for it in iterables for b in it)
  assert n_valid == 360  # Re-iterable: a second pass gives the same.


def test_eval_pads_with_empty_batches(make_cfg):
  """A process whose shard is shorter gets all-invalid batches to match."""
  # No decode op: tfds decodes the images itself.
  cfg = make_cfg(split='test[:3]', batch_size=2,
                 process='value_range(0, 1)|keep("image", "label")')
  its = [pipeline.make_eval_iterable(cfg, process_index=i, process_count=2)
         for i in range(2)]
  batches = [list(it) for it in its]
  assert [len(b) for b in batches] == [2, 2]
  assert [b['__valid__'].tolist() for b in batches[1]] == [[True], [False]]
  assert batches[1][1]['image'].shape == (1, 8, 8, 3)
  assert batches[1][1]['image'].dtype == np.float32


@pytest.fixture(scope='module')
def train_cfg(make_cfg):
  return make_cfg(split='train', process=PP_TRAIN, batch_size=16,
                  process_batch='mixup(0.5)', shuffle_buffer=100)


@pytest.fixture(scope='module')
def stream(train_cfg):
  """The first 5 batches of the uninterrupted seed-7 stream."""
  it = pipeline.make_train_iterator(train_cfg, seed=7, process_index=0,
                                    process_count=1)
  return take(it, 5)


def test_train_batches(stream):
  b = stream[0]
  assert sorted(b) == ['image', 'labels']
  assert b['image'].shape == (16, 8, 8, 3) and b['image'].dtype == np.float32
  assert b['labels'].shape == (16, 10) and b['labels'].dtype == np.float32
  assert -1 <= b['image'].min() and b['image'].max() <= 1
  np.testing.assert_allclose(b['labels'].sum(-1), 1, rtol=1e-5)  # Mixup keeps it.


def test_train_resumes(train_cfg, stream):
  """start_batch=2 continues the seed-7 stream, augmentation included."""
  resumed = pipeline.make_train_iterator(train_cfg, seed=7, start_batch=2,
                                         process_index=0, process_count=1)
  assert_batches_equal(take(resumed, 3), stream[2:5])


def test_train_is_deterministic_and_seeds_differ(make_cfg):
  cfg = make_cfg(split='train', batch_size=16, process_batch='mixup(0.5)',
                 process='decode_jpeg_and_inception_crop(8)|flip_lr|'
                 'value_range(0, 1)|onehot(10)|keep("image", "labels")')
  first = lambda seed: next(pipeline.make_train_iterator(
      cfg, seed=seed, process_index=0, process_count=1))
  a, b, c = first(7), first(7), first(8)
  assert_batches_equal([a], [b])
  assert not np.array_equal(a['image'], c['image'])
  assert not np.array_equal(a['labels'], c['labels'])


@pytest.fixture(scope='module')
def sharded_data_dir(tmp_path_factory):
  """digits written as 3 files per split, to cover the per-epoch file order."""
  data_dir = str(tmp_path_factory.mktemp('sharded'))
  digits.Digits(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=3,
                                                   try_download_gcs=False))
  return data_dir


@pytest.mark.parametrize('process_index, cache, sharded', [
    (0, False, False), (1, True, False), (1, False, True)])
def test_train_epochs_and_process_shards(make_cfg, split_examples, request,
                                         process_index, cache, sharded):
  """Each process reads only its own shard, each epoch once, and resumes."""
  cfg = make_cfg(split='test', batch_size=40, shuffle_buffer=50, cache=cache)
  if sharded:
    cfg.data_dir = request.getfixturevalue('sharded_data_dir')
    assert len(tfds.builder('digits', data_dir=cfg.data_dir).info.splits[
        'test'].file_instructions) == 3
  shard = split_examples(['test[:180]', 'test[180:]'][process_index])
  it = pipeline.make_train_iterator(cfg, seed=0, process_index=process_index,
                                    process_count=2)
  batches = take(it, 18)  # 18 x 20 examples = 2 epochs of the 180.
  assert examples(batches[:9]) == shard and examples(batches[9:]) == shard
  order = [b['image'].tobytes() for b in batches]
  assert order[:9] != order[9:]  # Each epoch is shuffled anew.
  resumed = pipeline.make_train_iterator(
      cfg, seed=0, start_batch=11, process_index=process_index, process_count=2)
  assert_batches_equal(take(resumed, 3), batches[11:14])


@pytest.mark.parametrize('overrides, match', [
    (dict(split='validation'), r"'validation'.*\['train', 'test'\]"),
    (dict(batch_size=15), 'batch_size=15.*process_count=2'),
    (dict(process='decode|nope'), 'Unknown pp op'),
    (dict(shuffle_bufer=3), 'shuffle_bufer'),
    (dict(cache='disk'), 'cache'),
    (dict(name='no_such_dataset'), 'no_such_dataset'),
])
def test_bad_configs(make_cfg, overrides, match):
  cfg = make_cfg(**overrides)
  with pytest.raises(ValueError, match=match):
    pipeline.make_eval_iterable(cfg, process_index=0, process_count=2)
  with pytest.raises(ValueError, match=match):
    pipeline.make_train_iterator(cfg, seed=0, process_index=0, process_count=2)


@pytest.mark.parametrize('name', ['cifar10', 'imagenet2012'])
def test_missing_real_dataset_fails_fast(make_cfg, tmp_path, name, monkeypatch):
  cfg = make_cfg(name=name, data_dir=str(tmp_path))

  def no_network(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')

  # A download attempt would resolve and connect (and, offline, retry for minutes).
  monkeypatch.setattr(socket, 'getaddrinfo', no_network)
  monkeypatch.setattr(socket.socket, 'connect', no_network)
  with pytest.raises(ValueError, match=f'tfds build {name} --data_dir={tmp_path}'
                     ) as e:
    pipeline.get_dataset_info(cfg)
  with pytest.raises(ValueError, match='never downloads'):
    pipeline.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  assert ('manual_dir' in str(e.value)) == (name == 'imagenet2012')
  assert list(tmp_path.iterdir()) == []  # Nothing written.


# ---------------------------------------------------------------------------- cache
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Random ops too: every mode must keep each example's seed (its position).
PP_EVAL = 'decode|flip_lr|value_range(0, 1)|keep("image", "label")'
PP_TRAIN_CACHE = ('decode|inception_crop(8, area_min=50)|flip_lr|value_range(0, 1)|'
            'onehot(10)|keep("image", "labels")')
# No decode op: tfds decodes the images to their known [8, 8, 3].
PP_STATIC = 'value_range(0, 1)|keep("image", "label")'
PARTIAL_CACHE = 'did not fully read the dataset being cached'


def hide_records(data_dir):
  """Renames the split files away: only what is in memory can still be read."""
  files = glob.glob(os.path.join(data_dir, 'digits', '*', '*.tfrecord*'))
  assert files
  for f in files:
    os.rename(f, f + '.hidden')


def eval_passes(cfg, process_count=2):
  """Two passes of each process's iterable."""
  its = [pipeline.make_eval_iterable(cfg, process_index=i, process_count=process_count)
         for i in range(process_count)]
  return [list(it) + list(it) for it in its]


@pytest.fixture(scope='module')
def eval_cfg(make_cfg):
  # 180 examples per process in batches of 7: the 26th is padded.
  return lambda **kw: make_cfg(batch_size=14, process=PP_EVAL, **kw)


@pytest.fixture(scope='module')
def uncached_eval(eval_cfg):
  return eval_passes(eval_cfg())


@pytest.mark.parametrize('cache', [False, True, 'loaded', 'batched'])
def test_eval_batches_are_those_without_cache(eval_cfg, uncached_eval, cache):
  got = eval_passes(eval_cfg(cache=cache))
  assert [len(b) for b in got] == [52, 52]
  assert got[0][25]['__valid__'].tolist() == [True] * 5 + [False] * 2
  for g, e in zip(got, uncached_eval):
    assert_batches_equal(g, e)


@pytest.mark.parametrize('cache', [None, True, 'loaded', 'batched'])
def test_eval_cache_keeps_the_split_in_memory(make_cfg, data_dir_copy, cache):
  it = pipeline.make_eval_iterable(make_cfg(data_dir=data_dir_copy, cache=cache),
                                   process_index=0, process_count=1)
  first = list(it)
  hide_records(data_dir_copy)
  if cache is None:  # The control: without a cache, the second pass reads the files.
    with pytest.raises(tf.errors.NotFoundError):
      list(it)
  else:
    assert_batches_equal(list(it), first)


def train_stream(make_cfg, cache=None, start_batch=0):
  """Process 1 of 2 reads test[180:]: 9 batches of 20 per epoch."""
  cfg = make_cfg(batch_size=40, process=PP_TRAIN_CACHE, process_batch='mixup(0.5)',
                 shuffle_buffer=50, cache=cache)
  return pipeline.make_train_iterator(cfg, seed=3, start_batch=start_batch,
                                      process_index=1, process_count=2)


@pytest.fixture(scope='module')
def uncached_train(make_cfg):
  return take(train_stream(make_cfg), 12)  # Into the 2nd epoch.


@pytest.mark.parametrize('cache', [False, True, 'loaded'])
def test_train_batches_are_those_without_cache(make_cfg, uncached_train, cache):
  assert_batches_equal(take(train_stream(make_cfg, cache), 12), uncached_train)
  assert_batches_equal(take(train_stream(make_cfg, cache, start_batch=10), 2),
                       uncached_train[10:])


@pytest.mark.parametrize('cache', [None, True, 'loaded'])
def test_train_cache_is_read_when_the_iterator_is_made(make_cfg, data_dir_copy, cache):
  it = pipeline.make_train_iterator(
      make_cfg(split='train', data_dir=data_dir_copy, cache=cache, batch_size=479),
      seed=0, process_index=0, process_count=1)
  hide_records(data_dir_copy)
  if cache is None:  # The control: without a cache, the first batch reads the files.
    with pytest.raises(tf.errors.NotFoundError):
      next(it)
  else:
    assert len(take(it, 7)) == 7  # 3 batches per epoch: into the 3rd epoch.


@pytest.mark.parametrize('process, static', [(PP_STATIC, True), (PP_EVAL, False)])
@pytest.mark.parametrize('cache', [None, 'loaded', 'batched'])
@pytest.mark.parametrize('split', ['test', 'test[:1]'])
def test_shapes_are_those_of_the_batches(make_cfg, data_dir_copy, process, static, cache,
                                         split):
  """shapes() == the batches' shapes, also for a process without any example."""
  cfg = make_cfg(data_dir=data_dir_copy, split=split, batch_size=14, process=process,
                 cache=cache)
  # Process 1 of 2: 180 examples of 'test', none of 'test[:1]'.
  it = pipeline.make_eval_iterable(cfg, process_index=1, process_count=2)
  batches = list(it)
  expected = {k: v.shape for k, v in batches[0].items()}
  assert expected == {'image': (7, 8, 8, 3), 'label': (7,), '__valid__': (7,)}
  assert all({k: v.shape for k, v in b.items()} == expected for b in batches)
  if static and split == 'test':  # From the element_spec: reads no record.
    hide_records(data_dir_copy)
  assert it.shapes() == expected


def test_shapes_and_passes_leave_no_partial_cache(digits_data_dir):
  """TF logs (C++, on stderr) when a pass over a cache stops early and loses it."""
  script = f"""
import sys
import ml_collections
from vmoe.data import pipeline

def cfg(**kw):
  return ml_collections.ConfigDict(dict(
      name='digits', split='test', batch_size=40, data_dir={digits_data_dir!r}, **kw))

# shapes() from one uncached example (decode: unknown image shape) or the spec.
for cache, process in ((True, {PP_EVAL!r}), ('loaded', {PP_EVAL!r}),
                       ('batched', {PP_STATIC!r}), ('loaded', {PP_STATIC!r})):
  it = pipeline.make_eval_iterable(cfg(cache=cache, process=process),
                                   process_index=0, process_count=1)
  it.shapes()
  list(it), list(it)
  del it
# A train iterator dropped within its first epoch.
it = pipeline.make_train_iterator(cfg(cache=True, process={PP_TRAIN_CACHE!r}), seed=0,
                                  process_index=0, process_count=1)
next(it)
del it
print('CONTROL', file=sys.stderr, flush=True)
# What the trainer did to read the shapes: one batch of the cached pass.
next(iter(pipeline.make_eval_iterable(cfg(cache=True, process={PP_EVAL!r}),
                                      process_index=0, process_count=1)))
print('END', file=sys.stderr, flush=True)
"""
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '0'}
  run = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr
  checked, control = run.stderr.split('CONTROL')
  assert PARTIAL_CACHE not in checked, checked
  assert PARTIAL_CACHE in control.split('END')[0], control
