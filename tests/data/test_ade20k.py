"""ade20k (vmoe/data/ade20k.py) from a tiny fake ADEChallengeData2016.zip (3 training and 2
validation JPEG / PNG pairs made with PIL): prepared by the command of the pipeline's 'not
prepared' error, then read through the pipeline with seg_ops' pp strings at 32 px."""
import io
import os
import re
import shlex
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vmoe.data import ade20k
from vmoe.data import pipeline
from vmoe.data import seg_ops

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = 'ADEChallengeData2016'
KEEP = '|value_range(-1, 1)|seg_labels|keep("image", "labels")'
TRAIN_PP = ('decode|seg_remap("ade20k")|seg_resize(32)|seg_random_scale_crop(32, 0.5, 2.0)|'
            'seg_flip_lr' + KEEP)
EVAL_PP = 'decode|seg_remap("ade20k")|seg_resize(32)' + KEEP
VALUES = [0, 1, 5, 150]  # Mask values: other, wall, tree, flag.
# Training images of varying sizes; validation ones 32 x 32, which seg_resize(32) keeps.
SIZES = {('training', 'ADE_train'): [(40, 48), (48, 40), (24, 56)],
         ('validation', 'ADE_val'): [(32, 32), (32, 32)]}


def encode(array, fmt):
  out = io.BytesIO()
  Image.fromarray(array).save(out, format=fmt)
  return out.getvalue()


