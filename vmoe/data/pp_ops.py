"""Preprocessing ops (TF), chosen by name from big_vision-style pp strings.

Per-example ops (data: dict of one example's tensors; images [H, W, C]):
  decode(channels=3), decode_jpeg_and_inception_crop(size=None, area_min=5,
  area_max=100, method='bilinear'), resize(h, w=None, method='bilinear'),
  resize_small(size), central_crop(h, w=None), inception_crop(size=None,
  area_min=5, area_max=100, method='bilinear'), flip_lr, value_range(vmin, vmax,
  in_min=0, in_max=255, clip_values=False), onehot(depth, multi=True, on=1.0,
  off=0.0) (key='label', key_result='labels'), keep(*keys), randaug(num_layers=2,
  magnitude=10) (see randaug.py).
Batch ops (data: dict of a batch's tensors, [B, ...]): mixup(alpha=0.2).
Joint image / segmentation mask ops (seg_resize, seg_random_scale_crop,
seg_flip_lr, seg_pad, seg_remap, mask_channel, seg_labels): see seg_ops.py;
importing this module registers them too.

Image ops read data[key] (default 'image') and write data[key_result] (default:
the same key). Random ops use TF stateless random ops seeded by the seed they
are given (see registry.compose), so a pipeline is reproducible and resumable.
"""
import tensorflow as tf

from vmoe.data import image_utils
from vmoe.data import randaug as _randaug  # noqa: F401  # pylint: disable=unused-import
from vmoe.data import registry
from vmoe.data import seg_ops as _seg_ops  # noqa: F401  # pylint: disable=unused-import
from vmoe.data.registry import keyed, register

# Ops whose input is an encoded image: the pipeline leaves the tfds Image
# features they read undecoded, so decoding (and cropping) happens only once.
DECODE_OPS = ('decode', 'decode_jpeg_and_inception_crop')


def _as_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  if image.dtype != tf.uint8:
    raise ValueError(f'decode expects encoded strings or uint8 images; got '
                     f'{image.dtype.name}.')
  c = image.shape[-1]
  if c == 1 and channels == 3:
    image = tf.image.grayscale_to_rgb(image)
  elif c != channels:
    raise ValueError(f'decode(channels={channels}) got a uint8 image with '
                     f'{c} channels.')
  return image


def _decode(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Encoded string or uint8 [H, W, C] -> uint8 [H, W, channels]."""
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=channels,
                               expand_animations=False)
  else:
    image = _as_channels(image, channels)
  image.set_shape([None, None, channels])
  return image


def _crop_box(shape, seed, area_min, area_max):
  """Inception-style random box of an image of `shape` [3] -> (begin, size)."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, area_range=(area_min / 100, area_max / 100),
      use_image_if_no_bounding_boxes=True)
  return begin, size


@register('decode')
@keyed('image')
def decode(channels=3):
  """Decodes PNG/JPEG/... strings; uint8 tensors (already decoded) pass."""
  return lambda image, seed: _decode(image, channels)


@register('resize')
@keyed('image')
def resize(h, w=None, method='bilinear'):
  """Resizes to [h, w] (w defaults to h); keeps the dtype (uint8 rounded)."""
  size = image_utils.hw(h, w)
  return lambda image, seed: image_utils.resize(image, size, method)


@register('resize_small')
@keyed('image')
def resize_small(size):
  """Resizes so that the smaller side is `size`, keeping the aspect ratio."""

  def f(image, seed):
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new_hw = tf.cast(tf.round(hw * size / tf.reduce_min(hw)), tf.int32)
    return image_utils.resize(image, new_hw, 'area')

  return f


@register('central_crop')
@keyed('image')
def central_crop(h, w=None):
  """Crops the central [h, w] window (w defaults to h)."""
  h, w = image_utils.hw(h, w)

  def f(image, seed):
    dy = (tf.shape(image)[0] - h) // 2
    dx = (tf.shape(image)[1] - w) // 2
    return tf.image.crop_to_bounding_box(image, dy, dx, h, w)

  return f


@register('inception_crop')
@keyed('image')
def inception_crop(size=None, area_min=5, area_max=100, method='bilinear'):
  """Random crop of area_min..area_max % of the image, then resized to size."""

  def f(image, seed):
    begin, crop_size = _crop_box(tf.shape(image), seed, area_min, area_max)
    crop = tf.slice(image, begin, crop_size)
    crop.set_shape([None, None, image.shape[-1]])
    return image_utils.resize(crop, image_utils.hw(size), method) if size else crop

  return f


