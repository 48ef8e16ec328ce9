"""The 'ade20k' TFDS dataset: the ADE20K 150-class semantic-segmentation benchmark.

MIT's SceneParsing benchmark data, ADEChallengeData2016.zip (ZIP_NAME, from URL; the
file mmsegmentation and others train on), prepared from a manual download (this module
never downloads):

  python -m vmoe.data.ade20k --manual_dir=DIR --data_dir=DIR

with ADEChallengeData2016.zip in the manual dir (default DATA_DIR/downloads/manual).
It builds atomically (local.prepare); the pipeline never builds it on first use (about
20,000 images), its 'not prepared' error gives this command. TFDS's scene_parse150 is
another dataset: the Places-challenge instance annotations (see seg_ops).

The zip holds ADEChallengeData2016/images/{training,validation}/ADE_*.jpg and, of the
same names, ADEChallengeData2016/annotations/{training,validation}/ADE_*.png; its other
files (objectInfo150.txt, sceneCategories.txt) are not read. Features:
  'image'             uint8 [H, W, 3], the zip's JPEG bytes stored as they are (not
                      re-encoded); H and W vary from image to image.
  'segmentation_mask' uint8 [H, W, 1], the zip's 8-bit grayscale PNG: 0 other /
                      unlabelled, c in 1..150 the class CLASS_NAMES[c - 1].
  'file_name'         the image's file name, e.g. 'ADE_val_00000001.jpg'.
Splits (SPLITS): 'train' 20,210 (the zip's training/), 'validation' 2,000. The pp op
seg_remap("ade20k") maps 0 -> 255 (ignored) and c -> c - 1: NUM_CLASSES = 150 classes
0..149; seg_ops' docstring has the pp strings.

The zip is read member by member (zipfile), never extracted to disk.
"""
import os
import zipfile

from absl import app
from absl import flags
import numpy as np
import tensorflow_datasets as tfds

from vmoe import cli
from vmoe.data import local

ZIP_NAME = 'ADEChallengeData2016.zip'
URL = 'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip'
ROOT = 'ADEChallengeData2016'  # The zip's top folder.
# TFDS split -> (the zip's folder, its examples in the full zip).
SPLITS = {'train': ('training', 20_210), 'validation': ('validation', 2_000)}
# The benchmark's classes in mask-value order (value c is CLASS_NAMES[c - 1]): the first
# name of each row of the SceneParsing objectInfo150 list.
CLASS_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree',  # 1..5
    'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door',
    'table', 'mountain', 'plant', 'curtain', 'chair',
    'car', 'water', 'painting', 'sofa', 'shelf',
    'house', 'sea', 'mirror', 'rug', 'field',  # 26..30
    'armchair', 'seat', 'fence', 'desk', 'rock',
    'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion',
    'base', 'box', 'column', 'signboard', 'chest of drawers',
    'counter', 'sand', 'sink', 'skyscraper', 'fireplace',
    'refrigerator', 'grandstand', 'path', 'stairs', 'runway',  # 51..55
    'case', 'pool table', 'pillow', 'screen door', 'stairway',
    'river', 'bridge', 'bookcase', 'blind', 'coffee table',
    'toilet', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove', 'palm', 'kitchen island', 'computer',
    'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel',  # 76..80
    'bus', 'towel', 'light', 'truck', 'tower',
    'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land',
    'bannister', 'escalator', 'ottoman', 'bottle', 'buffet',
    'poster', 'stage', 'van', 'ship', 'fountain',  # 101..105
    'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool',
    'stool', 'barrel', 'basket', 'waterfall', 'tent',
    'bag', 'minibike', 'cradle', 'oven', 'ball',
    'food', 'step', 'tank', 'trade name', 'microwave',
    'pot', 'animal', 'bicycle', 'lake', 'dishwasher',  # 126..130
    'screen', 'blanket', 'sculpture', 'hood', 'sconce',
    'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board',
    'shower', 'radiator', 'glass', 'clock', 'flag',  # 146..150
)
NUM_CLASSES = len(CLASS_NAMES)
# What the pipeline's 'not prepared' error asks the user to put in the manual dir.
MANUAL_FILES = f'{ZIP_NAME} (MIT SceneParsing, {URL})'
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def default_manual_dir(data_dir: str) -> str:
  """TFDS's default manual dir of data_dir."""
  return os.path.join(data_dir, 'downloads', 'manual')


def zip_path(manual_dir: str) -> str:
  """manual_dir/ZIP_NAME; a ValueError saying where to put it if it is not there."""
  path = os.path.join(manual_dir, ZIP_NAME)
  if not os.path.isfile(path):
    raise ValueError(f'ade20k: {path} not found (nothing here downloads): download '
                     f'{MANUAL_FILES} and put it in {manual_dir}, or pass '
                     f'--manual_dir=DIR where it is.')
  return path


