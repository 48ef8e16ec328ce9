"""Joint image / segmentation-mask preprocessing ops (TF) for pp strings.

A segmentation example holds an image [H, W, 3] (key 'image') and a mask
[H, W, 1] of integer class ids (key 'segmentation_mask', uint8 as TFDS decodes
PNG masks). Joint ops transform both with the SAME geometry (the same scale,
crop window and flip); the image is resampled with `method`, the mask always
with nearest neighbour, so no pixel gets a class that none of its source
pixels had. Mask pixels equal to IGNORE (255) are ignored by the loss and the
metrics: padding writes them, and the remap tables send unknown values there.

Joint ops (keyword arguments image_key='image', mask_key='segmentation_mask'):
  seg_resize(h, w=None, method='bilinear')     both resized to [h, w].
  seg_random_scale_crop(size, scale_min=0.5, scale_max=2.0, ignore_label=255,
      method='bilinear')   both rescaled by one factor drawn uniformly from
      [scale_min, scale_max], padded bottom/right to at least `size` (image 0,
      mask ignore_label), then one random size x size (or (h, w)) window of
      both is kept.
  seg_flip_lr                                  both flipped left-right, p=1/2.
  seg_pad(h, w=None, ignore_label=255)         both padded bottom/right to
      [h, w] (image 0, mask ignore_label); a larger input is an error.
Mask ops (key='segmentation_mask', key_result=None: the same key):
  seg_remap(table)    mask values mapped through a named table or an explicit
      list (value v -> table[v]) or dict ({v: new}); values the table does not
      name become 255. Every table keeps 255 as 255. Named tables:
        'oxford_iiit_pet': trimap 1 (pet) -> 1, 2 (background) -> 0,
                           3 (border, unclassified) -> 255.  2 classes.
        'ade20k':          0 (other / unlabelled) -> 255, c -> c - 1 for
                           c in 1..150 (the standard reduce-zero-label). 150.
        'cityscapes':      the 34 label ids (gtFine_labelIds) -> the 19
                           train ids (road 7 -> 0, ..., bicycle 33 -> 18),
                           the other ids -> 255.  19 classes.
  mask_channel(c)     keeps channel c of a multi-channel mask: [H, W, C] ->
      [H, W, 1].
  seg_labels(ignore_label=255, key='segmentation_mask', key_result='labels')
      the mask uint8 [H, W, 1] -> int32 [H, W] under key_result; mask value
      255 becomes ignore_label; the mask key itself is dropped.
The image-only `value_range` (pp_ops) scales the image and leaves the mask.
Random ops draw from the stateless seed they get, like every pp op. An op
whose image or mask key is not in the example raises a ValueError naming the
key and the example's keys when the pipeline is built (before any model).

Datasets (TFDS; build them with `tfds build NAME --data_dir=DIR`, ade20k with
its own command; a dataset that is not prepared is the pipeline's 'not
prepared' error, which gives the command). End the real datasets' pp strings
with keep("image", "labels"): their other features (strings, boxes, the raw
mask) are not model inputs.

  digit_scenes (digit_scenes.py, built on first use; 11 classes,
  'segmentation_mask' uint8 [32, 32, 1]; splits train 4000 / test 500):
    train 'decode|seg_random_scale_crop(32, 0.75, 1.25)|seg_flip_lr|'
          'value_range(-1, 1)|seg_labels'
    eval  'decode|value_range(-1, 1)|seg_labels'

  oxford_iiit_pet ('segmentation_mask' uint8 [H, W, 1] trimaps 1/2/3; splits
  train 3680 / test 3669) -> 2 classes {0: background, 1: pet}:
    train 'decode|seg_remap("oxford_iiit_pet")|seg_resize(256)|'
          'seg_random_scale_crop(224, 0.5, 2.0)|seg_flip_lr|'
          'value_range(-1, 1)|seg_labels|keep("image", "labels")'
    eval  'decode|seg_remap("oxford_iiit_pet")|seg_resize(224)|'
          'value_range(-1, 1)|seg_labels|keep("image", "labels")'

  ade20k (ade20k.py: the 150-class ADE20K benchmark, MIT SceneParsing's
  ADEChallengeData2016.zip, a manual download, prepared with `python -m
  vmoe.data.ade20k --manual_dir=DIR --data_dir=DIR`; 'image' [H, W, 3] of
  varying sizes, 'segmentation_mask' uint8 [H, W, 1]: 0 other / unlabelled,
  1..150 the classes; splits train 20,210 / validation 2,000) -> 150 classes
  (ade20k.CLASS_NAMES), 0 ignored:
    train 'decode|seg_remap("ade20k")|seg_resize(512)|'
          'seg_random_scale_crop(512, 0.5, 2.0)|seg_flip_lr|'
          'value_range(-1, 1)|seg_labels|keep("image", "labels")'
    eval  'decode|seg_remap("ade20k")|seg_resize(512)|'
          'value_range(-1, 1)|seg_labels|keep("image", "labels")'
  seg_resize(512) makes every image square first, so that the scale range
  means the same for all sizes (and eval batches stack); it distorts the
  aspect ratio. The usual protocol (e.g. mmsegmentation's) keeps it: short
  side to 512 (long side at most 2048) before the random scale and crop, and
  scores at each image's own size; that needs a joint short-side resize op,
  which seg_ops does not have. So scores from these strings are not
  comparable with published ADE20K mIoUs.

  scene_parse150: NOT the 150-class ADE20K semantic benchmark. TFDS 4.9
  builds it from the Places Challenge 2017 files images.tar and
  annotations_instance.tar: the ADE20K challenge images (train 20,210; its
  'test' split is the 2,000 validation images) with the INSTANCE annotations.
  'annotation' is an RGB PNG whose R channel is the category of 100 object
  ('thing') classes, numbered 1..100 in the challenge's own order
  (instanceInfo100: 1 bed, 2 windowpane, 3 cabinet, 4 person, ..., 100 flag;
  not the 150-class ids), 0 where no instance is (all stuff: wall, floor, sky,
  road, ..., and unlabelled pixels), and whose G channel is an instance id
  (no class meaning: never train on it). So take channel 0, and either keep 0
  as a class (101 classes: 0 'no object', 1..100 the objects):
    train 'decode|mask_channel(0, key="annotation",'
          ' key_result="segmentation_mask")|seg_resize(512)|'
          'seg_random_scale_crop(512, 0.5, 2.0)|seg_flip_lr|'
          'value_range(-1, 1)|seg_labels|keep("image", "labels")'
    eval  'decode|mask_channel(0, key="annotation",'
          ' key_result="segmentation_mask")|seg_resize(512)|'
          'value_range(-1, 1)|seg_labels|keep("image", "labels")'
  or add seg_remap("ade20k") after mask_channel for 100 object classes
  (0..99) with every stuff pixel ignored. For the 150-class benchmark use
  ade20k (above).

  cityscapes (config 'semantic_segmentation', manual download of
  leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip; 'image_left'
  [1024, 2048, 3], 'segmentation_label' [1024, 2048, 1] label ids; splits
  train 2975 / validation 500 / test 1525, whose labels are withheld:
  evaluate on 'validation') -> 19 classes:
    train 'decode(key="image_left", key_result="image")|'
          'seg_remap("cityscapes", key="segmentation_label",'
          ' key_result="segmentation_mask")|'
          'seg_random_scale_crop((512, 1024), 0.25, 1.0)|seg_flip_lr|'
          'value_range(-1, 1)|seg_labels|keep("image", "labels")'
    eval  'decode(key="image_left", key_result="image")|'
          'seg_remap("cityscapes", key="segmentation_label",'
          ' key_result="segmentation_mask")|seg_resize(512, 1024)|'
          'value_range(-1, 1)|seg_labels|keep("image", "labels")'
Train and eval strings give the same size, so the model's patch grid is the
same in both. Evaluating at a resized resolution scores the resized (nearest)
labels, not the original ones.
"""
import functools
import inspect

