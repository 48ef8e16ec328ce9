"""RandAugment (Cubuk et al., arXiv 1909.13719) with core TF ops only.

randaug(num_layers=2, magnitude=10) applies `num_layers` ops in sequence, each
drawn uniformly from the 16 below, all at the same magnitude; level =
magnitude / 10, so magnitude 10 is the paper's / TPU reference's maximum and
larger values (e.g. randaug(2, 20)) go beyond it. Ops and their strength at
`level`, as in the TPU reference (sizes relative to the image instead of
absolute pixels at 224 px, so small images get the same relative strength):
  auto_contrast, equalize, invert      (no magnitude)
  rotate       +-30 deg * level        (random sign; empty area filled gray 128)
  shear_x/y    +-0.3 * level           (random sign)
  translate_x/y +-0.45 * level * size  (random sign; 100 px of 224)
  posterize    keep clip(int(4 * level), 1, 8) bits
  solarize     invert pixels >= 256 * level
  solarize_add add 110 * level to pixels < 128
  color, contrast, brightness, sharpness: PIL ImageEnhance blend with factor
               1.8 * level + 0.1
  cutout       gray square of side 2 * 0.18 * level * min(H, W) at a random
               center (40 px half-side of 224)
Affine ops use tf.raw_ops.ImageProjectiveTransformV3 (nearest neighbour, as
the reference). Input: uint8 [H, W, 3]; output: uint8 [H, W, 3].
"""
import math

import tensorflow as tf

from vmoe.data.registry import keyed, register

_FILL = 128.0  # Gray, as the reference fills the area uncovered by affine ops.


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: factor 0 -> degenerate, 1 -> image, >1 extrapolates."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0., 255.)


def _enhance_factor(level):
  return 1.8 * level + 0.1


def _warp(image, transform):
  """Output pixel (x, y) samples the input at (a0 x + a1 y + a2, b0 x + b1 y + b2)
  for transform = [a0, a1, a2, b0, b1, b2] (no projective part)."""
  t = tf.concat([tf.cast(tf.stack(transform), tf.float32), tf.zeros([2])], 0)
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=t[None], output_shape=tf.shape(image)[:2],
      fill_value=_FILL, interpolation='NEAREST', fill_mode='CONSTANT')[0]


def _size(image):
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  return hw[0], hw[1]


def auto_contrast(image, level, sign, seed):
  lo = tf.reduce_min(image, axis=[0, 1])
  hi = tf.reduce_max(image, axis=[0, 1])
  scaled = (image - lo) * (255.0 / tf.maximum(hi - lo, 1e-6))
  return tf.where(hi > lo, scaled, image)


def _equalize_channel(x):
  """PIL ImageOps.equalize of one channel x: [H, W] holding ints 0..255."""
  xi = tf.cast(x, tf.int32)
  hist = tf.math.bincount(tf.reshape(xi, [-1]), minlength=256, maxlength=256)
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
  step = (tf.reduce_sum(hist) - last) // 255
  lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  return tf.where(step > 0, tf.cast(tf.gather(lut, xi), tf.float32), x)


def equalize(image, level, sign, seed):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def invert(image, level, sign, seed):
  return 255.0 - image


def rotate(image, level, sign, seed):
  theta = sign * level * (30.0 * math.pi / 180.0)
  h, w = _size(image)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  c, s = tf.cos(theta), tf.sin(theta)
  return _warp(image, [c, -s, cx - c * cx + s * cy,
                       s, c, cy - s * cx - c * cy])


def shear_x(image, level, sign, seed):
  return _warp(image, [1.0, sign * 0.3 * level, 0.0, 0.0, 1.0, 0.0])


def shear_y(image, level, sign, seed):
  return _warp(image, [1.0, 0.0, 0.0, sign * 0.3 * level, 1.0, 0.0])


def translate_x(image, level, sign, seed):
  dx = sign * 0.45 * level * _size(image)[1]
  return _warp(image, [1.0, 0.0, -dx, 0.0, 1.0, 0.0])


