"""Fixtures of the data tests: digits configs, whole-split references, data-dir copies."""
import collections
import functools
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

PP_PLAIN = 'decode|keep("image", "label")'


@pytest.fixture(scope='session')
def make_cfg(digits_data_dir):
  """make_cfg(**overrides) -> a digits dataset ConfigDict."""

  def make(**overrides):
    cfg = dict(name='digits', split='test', process=PP_PLAIN, batch_size=40,
               data_dir=digits_data_dir, shuffle_buffer=200, prefetch=2)
    return ml_collections.ConfigDict({**cfg, **overrides})

  return make


@pytest.fixture(scope='session')
def split_examples(digits_data_dir):
  """split_examples(split) -> Counter of (image bytes, label) of that split."""

  @functools.cache
  def examples(split):
    ds = tfds.builder('digits', data_dir=digits_data_dir).as_dataset(split)
    return collections.Counter(
        (np.asarray(x['image']).tobytes(), int(x['label']))
        for x in tfds.as_numpy(ds))

  return examples


@pytest.fixture
def data_dir_copy(digits_data_dir, tmp_path) -> str:
  """A copy of the digits data dir: no builder was loaded from it yet, and a test may
  move its files."""
  data_dir = str(tmp_path / 'tfds')
  shutil.copytree(digits_data_dir, data_dir)
  return data_dir