import numpy as np
import tensorflow as tf

from vmoe.data import image_utils
from vmoe.data.registry import keyed, register

IGNORE = 255
IMAGE_KEY = 'image'
MASK_KEY = 'segmentation_mask'
# Cityscapes label ids of the 19 evaluated classes, in train-id order (road,
# sidewalk, building, wall, fence, pole, traffic light, traffic sign,
# vegetation, terrain, sky, person, rider, car, truck, bus, train, motorcycle,
# bicycle).
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26,
                        27, 28, 31, 32, 33)
ADE20K_CLASSES = 150
# {mask value: class}; every value not named (255 aside) becomes IGNORE.
REMAP_TABLES = {
    'oxford_iiit_pet': {1: 1, 2: 0},
    'ade20k': {c: c - 1 for c in range(1, ADE20K_CLASSES + 1)},
    'cityscapes': {label_id: train_id
                   for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS)},
}


def _read(data, op: str, keys: dict[str, str]) -> list[tf.Tensor]:
  """[data[key] for each key of keys ({argument name: key})]."""
  missing = {arg: k for arg, k in keys.items() if k not in data}
  if missing:
    named = ', '.join(f'{arg}={k!r}' for arg, k in missing.items())
    raise ValueError(f'{op} reads {named}, but the example only has keys '
                     f'{sorted(data)}: pass the key of the example\'s '
                     f'feature (e.g. {op}(..., {next(iter(missing))}="...")).')
  return [data[k] for k in keys.values()]