def pairs(names: list[str], folder: str) -> list[tuple[str, str]]:
  """(image, annotation) members of one folder of the zip ('training', 'validation').

  Args:
    names: the zip's member names.
    folder: the split's folder under images/ and annotations/.
  Returns:
    The pairs, sorted by name.
  Raises:
    ValueError: naming the first member without its counterpart, or if the folder is
      empty (not the SceneParsing zip).
  """
  image_dir, annotation_dir = f'{ROOT}/images/{folder}/', f'{ROOT}/annotations/{folder}/'
  images = _stems(names, image_dir, '.jpg')
  annotations = _stems(names, annotation_dir, '.png')
  for have, lack, what, counterpart in (
      (images, annotations, 'annotation', annotation_dir + '{}.png'),
      (annotations, images, 'image', image_dir + '{}.jpg')):
    missing = sorted(have.keys() - lack.keys())
    if missing:
      raise ValueError(f'{ZIP_NAME}: {have[missing[0]]} has no {what} '
                       f'{counterpart.format(missing[0])} ({len(missing)} file(s) of '
                       f'{folder}/ lack their {what}): the zip is damaged or not the '
                       f'SceneParsing one; download {URL} again.')
  if not images:
    raise ValueError(f'{ZIP_NAME} holds no {image_dir}*.jpg: not the '
                     f'SceneParsing zip; download {URL}.')
  return [(images[s], annotations[s]) for s in sorted(images)]


def _stems(names: list[str], prefix: str, suffix: str) -> dict[str, str]:
  """{file stem: member} of the members directly in folder `prefix` ending in suffix."""
  return {n[len(prefix):-len(suffix)]: n for n in names
          if n.startswith(prefix) and n.endswith(suffix) and '/' not in n[len(prefix):]}


def check_mask_png(member: str, data: bytes):
  """Raises unless data is an 8-bit grayscale PNG (IHDR bit depth 8, colour type 0).

  TFDS decodes the mask with 1 channel: an RGB or palette PNG would decode to mixed
  channel values, not its class ids.
  """
  if data[:8] != _PNG_SIGNATURE or data[12:16] != b'IHDR' or data[24:26] != b'\x08\x00':
    raise ValueError(f'{ZIP_NAME}: {member} is not an 8-bit grayscale PNG (the class id '
                     f'of each pixel): the zip is not the SceneParsing one; download '
                     f'{URL} again.')


# Run as a program (__main__), this file is a second copy of the module: its class must
# not take the name 'ade20k' (the import below registers the real one) nor be the builder
# that dataset_info.json records.
class Ade20k(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == '__main__'):
  """ADE20K SceneParsing, 150 classes (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download {ZIP_NAME} (MIT SceneParsing, the 150-class ADE20K benchmark) from '
      f'{URL} and put it, not extracted, in the manual dir; then run '
      f'`python -m vmoe.data.ade20k --manual_dir=DIR --data_dir=DIR`.')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=('ADE20K semantic segmentation (MIT SceneParsing, '
                     'ADEChallengeData2016): masks of 150 classes, 0 unlabelled.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'segmentation_mask': tfds.features.Image(
                shape=(None, None, 1), dtype=np.uint8, encoding_format='png'),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'segmentation_mask'),
        homepage='http://sceneparsing.csail.mit.edu/',
    )

  def _split_generators(self, dl_manager):
    path = zip_path(os.fspath(dl_manager.manual_dir))
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
    # Paired before anything is written: a broken zip fails in seconds.
    return {split: self._generate_examples(path, pairs(names, folder))
            for split, (folder, _) in SPLITS.items()}

  def _generate_examples(self, path, members):
    with zipfile.ZipFile(path) as z:
      for image, annotation in members:
        mask = z.read(annotation)
        check_mask_png(annotation, mask)
        file_name = os.path.basename(image)
        yield os.path.splitext(file_name)[0], {
            'image': z.read(image), 'segmentation_mask': mask, 'file_name': file_name}


def prepare(data_dir: str, manual_dir: str | None = None) -> Ade20k:
  """The ade20k builder of data_dir, built there first (atomically) if needed.

  Args:
    data_dir: the TFDS data dir.
    manual_dir: the folder holding ZIP_NAME (default: default_manual_dir(data_dir)).
  """
  manual_dir = manual_dir or default_manual_dir(data_dir)
  if not Ade20k(data_dir=data_dir).is_prepared():
    zip_path(manual_dir)  # Its clear error, before TFDS's about the manual dir.
  return local.prepare(Ade20k, data_dir, manual_dir=manual_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  b = prepare(f.data_dir, f.manual_dir)
  sizes = []
  for split, (_, expected) in SPLITS.items():
    n = b.info.splits[split].num_examples
    # A zip cut short still builds: say so, it would bias every score.
    sizes.append(f'{split} {n}' + ('' if n == expected else
                                   f' (the full zip has {expected:,})'))
  print(f'ade20k {b.version} is prepared in {b.data_dir}: {", ".join(sizes)}.')


def define_flags():
  """Only when run as a program: the library must not claim --data_dir."""
  flags.DEFINE_string('data_dir', None, 'TFDS data dir to prepare ade20k in.')
  flags.DEFINE_string('manual_dir', None,
                      f'Folder holding {ZIP_NAME} (default DATA_DIR/downloads/manual).')


if __name__ == '__main__':
  from vmoe.data import ade20k  # pylint: disable=g-import-not-at-top,import-self
  ade20k.define_flags()
  cli.run(ade20k.main, required=('data_dir',))
