"""cfg.cache: the same batches as no cache, kept in memory, never a partial cache."""
import glob
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from vmoe.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Random ops too: every mode must keep each example's seed (its position).
PP_EVAL = 'decode|flip_lr|value_range(0, 1)|keep("image", "label")'
PP_TRAIN = ('decode|inception_crop(8, area_min=50)|flip_lr|value_range(0, 1)|'
            'onehot(10)|keep("image", "labels")')
# No decode op: tfds decodes the images to their known [8, 8, 3].
PP_STATIC = 'value_range(0, 1)|keep("image", "label")'
PARTIAL_CACHE = 'did not fully read the dataset being cached'


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


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
  cfg = make_cfg(batch_size=40, process=PP_TRAIN, process_batch='mixup(0.5)',
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
it = pipeline.make_train_iterator(cfg(cache=True, process={PP_TRAIN!r}), seed=0,
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