def fake_members():
  """{zip member: bytes}: the pairs of SIZES (masks: VALUES in 8 x 8 blocks) and a
  file the builder does not read."""
  rng = np.random.RandomState(0)
  members = {f'{ROOT}/objectInfo150.txt': b'Idx\tRatio\tTrain\tVal\tName\n'}
  for (folder, prefix), sizes in SIZES.items():
    for i, (h, w) in enumerate(sizes, 1):
      stem = f'{prefix}_{i:08d}'
      mask = np.kron(rng.choice(VALUES, size=(-(-h // 8), -(-w // 8))), np.ones((8, 8), int))
      image = rng.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
      members[f'{ROOT}/images/{folder}/{stem}.jpg'] = encode(image, 'JPEG')
      members[f'{ROOT}/annotations/{folder}/{stem}.png'] = encode(
          mask[:h, :w].astype(np.uint8), 'PNG')
  return members


MEMBERS = fake_members()


def write_zip(directory, members=MEMBERS) -> str:
  """directory/ADEChallengeData2016.zip of members (and folder entries, as real zips
  have); returns directory."""
  os.makedirs(directory, exist_ok=True)
  with zipfile.ZipFile(os.path.join(directory, ade20k.ZIP_NAME), 'w') as z:
    for folder in sorted({m.rsplit('/', 1)[0] + '/' for m in members}):
      z.writestr(folder, b'')
    for name, data in members.items():
      z.writestr(name, data)
  return str(directory)


def cfg(data_dir, split, process, **kwargs):
  return ml_collections.ConfigDict(dict(name='ade20k', split=split, process=process,
                                        batch_size=2, data_dir=data_dir, **kwargs))


def not_prepared_error(data_dir, **kwargs) -> str:
  with pytest.raises(ValueError, match='not prepared') as e:
    pipeline.get_dataset_info(cfg(data_dir, 'train', 'decode', **kwargs))
  return str(e.value)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """(data dir, the command's stdout): ade20k prepared by the error's command."""
  tmp = tmp_path_factory.mktemp('ade20k')
  data_dir, manual_dir = str(tmp / 'tfds'), write_zip(tmp / 'manual')
  command = re.search('`(.*?)`', not_prepared_error(data_dir, manual_dir=manual_dir))[1]
  assert command == (f'python -m vmoe.data.ade20k --data_dir={data_dir} '
                     f'--manual_dir={manual_dir}')
  run = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode == 0, run.stderr
  return data_dir, run.stdout


def test_class_names():
  assert len(set(ade20k.CLASS_NAMES)) == ade20k.NUM_CLASSES == seg_ops.ADE20K_CLASSES == 150
  assert ade20k.CLASS_NAMES[:5] == ('wall', 'building', 'sky', 'floor', 'tree')
  assert ade20k.CLASS_NAMES[-3:] == ('glass', 'clock', 'flag')


def test_prepared_files_are_the_zips(prepared):
  data_dir, stdout = prepared
  assert 'train 3 (the full zip has 20,210), validation 2 (the full zip has 2,000)' in stdout
  b = tfds.builder('ade20k', data_dir=data_dir)
  assert b.info.module_name == 'vmoe.data.ade20k'  # Not __main__'s copy.
  for split, (folder, _) in ade20k.SPLITS.items():
    raw = tfds.as_numpy(b.as_dataset(split, decoders={
        'image': tfds.decode.SkipDecoding(), 'segmentation_mask': tfds.decode.SkipDecoding()}))
    got = {x['file_name'].decode(): (x['image'], x['segmentation_mask']) for x in raw}
    assert sorted(got) == sorted(m.rsplit('/', 1)[1] for m in MEMBERS
                                 if m.startswith(f'{ROOT}/images/{folder}/'))
    for file_name, (image, mask) in got.items():  # Stored as they are: not re-encoded.
      stem = file_name[:-len('.jpg')]
      assert image == MEMBERS[f'{ROOT}/images/{folder}/{file_name}']
      assert mask == MEMBERS[f'{ROOT}/annotations/{folder}/{stem}.png']


def test_pipeline_remaps_the_labels(prepared):
  data_dir, _ = prepared
  train = pipeline.make_train_iterator(cfg(data_dir, 'train', TRAIN_PP), seed=0,
                                       process_index=0, process_count=1)
  batches = [next(train) for _ in range(3)]
  evals = list(pipeline.make_eval_iterable(cfg(data_dir, 'validation', EVAL_PP),
                                           process_index=0, process_count=1))
  assert len(evals) == 1 and evals[0]['__valid__'].tolist() == [True, True]
  for b in batches + evals:
    assert b['image'].shape == (2, 32, 32, 3) and b['image'].dtype == np.float32
    assert b['labels'].shape == (2, 32, 32) and b['labels'].dtype == np.int32
  train_values = set(np.unique([b['labels'] for b in batches]))
  assert train_values <= {255, 0, 4, 149} and len(train_values - {255}) >= 2, train_values
  # 0 (other) -> 255 (ignored), class c -> c - 1, pixel for pixel.
  masks = [np.asarray(Image.open(io.BytesIO(data))).astype(int) for name, data in
           MEMBERS.items() if name.startswith(f'{ROOT}/annotations/validation/')]
  expected = sorted(np.where(m == 0, 255, m - 1).tobytes() for m in masks)
  assert sorted(x.astype(int).tobytes() for x in evals[0]['labels']) == expected


def test_unprepared_error_gives_the_prepare_command(tmp_path):
  manual_dir = write_zip(tmp_path / 'manual')  # The zip is there: still not built here.
  data_dir = str(tmp_path / 'tfds')
  msg = not_prepared_error(data_dir, manual_dir=manual_dir)
  assert (f'`python -m vmoe.data.ade20k --data_dir={data_dir} --manual_dir={manual_dir}` '
          f'(this dataset needs a manual download first: put ADEChallengeData2016.zip'
          in msg), msg
  default = os.path.join(data_dir, 'downloads', 'manual')
  assert f'--manual_dir={default}`' in not_prepared_error(data_dir)
  assert not os.path.exists(data_dir)


def test_missing_zip_names_the_manual_dir(tmp_path):
  data_dir, manual_dir = str(tmp_path / 'tfds'), str(tmp_path / 'manual')
  for given, named in ((manual_dir, manual_dir),
                       (None, os.path.join(data_dir, 'downloads', 'manual'))):
    with pytest.raises(ValueError, match=re.escape(
        f'{named}/ADEChallengeData2016.zip not found (nothing here downloads)')) as e:
      ade20k.prepare(data_dir, given)
    assert f'put it in {named}' in str(e.value)
  assert not os.path.exists(data_dir)


@pytest.mark.parametrize('drop, named, missing', [
    ('annotations/training/ADE_train_00000002.png', 'images/training/ADE_train_00000002.jpg',
     'annotation'),
    ('images/validation/ADE_val_00000001.jpg', 'annotations/validation/ADE_val_00000001.png',
     'image'),
])
def test_unpaired_member_fails_clearly(tmp_path, drop, named, missing):
  members = {k: v for k, v in MEMBERS.items() if k != f'{ROOT}/{drop}'}
  data_dir = str(tmp_path / 'tfds')
  match = re.escape(f'{ROOT}/{named} has no {missing} {ROOT}/{drop} (1 file(s) of ')
  with pytest.raises(ValueError, match=match):
    ade20k.prepare(data_dir, write_zip(tmp_path / 'manual', members))
  assert os.listdir(data_dir) == []  # The partial build is removed.


def test_colour_mask_fails_clearly(tmp_path):
  name = f'{ROOT}/annotations/training/ADE_train_00000001.png'
  rgb = encode(np.zeros((40, 48, 3), np.uint8), 'PNG')
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(ValueError, match=re.escape(f'{name} is not an 8-bit grayscale PNG')):
    ade20k.prepare(data_dir, write_zip(tmp_path / 'manual', {**MEMBERS, name: rgb}))
  assert os.listdir(data_dir) == []