def translate_y(image, level, sign, seed):
  dy = sign * 0.45 * level * _size(image)[0]
  return _warp(image, [1.0, 0.0, 0.0, 0.0, 1.0, -dy])


def posterize(image, level, sign, seed):
  shift = 2.0 ** (8.0 - tf.clip_by_value(tf.floor(4.0 * level), 1.0, 8.0))
  return tf.floor(image / shift) * shift


def solarize(image, level, sign, seed):
  return tf.where(image < 256.0 * level, image, 255.0 - image)


def solarize_add(image, level, sign, seed):
  return tf.where(image < 128.0, tf.minimum(image + 110.0 * level, 255.), image)


def color(image, level, sign, seed):
  gray = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return _blend(gray, image, _enhance_factor(level))


def contrast(image, level, sign, seed):
  mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
  return _blend(tf.fill(tf.shape(image), mean), image, _enhance_factor(level))


def brightness(image, level, sign, seed):
  return _blend(tf.zeros_like(image), image, _enhance_factor(level))


def sharpness(image, level, sign, seed):
  """Blends with a smoothed copy; the border stays (PIL's SMOOTH filter)."""
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior > 0, smooth, image)
  return _blend(degenerate, image, _enhance_factor(level))


def cutout(image, level, sign, seed):
  h, w = _size(image)
  half = 0.18 * level * tf.minimum(h, w)
  center = tf.random.stateless_uniform([2], seed) * tf.stack([h, w])
  ys = tf.range(h)[:, None, None]
  xs = tf.range(w)[None, :, None]
  inside = ((tf.abs(ys - center[0]) < half) & (tf.abs(xs - center[1]) < half))
  return tf.where(inside, _FILL, image)


OPS = (auto_contrast, equalize, invert, rotate, posterize, solarize, color,
       contrast, brightness, sharpness, shear_x, shear_y, translate_x,
       translate_y, cutout, solarize_add)


# One traced function for every layer and pipeline, and not inlined: tracing
# and graph-optimising 16 branches costs seconds, paid once this way instead of
# once per layer and per pipeline.
@tf.function(
    autograph=False, experimental_attributes={'_noinline': True},
    input_signature=[tf.TensorSpec([None, None, 3], tf.float32),
                     tf.TensorSpec([], tf.float32), tf.TensorSpec([2], tf.int64)])
def _layer(x, level, seed):
  """x: float32 [H, W, 3] in 0..255 -> one random op of OPS applied."""
  s_op, s_sign, s_op_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  which = tf.random.stateless_uniform([], s_op, 0, len(OPS), tf.int32)
  sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
  return tf.switch_case(
      which, [lambda f=f: f(x, level, sign, s_op_seed) for f in OPS])


def distort(image: tf.Tensor, seed: tf.Tensor, num_layers: int,
            magnitude: float) -> tf.Tensor:
  """image: uint8 [H, W, 3] -> uint8 [H, W, 3] with `num_layers` random ops."""
  if image.dtype != tf.uint8:
    raise ValueError(f'randaug expects uint8 images (0..255), got '
                     f'{image.dtype.name}: put it before value_range.')
  level = tf.constant(magnitude / 10.0, tf.float32)
  x = tf.cast(image, tf.float32)
  for i in range(num_layers):
    x = _layer(x, level, tf.random.experimental.stateless_fold_in(
        seed, tf.constant(i, tf.int64)))
    x.set_shape(image.shape)
  return tf.saturate_cast(tf.round(x), tf.uint8)


@register('randaug')
@keyed('image')
def randaug(num_layers=2, magnitude=10):
  """RandAugment: `num_layers` ops drawn from 16, all at `magnitude`."""
  if num_layers < 0 or magnitude < 0:
    raise ValueError(f'randaug needs num_layers >= 0 and magnitude >= 0; got '
                     f'{num_layers}, {magnitude}.')
  return lambda image, seed: distort(image, seed, num_layers, magnitude)