@register('decode_jpeg_and_inception_crop')
@keyed('image')
def decode_jpeg_and_inception_crop(size=None, area_min=5, area_max=100,
                                   method='bilinear'):
  """inception_crop of an encoded image; JPEGs decode only the crop window.

  Non-JPEG strings are fully decoded, uint8 tensors are used as they are; the
  crop box is the same in every case (it depends on the shape and the seed).
  """

  def crop_decoded(image, seed):
    begin, crop_size = _crop_box(tf.shape(image), seed, area_min, area_max)
    return tf.slice(image, begin, crop_size)

  def f(image, seed):
    if image.dtype != tf.string:
      crop = crop_decoded(_decode(image, 3), seed)
    else:
      def jpeg():
        begin, crop_size = _crop_box(tf.image.extract_jpeg_shape(image), seed,
                                     area_min, area_max)
        window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
        return tf.image.decode_and_crop_jpeg(image, window, channels=3)

      crop = tf.cond(tf.io.is_jpeg(image), jpeg,
                     lambda: crop_decoded(_decode(image, 3), seed))
    crop.set_shape([None, None, 3])
    return image_utils.resize(crop, image_utils.hw(size), method) if size else crop

  return f


@register('flip_lr')
@keyed('image')
def flip_lr():
  """Flips left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right


@register('value_range')
@keyed('image')
def value_range(vmin, vmax, in_min=0, in_max=255, clip_values=False):
  """Maps [in_min, in_max] linearly to [vmin, vmax] (float32)."""

  def f(image, seed):
    x = (tf.cast(image, tf.float32) - in_min) / (in_max - in_min)
    x = vmin + x * (vmax - vmin)
    return tf.clip_by_value(x, vmin, vmax) if clip_values else x

  return f


@register('onehot')
@keyed('label', 'labels')
def onehot(depth, multi=True, on=1.0, off=0.0):
  """int label [] -> float32 [depth]; a label list [L] gives a multi-hot [depth]
  (multi=True) or [L, depth] (multi=False)."""

  def f(label, seed):
    label = tf.cast(label, tf.int32)
    if label.shape.rank and multi:
      hot = tf.reduce_sum(tf.one_hot(label, depth, dtype=tf.float32), axis=0)
      return tf.minimum(hot, 1.0) * (on - off) + off
    return tf.one_hot(label, depth, on_value=on, off_value=off,
                      dtype=tf.float32)

  return f


@register('keep')
def keep(*keys):
  """Keeps only `keys` (strings, or one list of them) plus '__valid__'."""
  if len(keys) == 1 and isinstance(keys[0], (list, tuple)):
    keys = tuple(keys[0])

  def f(data, seed):
    missing = [k for k in keys if k not in data]
    if missing:
      raise ValueError(f'keep{keys}: keys {missing} are not in the example, '
                       f'which has keys {sorted(data)}.')
    return {k: v for k, v in data.items()
            if k in keys or k == registry.VALID_KEY}

  return f


@register('mixup', kind='batch')
def mixup(alpha=0.2, keys=('image', 'labels')):
  """Mixes each example with the next one in the batch (a roll by 1).

  One weight lam ~ Beta(alpha, alpha) per batch; every key in `keys` (float
  [B, ...]) becomes lam * x + (1 - lam) * roll(x, 1, axis=0), so images and
  labels are mixed with the same weights.
  """
  if alpha <= 0:
    raise ValueError(f'mixup alpha must be > 0, got {alpha}.')

  def f(data, seed):
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    g1 = tf.random.stateless_gamma([], s1, alpha)
    g2 = tf.random.stateless_gamma([], s2, alpha)
    lam = g1 / (g1 + g2)
    out = dict(data)
    for k in keys:
      x = data.get(k)
      if x is None or not x.dtype.is_floating:
        raise ValueError(f'mixup(keys={keys}) needs a float {k!r} in the '
                         f'batch (keys: {sorted(data)}): put value_range / '
                         f'onehot in the example pp string.')
      out[k] = lam * x + (1 - lam) * tf.roll(x, 1, axis=0)
    return out

  return f


def get_pp_fn(spec: str, kind: str = 'example') -> registry.Op:
  """Parses `spec` into fn(data, seed) -> data.

  fn.decode_keys: the keys read by decode ops (features to leave encoded).
  """
  ops = registry.parse(spec, kind)
  fn = registry.compose(ops)
  fn.decode_keys = frozenset(op.key for name, op in ops if name in DECODE_OPS)
  return fn