def _check_mask(mask: tf.Tensor, op: str, key: str):
  if not mask.dtype.is_integer or mask.shape.rank != 3:
    raise ValueError(f'{op}: the mask {key!r} must be an integer tensor '
                     f'[H, W, C], got {mask.dtype.name} {mask.shape}.')


def _check_ignore(ignore_label, op: str):
  if not (isinstance(ignore_label, int) and 0 <= ignore_label <= 255):
    raise ValueError(f'{op}(ignore_label={ignore_label!r}): the mask is '
                     f'uint8, so the ignore label must be an int in 0..255 '
                     f'(default {IGNORE}).')


def joint(factory):
  """Lifts a factory of f(image, mask, seed) -> (image, mask) to one of
  f(data, seed) -> data that takes two extra keyword arguments, image_key
  ('image') and mask_key ('segmentation_mask'), and writes both back."""

  @functools.wraps(factory)
  def joint_factory(*args, image_key=IMAGE_KEY, mask_key=MASK_KEY, **kwargs):
    f = factory(*args, **kwargs)
    op = factory.__name__

    def apply(data, seed):
      image, mask = _read(data, op, {'image_key': image_key,
                                     'mask_key': mask_key})
      _check_mask(mask, op, mask_key)
      same = tf.debugging.assert_equal(
          tf.shape(image)[:2], tf.shape(mask)[:2],
          message=f'{op}: {image_key!r} and {mask_key!r} differ in size')
      with tf.control_dependencies([same]):
        image = tf.identity(image)
      image, mask = f(image, mask, seed)
      return {**data, image_key: image, mask_key: mask}

    return apply

  sig = inspect.signature(factory)
  extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
           for n, d in (('image_key', IMAGE_KEY), ('mask_key', MASK_KEY))]
  joint_factory.__signature__ = sig.replace(
      parameters=[*sig.parameters.values(), *extra])
  return joint_factory


def _resize_both(image, mask, size, method):
  return (image_utils.resize(image, size, method),
          image_utils.resize(mask, size, 'nearest'))


def _pad_both(image, mask, size, ignore_label):
  """Pads image (0) and mask (ignore_label) bottom/right to size [2] >= theirs."""
  grow = size - tf.shape(image)[:2]
  paddings = tf.stack([[0, grow[0]], [0, grow[1]], [0, 0]])
  return (tf.pad(image, paddings),
          tf.pad(mask, paddings, constant_values=tf.cast(ignore_label,
                                                         mask.dtype)))


@register('seg_resize')
@joint
def seg_resize(h, w=None, method='bilinear'):
  """Resizes image (with `method`) and mask (nearest) to [h, w]; dtypes kept."""
  size = image_utils.hw(h, w)
  return lambda image, mask, seed: _resize_both(image, mask, size, method)


@register('seg_random_scale_crop')
@joint
def seg_random_scale_crop(size, scale_min=0.5, scale_max=2.0,
                          ignore_label=IGNORE, method='bilinear'):
  """Random rescale in [scale_min, scale_max], pad, and one random crop of both."""
  h, w = image_utils.hw(size)
  _check_ignore(ignore_label, 'seg_random_scale_crop')
  if not 0 < scale_min <= scale_max:
    raise ValueError(f'seg_random_scale_crop needs 0 < scale_min <= '
                     f'scale_max, got {scale_min}, {scale_max}.')

  def f(image, mask, seed):
    s_scale, s_y, s_x = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    scale = tf.random.stateless_uniform([], s_scale, scale_min, scale_max)
    scaled = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * scale),
                     tf.int32)
    image, mask = _resize_both(image, mask, tf.maximum(scaled, 1), method)
    image, mask = _pad_both(image, mask, tf.maximum(scaled, [h, w]),
                            ignore_label)
    dy = tf.random.stateless_uniform([], s_y, 0, tf.shape(image)[0] - h + 1,
                                     tf.int32)
    dx = tf.random.stateless_uniform([], s_x, 0, tf.shape(image)[1] - w + 1,
                                     tf.int32)
    crop = lambda x: tf.ensure_shape(x[dy:dy + h, dx:dx + w],
                                     [h, w, x.shape[-1]])
    return crop(image), crop(mask)

  return f


