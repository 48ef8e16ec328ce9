"""The 'digit_scenes' TFDS dataset: an offline semantic-segmentation demo.

Each example is a 32x32 RGB canvas (SIZE) with 1 to 3 handwritten digits drawn
on a textured background, and its per-pixel class mask:
  'image'             uint8 [32, 32, 3]
  'segmentation_mask' uint8 [32, 32, 1]: 0 background, 1 + d where the stroke
                      of a digit of class d (0..9) covers the pixel.
NUM_CLASSES = 11 (background and the 10 digits).

Digits are scikit-learn's real 8x8 glyphs (load_digits, the 'digits'
dataset's source), gray levels 0..16 read as intensities 0..1, upscaled with
bilinear interpolation to a random square size of 14..24 px (MAX_SIDE: up to
24 px for a lone digit, 20 px in scenes of 2, 17 px in scenes of 3), and
placed at a random position fully inside the canvas. A digit is alpha-blended
in a random colour (alpha = its upscaled intensity); its stroke is where that
intensity is >= STROKE (0.5). Digits are drawn in order, a later one over the
earlier ones (in the image and in the mask). Boxes may overlap, but every
digit's box stays at most MAX_COVERED (25%) covered by the other boxes, so
each digit stays recognisable. A scene asks for 1..3 digits (uniformly); its
boxes are drawn at random until they fit, over at most LAYOUT_TRIES layouts,
and a scene whose layouts all fail keeps the most digits one placed
(at least 1): about 32% of scenes hold 1 digit, 38% 2 and 30% 3.

The background is a smooth texture: a bilinear gradient between four random
corner colours plus low-frequency noise (a 4x4 random grid, bilinearly
upsampled), so it has no digit-like strokes. Contrast is guaranteed: a scene
is either dark (background channels in 0..0.4) with light digits (channels in
0.65..1), or the reverse.

Splits: 'train' 4000 canvases drawn only from the glyphs of the digits
dataset's 'train' split (digits.split_indices()), 'test' 500 only from its
'test' glyphs, so no handwritten digit of the test canvases is seen in
training. Glyphs are drawn uniformly from the split's pool, so the digit
classes are roughly balanced. Example i of split s is scene(scene_rng(s, i),
*glyph_pool(s)): numpy's legacy RandomState seeded with (SEED, split, i),
stable across numpy versions, so the dataset is the same everywhere.

Importing this module registers the builder with TFDS; `prepare(data_dir)`
builds it (in seconds, atomically: local.prepare) into a data dir, and the
pipeline builds it on first use.
"""
import functools
import io
import itertools
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from vmoe.data import digits
from vmoe.data import local

NUM_CLASSES = 11
CLASS_NAMES = ('background',) + tuple(str(d) for d in range(10))  # Mask value order.
SIZE = 32
SPLITS = {'train': 4000, 'test': 500}
SEED = 0
MAX_DIGITS = 3
MIN_SIDE = 14  # Side of a digit's box (px).
# The largest side by the number of digits asked for: a scene of 3 digits of
# 24 px could not keep them 75% uncovered on 32 x 32.
MAX_SIDE = {1: 24, 2: 20, 3: 17}
MAX_COVERED = 0.25
PLACE_TRIES = 10  # Positions tried per digit,
LAYOUT_TRIES = 10  # in as many layouts of the scene.
STROKE = 0.5
# Channel ranges of the two sides of a scene: (background, digits) is
# (DARK, LIGHT) or (LIGHT, DARK).
DARK, LIGHT = (0.0, 0.4), (0.65, 1.0)
NOISE = 0.15  # Amplitude of the background's low-frequency noise.


class Scene(NamedTuple):
  """One canvas: image uint8 [SIZE, SIZE, 3], mask uint8 [SIZE, SIZE, 1],
  indices int [n] (the glyphs drawn, in drawing order, into the pool passed to
  scene()) and boxes int [n, 3] (top, left, side of each digit)."""
  image: np.ndarray
  mask: np.ndarray
  indices: np.ndarray
  boxes: np.ndarray


def glyph_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(glyphs float [N, 8, 8] in 0..1, labels int [N]) of a digits split."""
  from sklearn.datasets import load_digits  # Heavy import; only when building.
  data = load_digits()
  idx = digits.split_indices()[split]
  return data.images[idx] / 16.0, data.target[idx]


def scene_rng(split: str, index: int) -> np.random.RandomState:
  """The random state of example `index` of `split`."""
  return np.random.RandomState([SEED, list(SPLITS).index(split), index])


@functools.cache
def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of linear interpolation (half-pixel centres, edges
  clamped): x [n_in] -> m @ x [n_out]. Cached: read-only."""
  pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1 - (pos - lo))
  np.add.at(m, (np.arange(n_out), hi), pos - lo)
  m.flags.writeable = False
  return m


