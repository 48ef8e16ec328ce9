"""The 'digits' TFDS dataset: scikit-learn's bundled 8x8 handwritten digits.

1,797 grayscale 8x8 images of the digits 0-9 (the UCI optical recognition data
that ships inside scikit-learn, so building it needs no network and no download
step). Each image is stored as uint8 [8, 8, 3]: the 0..16 gray levels are
rescaled to 0..255 with rounding and replicated to 3 channels, so that RGB
pipelines (decode|resize|value_range...) work unchanged.

Splits (fixed, stratified): 'test' holds 360 images (36 per class) and 'train'
the other 1,437. For each class c, the indices of its images (in sklearn's
order) are permuted with numpy.random.RandomState(SPLIT_SEED + c) and the first
36 go to 'test'. numpy's legacy RandomState is stable across numpy versions, so
the split is the same everywhere.

Importing this module registers the builder with TFDS. Use `prepare(data_dir)`
to build it (atomically, safe under concurrent callers: local.prepare) into a
data dir.
"""
import numpy as np
import tensorflow_datasets as tfds

from vmoe.data import local

SPLIT_SEED = 0
TEST_PER_CLASS = 36
NUM_CLASSES = 10


def split_indices() -> dict[str, np.ndarray]:
  """Returns {'train': [1437], 'test': [360]} sorted indices into load_digits()."""
  from sklearn.datasets import load_digits  # Heavy import; only when building.
  y = load_digits().target
  test = []
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(y == c)
    perm = np.random.RandomState(SPLIT_SEED + c).permutation(len(idx))
    test.append(idx[perm[:TEST_PER_CLASS]])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(y)), test)
  return {'train': train, 'test': test}


def to_uint8_rgb(images: np.ndarray) -> np.ndarray:
  """images: [N, 8, 8] in 0..16 -> uint8 [N, 8, 8, 3] in 0..255 (rounded)."""
  x = np.round(np.asarray(images, np.float64) * (255.0 / 16.0))
  x = np.clip(x, 0, 255).astype(np.uint8)
  return np.repeat(x[..., None], 3, axis=-1)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits as a TFDS dataset (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='scikit-learn load_digits(): 8x8 handwritten digits.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    return {split: self._generate_examples(idx)
            for split, idx in split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = to_uint8_rgb(digits.images)
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(digits.target[i])}


def prepare(data_dir: str) -> Digits:
  """The digits builder of data_dir, built there first if needed (local.prepare)."""
  return local.prepare(Digits, data_dir)
