"""RandAugment: each op's semantics (against PIL where PIL has it) and randaug."""
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from vmoe.data import pp_ops
from vmoe.data import randaug

IMAGE = np.random.RandomState(0).randint(0, 256, (9, 9, 3)).astype(np.uint8)
SIGN = 1.0


def apply(op, level, image=IMAGE, sign=SIGN, seed=(1, 2)):
  out = op(tf.constant(image, tf.float32), tf.constant(level, tf.float32),
           tf.constant(sign), tf.constant(seed, tf.int64))
  return out.numpy()


@pytest.mark.parametrize('op', randaug.OPS, ids=lambda f: f.__name__)
def test_op_shape_and_range(op):
  out = apply(op, 1.0)
  assert out.shape == IMAGE.shape
  assert 0 <= out.min() and out.max() <= 255


@pytest.mark.parametrize('op, pil', [
    (randaug.equalize, ImageOps.equalize),
    (randaug.invert, ImageOps.invert),
    (randaug.auto_contrast, ImageOps.autocontrast),
    (randaug.posterize, lambda im: ImageOps.posterize(im, 4)),  # level 1: 4 bits
    (randaug.solarize, lambda im: ImageOps.solarize(im, 128)),  # level 0.5
])
def test_ops_match_pil(op, pil):
  level = 0.5 if op is randaug.solarize else 1.0
  expected = np.asarray(pil(Image.fromarray(IMAGE)))
  np.testing.assert_allclose(apply(op, level), expected, atol=1)


@pytest.mark.parametrize('op, enhance', [
    (randaug.color, ImageEnhance.Color),
    (randaug.brightness, ImageEnhance.Brightness),
    (randaug.sharpness, ImageEnhance.Sharpness),
    (randaug.contrast, ImageEnhance.Contrast),
])
def test_enhance_ops_match_pil(op, enhance):
  level = 0.3  # factor 1.8 * 0.3 + 0.1 = 0.64
  expected = np.asarray(enhance(Image.fromarray(IMAGE)).enhance(0.64))
  # PIL rounds its degenerate images to uint8 first: allow a little slack.
  np.testing.assert_allclose(apply(op, level), expected, atol=3)


def test_rotate_by_90_degrees():
  out = apply(randaug.rotate, 3.0)  # 30 deg * level 3.
  assert any(np.array_equal(out, np.rot90(IMAGE, k)) for k in (1, -1))
  back = apply(randaug.rotate, 3.0, out, sign=-SIGN)
  np.testing.assert_array_equal(back, IMAGE)


def test_translate_and_shear():
  image = np.random.RandomState(1).randint(0, 256, (20, 20, 3)).astype(np.uint8)
  out = apply(randaug.translate_x, 1.0, image)  # 0.45 * 20 = 9 px.
  np.testing.assert_array_equal(out[:, 9:], image[:, :-9])
  np.testing.assert_array_equal(out[:, :9], 128)
  out = apply(randaug.translate_y, 1.0, image, sign=-1.0)
  np.testing.assert_array_equal(out[:-9], image[9:])
  out = apply(randaug.shear_x, 1.0, image)  # x_in = x + 0.3 y
  np.testing.assert_array_equal(out[0], image[0])
  assert not np.array_equal(out, image)


def test_cutout_and_solarize_add():
  image = np.where(IMAGE == 128, 127, IMAGE).astype(np.uint8)
  out = apply(randaug.cutout, 1.0, image)
  mask = np.all(out == 128, axis=-1)
  ys, xs = np.nonzero(mask)
  assert mask.any() and not mask.all()
  assert mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # A box.
  np.testing.assert_array_equal(out[~mask], image[~mask])
  out = apply(randaug.solarize_add, 0.5)
  expected = np.where(IMAGE < 128, np.minimum(IMAGE + 55.0, 255), IMAGE)
  np.testing.assert_array_equal(out, expected)


def test_randaug_is_seeded():
  pp = pp_ops.get_pp_fn('randaug(2, 10)')
  run = lambda s: pp({'image': tf.constant(IMAGE)}, tf.constant(s, tf.int64))
  outs = [run((0, s))['image'].numpy() for s in range(8)]
  assert all(o.shape == IMAGE.shape and o.dtype == np.uint8 for o in outs)
  np.testing.assert_array_equal(outs[0], run((0, 0))['image'].numpy())
  assert len({o.tobytes() for o in outs}) > 4
  with pytest.raises(ValueError, match='uint8'):
    pp({'image': tf.zeros([4, 4, 3])}, tf.constant((0, 0), tf.int64))