def upscale(glyph: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize: [h, w] -> [size, size]."""
  rows = interpolation_matrix(glyph.shape[0], size)
  cols = interpolation_matrix(glyph.shape[1], size)
  return rows @ glyph @ cols.T


def _smooth(grid: np.ndarray) -> np.ndarray:
  """[g, g, 3] -> [SIZE, SIZE, 3], bilinearly upsampled."""
  m = interpolation_matrix(grid.shape[0], SIZE)
  return (m @ grid.transpose(2, 0, 1) @ m.T).transpose(1, 2, 0)


def background(rng: np.random.RandomState, low: float, high: float
               ) -> np.ndarray:
  """float [SIZE, SIZE, 3] in [low, high]: a gradient plus smooth noise."""
  field = (_smooth(rng.uniform(size=(2, 2, 3))) +
           _smooth(rng.uniform(-NOISE, NOISE, size=(4, 4, 3))))
  return low + (high - low) * np.clip(field, 0.0, 1.0)


def _overlap(a, b):
  """The intersection of two boxes (top, left, side | height, width), or None."""
  top, left = max(a[0], b[0]), max(a[1], b[1])
  bottom = min(a[0] + a[2], b[0] + b[2])
  right = min(a[1] + a[-1], b[1] + b[-1])
  return (top, left, bottom - top, right - left) if (
      bottom > top and right > left) else None


def covered(box, others) -> int:
  """Pixels of box that any of the other boxes covers (inclusion-exclusion)."""
  area = 0
  for k in range(1, len(others) + 1):
    for group in itertools.combinations(others, k):
      part = box
      for other in group:
        part = part and _overlap(part, other)
      area += (-1) ** (k + 1) * (part[2] * part[3] if part else 0)
  return area


def fits(boxes: list[tuple[int, int, int]]) -> bool:
  """Whether every box (top, left, side) is at most MAX_COVERED covered by
  the others."""
  return all(covered(b, boxes[:i] + boxes[i + 1:]) <= MAX_COVERED * b[2] ** 2
             for i, b in enumerate(boxes))


def _place(rng, boxes, max_side):
  """A new (top, left, side) that fits beside `boxes`, or None."""
  for _ in range(PLACE_TRIES):
    side = rng.randint(MIN_SIDE, max_side + 1)
    top, left = rng.randint(0, SIZE - side + 1, size=2)
    box = (int(top), int(left), int(side))
    if fits(boxes + [box]):
      return box
  return None


def layout(rng: np.random.RandomState, n: int) -> list[tuple[int, int, int]]:
  """n boxes (top, left, side) that fit together, or the most of LAYOUT_TRIES
  attempts found: a first box in the middle can leave no room for the rest."""
  best = []
  for _ in range(LAYOUT_TRIES):
    boxes = []
    while len(boxes) < n:
      box = _place(rng, boxes, MAX_SIDE[n])
      if box is None:
        break
      boxes.append(box)
    if len(boxes) > len(best):
      best = boxes
    if len(best) == n:
      break
  return best


def scene(rng: np.random.RandomState, glyphs: np.ndarray, labels: np.ndarray
          ) -> Scene:
  """A random canvas of 1..MAX_DIGITS of `glyphs` (see the module docstring).

  Args:
    rng: the source of randomness (scene_rng(split, index) for the dataset).
    glyphs: float [N, 8, 8] in 0..1, the pool to draw digits from.
    labels: int [N], their classes 0..9.
  """
  bg_range, fg_range = (DARK, LIGHT) if rng.randint(2) else (LIGHT, DARK)
  image = background(rng, *bg_range)
  mask = np.zeros((SIZE, SIZE), np.uint8)
  indices, boxes = [], []
  for box in layout(rng, rng.randint(1, MAX_DIGITS + 1)):
    i = rng.randint(len(glyphs))
    colour = fg_range[0] + (fg_range[1] - fg_range[0]) * rng.uniform(size=3)
    top, left, side = box
    alpha = upscale(glyphs[i], side)[..., None]
    window = (slice(top, top + side), slice(left, left + side))
    image[window] = image[window] * (1 - alpha) + colour * alpha
    mask[window][alpha[..., 0] >= STROKE] = 1 + labels[i]
    indices.append(i)
    boxes.append(box)
  image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
  return Scene(image, mask[..., None], np.array(indices, int),
               np.array(boxes, int).reshape(-1, 3))


class DigitScenes(tfds.core.GeneratorBasedBuilder):
  """Canvases of scikit-learn digits with class masks (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=('32x32 canvases of 1-3 scikit-learn digits on textured '
                     'backgrounds, with per-pixel masks (0 background, '
                     '1 + digit).'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(SIZE, SIZE, 3),
                                         dtype=np.uint8),
            'segmentation_mask': tfds.features.Image(shape=(SIZE, SIZE, 1),
                                                     dtype=np.uint8),
        }),
        supervised_keys=('image', 'segmentation_mask'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the glyphs ship with scikit-learn.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    glyphs, labels = glyph_pool(split)
    for i in range(SPLITS[split]):
      s = scene(scene_rng(split, i), glyphs, labels)
      yield i, {'image': _png(s.image), 'segmentation_mask': _png(s.mask)}


def _png(image: np.ndarray) -> io.BytesIO:
  """uint8 [H, W, C] -> its PNG file. Lossless; encoded with PIL because
  TFDS's own encoder (a TF op per image) takes most of the build's time."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  # Build only.
  out = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
      out, format='PNG', compress_level=1)
  out.seek(0)
  return out


def prepare(data_dir: str) -> DigitScenes:
  """The digit_scenes builder of data_dir, built there first if needed."""
  return local.prepare(DigitScenes, data_dir)
