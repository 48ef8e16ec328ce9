"""The real TFDS segmentation datasets (oxford_iiit_pet, scene_parse150, cityscapes)
through the pipeline with the pp strings of seg_ops' docstring, on tiny fake builds:
the datasets' own TFDS builders (feature names, dtypes, shapes, versions) with a few
generated examples instead of the downloads."""
from unittest import mock

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vmoe.data import pipeline

RNG = np.random.RandomState(0)
KEEP = '|value_range(-1, 1)|seg_labels|keep("image", "labels")'
PET = 'decode|seg_remap("oxford_iiit_pet")|'
ADE = 'decode|mask_channel(0, key="annotation", key_result="segmentation_mask")|'
CITY = ('decode(key="image_left", key_result="image")|seg_remap("cityscapes", '
        'key="segmentation_label", key_result="segmentation_mask")|')
# name: (train split, eval split, train pp, eval pp, (H, W) of both, label values allowed).
CASES = {
    'oxford_iiit_pet': (
        'train', 'test',
        PET + 'seg_resize(256)|seg_random_scale_crop(224, 0.5, 2.0)|seg_flip_lr' + KEEP,
        PET + 'seg_resize(224)' + KEEP, (224, 224), {0, 1, 255}),
    'scene_parse150': (
        'train', 'test',
        ADE + 'seg_resize(512)|seg_random_scale_crop(512, 0.5, 2.0)|seg_flip_lr' + KEEP,
        ADE + 'seg_resize(512)' + KEEP, (512, 512), {0, 4, 100, 255}),
    'cityscapes': (
        'train', 'validation',
        CITY + 'seg_random_scale_crop((512, 1024), 0.25, 1.0)|seg_flip_lr' + KEEP,
        CITY + 'seg_resize(512, 1024)' + KEEP, (512, 1024), {0, 13, 18, 255}),
}


def blocks(h, w, values, channels=1):
  """uint8 [h, w, channels]: random values in 8 x 8 blocks."""
  grid = RNG.choice(values, size=(-(-h // 8), -(-w // 8), channels))
  return np.kron(grid, np.ones((8, 8, 1), int))[:h, :w].astype(np.uint8)


def image(h, w):
  return RNG.randint(0, 256, size=(h, w, 3)).astype(np.uint8)


def pet(i):
  h, w = 40 + 8 * i, 56 - 8 * i
  return {'image': image(h, w), 'segmentation_mask': blocks(h, w, [1, 2, 3]),
          'label': i, 'species': i % 2, 'file_name': f'pet_{i}.jpg',
          'head_bbox': tfds.features.BBox(0.1, 0.2, 0.5, 0.6)}


def scene_parse(i):
  h, w = 48, 40 + 8 * i
  # R: object class (0: none), G: instance id (must not leak into the labels).
  annotation = np.concatenate([blocks(h, w, [0, 4, 100]), blocks(h, w, [1, 2, 200])], -1)
  return {'image': image(h, w), 'annotation': np.pad(annotation, [(0, 0), (0, 0), (0, 1)])}


def cityscapes(i):
  # Label ids 0 (unlabeled), 26 (car), 33 (bicycle): train ids 255, 13, 18; road (7) rare.
  label = np.zeros((1024, 2048, 1), np.uint8)
  label[:512] = 26
  label[512:, :1024] = 33
  label[600 + i:700, 100:200] = 7
  return {'image_id': f'city_{i}', 'image_left': np.full((1024, 2048, 3), 60 + i, np.uint8),
          'segmentation_label': label}


MAKERS = {'oxford_iiit_pet': pet, 'scene_parse150': scene_parse, 'cityscapes': cityscapes}


def fake_build(name, data_dir, num_examples=3):
  """Builds `name`'s TFDS builder in data_dir from MAKERS[name], nothing downloaded."""
  builder = tfds.builder(name, data_dir=data_dir)
  splits = CASES[name][:2]

  def split_generators(self, dl_manager):
    del self, dl_manager
    return {s: ((i, MAKERS[name](i)) for i in range(num_examples)) for s in splits}

  with mock.patch.object(type(builder), '_split_generators', split_generators):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds_seg'))
  for name in MAKERS:
    fake_build(name, path)
  return path


def cfg(name, data_dir, split, process, batch_size=2):
  return ml_collections.ConfigDict(dict(name=name, split=split, process=process,
                                        batch_size=batch_size, data_dir=data_dir))


@pytest.mark.parametrize('name', list(CASES))
def test_train_and_eval_batches(name, data_dir):
  train_split, eval_split, train_pp, eval_pp, hw, allowed = CASES[name]
  train = pipeline.make_train_iterator(cfg(name, data_dir, train_split, train_pp), seed=0,
                                       process_index=0, process_count=1)
  batches = [next(train) for _ in range(2)]
  evals = list(pipeline.make_eval_iterable(cfg(name, data_dir, eval_split, eval_pp),
                                           process_index=0, process_count=1))
  assert len(evals) == 2 and evals[1]['__valid__'].tolist() == [True, False]
  for b in batches + evals:
    assert sorted(b) in (['image', 'labels'], ['__valid__', 'image', 'labels'])
    assert b['image'].shape == (2, *hw, 3) and b['image'].dtype == np.float32
    assert b['labels'].shape == (2, *hw) and b['labels'].dtype == np.int32
    assert -1 <= b['image'].min() and b['image'].max() <= 1
  values = set(np.unique(np.stack([b['labels'] for b in batches + evals])))
  assert values <= allowed and len(values - {255}) >= 2, values


def test_missing_mask_key_fails_when_the_pipeline_is_built(data_dir):
  bad = cfg('scene_parse150', data_dir, 'test', 'decode|seg_flip_lr|seg_labels')
  match = r"mask_key='segmentation_mask'.*\['annotation', 'image'\]"
  with pytest.raises(ValueError, match=match):
    pipeline.make_eval_iterable(bad, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=match):
    pipeline.make_train_iterator(bad, seed=0, process_index=0, process_count=1)


def test_unprepared_dataset_is_the_clear_error(tmp_path):
  for name in CASES:
    with pytest.raises(ValueError, match=f'not prepared.*tfds build {name}') as e:
      pipeline.get_dataset_info(cfg(name, str(tmp_path), 'train', 'decode'))
    assert ('manual_dir' in str(e.value)) == (name == 'cityscapes')
  assert list(tmp_path.iterdir()) == []