@register('seg_flip_lr')
@joint
def seg_flip_lr():
  """Flips image and mask left-right together, with probability 1/2."""

  def f(image, mask, seed):
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.cond(flip, lambda: (image[:, ::-1], mask[:, ::-1]),
                   lambda: (image, mask))

  return f


@register('seg_pad')
@joint
def seg_pad(h, w=None, ignore_label=IGNORE):
  """Pads image (0) and mask (ignore_label) bottom/right to [h, w]."""
  size = image_utils.hw(h, w)
  _check_ignore(ignore_label, 'seg_pad')

  def f(image, mask, seed):
    too_big = tf.debugging.assert_less_equal(
        tf.shape(image)[:2], size,
        message=f'seg_pad{size}: the image is larger than the padded size; '
        f'resize or crop it first')
    with tf.control_dependencies([too_big]):
      image, mask = _pad_both(image, mask, tf.constant(size), ignore_label)
    return (tf.ensure_shape(image, [*size, image.shape[-1]]),
            tf.ensure_shape(mask, [*size, mask.shape[-1]]))

  return f


def remap_table(table) -> np.ndarray:
  """A table name, list or dict -> uint8 [256]: new value of each mask value."""
  if isinstance(table, str):
    if table not in REMAP_TABLES:
      raise ValueError(f'seg_remap({table!r}): unknown table; named tables: '
                       f'{sorted(REMAP_TABLES)}, or pass a list / dict.')
    table = REMAP_TABLES[table]
  elif isinstance(table, (list, tuple)):
    table = dict(enumerate(table))
  if not isinstance(table, dict):
    raise ValueError(f'seg_remap(table={table!r}) must be a table name, a '
                     f'list (value v -> table[v]) or a dict {{v: new}}.')
  out = np.full(256, IGNORE, np.uint8)
  for v, new in table.items():
    if not all(isinstance(x, int) and 0 <= x <= 255 for x in (v, new)):
      raise ValueError(f'seg_remap: entry {v!r} -> {new!r} must map a uint8 '
                       f'value to a uint8 value (0..255).')
    out[v] = new
  out[IGNORE] = IGNORE
  return out


@register('seg_remap')
@keyed(MASK_KEY)
def seg_remap(table):
  """Maps the uint8 mask values through `table` (see remap_table)."""
  lookup = tf.constant(remap_table(table))

  def f(mask, seed):
    if mask.dtype != tf.uint8:
      raise ValueError(f'seg_remap maps uint8 masks, got {mask.dtype.name}.')
    return tf.gather(lookup, tf.cast(mask, tf.int32))

  return f


@register('mask_channel')
@keyed(MASK_KEY)
def mask_channel(c):
  """[H, W, C] -> [H, W, 1]: channel c (e.g. scene_parse150's R: the class)."""

  def f(mask, seed):
    channels = mask.shape[-1]
    if mask.shape.rank != 3 or (channels is not None and not 0 <= c < channels):
      raise ValueError(f'mask_channel({c}) needs a mask [H, W, C] with C > '
                       f'{c}, got shape {mask.shape}.')
    return mask[..., c:c + 1]

  return f


@register('seg_labels')
def seg_labels(ignore_label=IGNORE, key=MASK_KEY, key_result='labels'):
  """The mask [H, W, 1] -> int32 labels [H, W] under key_result (mask dropped).

  Mask value 255 becomes ignore_label, so the labels can carry the ignore
  label the loss uses.
  """
  if not isinstance(ignore_label, int):
    raise ValueError(f'seg_labels(ignore_label={ignore_label!r}) must be an '
                     f'int (the loss\'s ignore label; default {IGNORE}).')

  def f(data, seed):
    mask, = _read(data, 'seg_labels', {'key': key})
    _check_mask(mask, 'seg_labels', key)
    if mask.shape[-1] != 1:
      raise ValueError(f'seg_labels needs a 1-channel mask {key!r} [H, W, 1], '
                       f'got {mask.shape}: pick the class channel with '
                       f'mask_channel(c) first.')
    labels = tf.cast(mask[..., 0], tf.int32)
    labels = tf.where(labels == IGNORE, ignore_label, labels)
    out = {k: v for k, v in data.items() if k != key}
    return {**out, key_result: labels}

  return f
