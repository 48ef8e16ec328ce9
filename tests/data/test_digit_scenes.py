"""The offline 'digit_scenes' segmentation dataset: contents, determinism, splits, masks."""
import collections
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vmoe.data import digit_scenes
from vmoe.data import digits
from vmoe.data import pipeline

DS = digit_scenes


@pytest.fixture(scope='module')
def pools():
  return {split: DS.glyph_pool(split) for split in DS.SPLITS}


@pytest.fixture(scope='module')
def test_scenes(pools):
  """The 500 scenes of the test split, regenerated."""
  return [DS.scene(DS.scene_rng('test', i), *pools['test']) for i in range(DS.SPLITS['test'])]


def stored(data_dir, split) -> collections.Counter:
  """Counter of (image bytes, mask bytes) of a stored split; checks shapes and dtypes."""
  ds = tfds.builder('digit_scenes', data_dir=data_dir).as_dataset(split)
  out = collections.Counter()
  for x in tfds.as_numpy(ds):
    assert x['image'].shape == (32, 32, 3) and x['image'].dtype == np.uint8
    assert x['segmentation_mask'].shape == (32, 32, 1)
    assert x['segmentation_mask'].dtype == np.uint8
    out[x['image'].tobytes(), x['segmentation_mask'].tobytes()] += 1
  return out


def key(s):
  return s.image.tobytes(), s.mask.tobytes()


def test_stored_splits_are_the_generated_scenes(digit_scenes_data_dir, pools, test_scenes):
  builder = tfds.builder('digit_scenes', data_dir=digit_scenes_data_dir)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 4000, 'test': 500}
  assert DS.NUM_CLASSES == 11 and DS.SIZE == 32
  assert stored(digit_scenes_data_dir, 'test') == collections.Counter(map(key, test_scenes))
  train = stored(digit_scenes_data_dir, 'train')
  assert sum(train.values()) == 4000
  for i in (0, 1, 1234, 3999):
    assert key(DS.scene(DS.scene_rng('train', i), *pools['train'])) in train


def test_deterministic_and_pinned(pools):
  a = DS.scene(DS.scene_rng('train', 0), *pools['train'])
  b = DS.scene(DS.scene_rng('train', 0), *pools['train'])
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # Pinned: the dataset must not change across numpy / scikit-learn versions.
  assert a.indices.tolist() == [1127] and a.boxes.tolist() == [[13, 5, 16]]
  assert (int(a.mask.sum()), int(a.image.sum())) == (610, 177559)
  c = DS.scene(DS.scene_rng('test', 0), *pools['test'])
  assert c.boxes.tolist() == [[5, 5, 22]] and int(c.image.sum()) == 558635
  assert not np.array_equal(a.image, DS.scene(DS.scene_rng('train', 1), *pools['train']).image)


def test_splits_draw_disjoint_digits(pools):
  sk = digits.split_indices()
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  data = load_digits()
  for split, (glyphs, labels) in pools.items():
    np.testing.assert_array_equal(glyphs, data.images[sk[split]] / 16)
    np.testing.assert_array_equal(labels, data.target[sk[split]])
  assert not set(sk['train']) & set(sk['test'])
  # A scene draws only from the pool it is given: a pool of sevens gives sevens.
  sevens = pools['test'][1] == 7
  for i in range(20):
    s = DS.scene(DS.scene_rng('test', i), pools['test'][0][sevens], pools['test'][1][sevens])
    assert set(np.unique(s.mask)) <= {0, 8} and 8 in s.mask


def redraw_mask(s, glyphs, labels):
  """The mask [32, 32] implied by a scene's digits, drawn in order."""
  mask = np.zeros((32, 32), np.uint8)
  for i, (top, left, side) in zip(s.indices, s.boxes):
    stroke = DS.upscale(glyphs[i], side) >= DS.STROKE
    mask[top:top + side, left:left + side][stroke] = 1 + labels[i]
  return mask


def test_masks_match_the_digits_drawn(pools, test_scenes):
  glyphs, labels = pools['test']
  for s in test_scenes:
    np.testing.assert_array_equal(s.mask[..., 0], redraw_mask(s, glyphs, labels))
    assert 1 <= len(s.indices) <= 3 and DS.fits([tuple(b) for b in s.boxes])
    for i, (top, left, side) in zip(s.indices, s.boxes):
      assert 14 <= side <= 24 and top + side <= 32 and left + side <= 32
      # Every digit keeps a visible stroke (later digits cover at most part of it).
      assert (s.mask[top:top + side, left:left + side] == 1 + labels[i]).sum() >= 10
    # Strokes contrast with the background.
    lum = s.image.mean(-1)
    assert abs(lum[s.mask[..., 0] > 0].mean() - lum[s.mask[..., 0] == 0].mean()) > 40


def test_counts_and_class_balance(pools, test_scenes):
  counts = collections.Counter(len(s.indices) for s in test_scenes)
  assert set(counts) == {1, 2, 3} and min(counts.values()) > 0.2 * len(test_scenes)
  labels = pools['test'][1]
  classes = collections.Counter(int(labels[i]) for s in test_scenes for i in s.indices)
  mean = sum(classes.values()) / 10
  assert set(classes) == set(range(10))
  assert all(0.7 * mean < n < 1.3 * mean for n in classes.values()), classes
  pixels = np.bincount(np.concatenate([s.mask.ravel() for s in test_scenes]), minlength=11)
  assert len(pixels) == 11 and pixels.min() > 0
  assert 0.05 < pixels[1:].sum() / pixels.sum() < 0.5  # Digits are a minority, not rare.


def test_pipeline_builds_it_on_first_use(tmp_path, monkeypatch, capfd):
  monkeypatch.setattr(DS, 'SPLITS', {'train': 6, 'test': 3})  # A tiny build.
  cfg = ml_collections.ConfigDict(dict(
      name='digit_scenes', split='test', batch_size=2, data_dir=str(tmp_path),
      process='decode|value_range(-1, 1)|seg_labels'))
  assert pipeline.get_dataset_info(cfg) == (3, None)
  # One line on the terminal; TFDS's prints and progress bars go to the log.
  out, err = capfd.readouterr()
  assert "Building the 'digit_scenes' dataset in" in out
  assert 'Generating' not in out + err and 'Downloading and preparing' not in out + err
  assert os.listdir(tmp_path) == ['digit_scenes']  # No temporary build dir left.
  batches = list(pipeline.make_eval_iterable(cfg, process_index=0, process_count=1))
  assert [b['__valid__'].tolist() for b in batches] == [[True, True], [True, False]]
  assert batches[0]['labels'].shape == (2, 32, 32) and batches[0]['labels'].dtype == np.int32
