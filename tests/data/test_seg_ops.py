"""Joint image / segmentation-mask pp ops: image and mask stay aligned, remap tables,
mask channels, labels, and the errors of bad keys and arguments."""
import numpy as np
import pytest
import tensorflow as tf

from vmoe.data import pp_ops
from vmoe.data import registry
from vmoe.data import seg_ops

RNG = np.random.RandomState(0)
SEEDS = range(24)


def run(spec, data, seed=(0, 0)):
  fn = pp_ops.get_pp_fn(spec)
  out = fn({k: tf.convert_to_tensor(v) for k, v in data.items()}, tf.constant(seed, tf.int64))
  return {k: v.numpy() for k, v in out.items()}


def encoded(h, w, block=1):
  """An example whose image encodes its mask: R = 10 + 20 * class (never 0, the pad
  value), G and B random. Classes 0..9 per pixel (block=1) or per block x block square."""
  mask = RNG.randint(0, 10, size=(-(-h // block), -(-w // block)))
  mask = np.kron(mask, np.ones((block, block), int))[:h, :w, None].astype(np.uint8)
  image = RNG.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
  image[..., 0] = 10 + 20 * mask[..., 0]
  return {'image': image, 'segmentation_mask': mask}


def decode_mask(image):
  """The mask an (output) image encodes; -1 where it encodes none."""
  r = image[..., 0].astype(int)
  return np.where((r - 10) % 20 == 0, (r - 10) // 20, -1)


def assert_aligned(out):
  image, mask = out['image'], out['segmentation_mask'][..., 0]
  pad = mask == seg_ops.IGNORE
  np.testing.assert_array_equal(decode_mask(image)[~pad], mask[~pad])
  assert (image[pad] == 0).all()  # Padding is padding in both.


@pytest.mark.parametrize('spec, shape', [
    ('seg_random_scale_crop(16, 0.5, 2.0, method="nearest")|seg_flip_lr', (16, 16)),
    ('seg_random_scale_crop((12, 20), 0.3, 1.5, method="nearest")', (12, 20)),
    ('seg_flip_lr|seg_resize(13, 17, method="nearest")|seg_pad(20, 24)', (20, 24)),
    ('seg_resize(31, method="nearest")|seg_random_scale_crop(24, method="nearest")|'
     'seg_flip_lr', (24, 24)),
])
def test_joint_ops_keep_image_and_mask_aligned(spec, shape):
  data = encoded(21, 27)
  outs = [run(spec, data, seed=(1, s)) for s in SEEDS]
  for out in outs:
    assert out['image'].shape == (*shape, 3) and out['image'].dtype == np.uint8
    assert out['segmentation_mask'].shape == (*shape, 1)
    assert out['segmentation_mask'].dtype == np.uint8
    assert_aligned(out)
  images = {o['image'].tobytes() for o in outs}
  assert len(images) > (1 if 'seg_random' not in spec else len(outs) // 2)  # Random.
  again = run(spec, data, seed=(1, SEEDS[3]))['image']
  np.testing.assert_array_equal(again, outs[3]['image'])  # Seeded.


def test_random_scale_crop_pads_when_small_and_flip_flips_both():
  data = encoded(10, 10)
  small = run('seg_random_scale_crop(16, 0.5, 0.9, method="nearest")', data)
  assert (small['segmentation_mask'] == 255).any() and (small['image'] == 0).any()
  assert_aligned(small)
  flips = [run('seg_flip_lr', data, seed=(0, s)) for s in SEEDS]
  flipped = [np.array_equal(o['image'], data['image'][:, ::-1]) for o in flips]
  for f, o in zip(flipped, flips):
    ref = data['segmentation_mask'][:, ::-1] if f else data['segmentation_mask']
    np.testing.assert_array_equal(o['segmentation_mask'], ref)
  assert 0 < sum(flipped) < len(flips)


def test_bilinear_image_nearest_mask():
  """The default (bilinear) image resampling agrees with the mask inside its regions,
  and the mask only takes values it had (nearest neighbour)."""
  data = encoded(24, 24, block=6)
  for spec in ('seg_resize(40, 36)', 'seg_random_scale_crop(20, 1.0, 2.0)'):
    for s in SEEDS[:6]:
      out = run(spec, data, seed=(2, s))
      mask = out['segmentation_mask'][..., 0]
      assert set(np.unique(mask)) <= set(np.unique(data['segmentation_mask']))
      assert (decode_mask(out['image']) == mask).mean() > 0.6


def test_ops_read_and_write_their_keys():
  data = encoded(8, 8)
  data = {'x': data['image'], 'm': data['segmentation_mask'], 'label': 3}
  out = run('seg_resize(4, method="nearest", image_key="x", mask_key="m")|'
            'seg_pad(5, image_key="x", mask_key="m")|value_range(0, 1, key="x")', data)
  assert sorted(out) == ['label', 'm', 'x'] and out['x'].shape == (5, 5, 3)
  assert out['x'].dtype == np.float32 and out['m'].dtype == np.uint8  # value_range: image only.


@pytest.mark.parametrize('spec', ['seg_flip_lr', 'seg_resize(4)', 'seg_labels',
                                  'seg_remap("ade20k")', 'mask_channel(0)'])
def test_missing_mask_key_is_one_clear_error(spec):
  with pytest.raises(ValueError, match=r"'segmentation_mask'.*\['annotation', 'image'\]"):
    run(spec, {'image': np.zeros((4, 4, 3), np.uint8),
               'annotation': np.zeros((4, 4, 3), np.uint8)})


@pytest.mark.parametrize('table, values, expected', [
    ('oxford_iiit_pet', [0, 1, 2, 3, 4, 255], [255, 1, 0, 255, 255, 255]),
    ('ade20k', [0, 1, 2, 150, 151, 255], [255, 0, 1, 149, 255, 255]),
    ('cityscapes', [0, 6, 7, 8, 11, 26, 31, 33, 34, 255],
     [255, 255, 0, 1, 2, 13, 16, 18, 255, 255]),
    ([4, 5], [0, 1, 2, 255], [4, 5, 255, 255]),
    ({3: 0, 9: 1}, [3, 9, 0, 255], [0, 1, 255, 255]),
])
def test_remap(table, values, expected):
  mask = np.array(values, np.uint8).reshape(1, -1, 1)
  out = run(f'seg_remap({table!r})', {'segmentation_mask': mask})['segmentation_mask']
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out.ravel(), expected)


def test_cityscapes_table_has_the_19_train_ids():
  table = seg_ops.remap_table('cityscapes')
  assert sorted(table[table != 255]) == list(range(19))
  assert sum(table[:34] != 255) == 19


def test_mask_channel_and_labels():
  annotation = np.stack([np.full((3, 4), 7), np.full((3, 4), 200), np.zeros((3, 4))], -1)
  data = {'image': np.zeros((3, 4, 3), np.uint8), 'annotation': annotation.astype(np.uint8)}
  out = run('mask_channel(0, key="annotation", key_result="segmentation_mask")|seg_labels', data)
  assert sorted(out) == ['annotation', 'image', 'labels']  # The mask moved to 'labels'.
  assert out['labels'].dtype == np.int32 and out['labels'].shape == (3, 4)
  assert (out['labels'] == 7).all()
  mask = np.array([[0, 3, 255]], np.uint8)[..., None]
  out = run('seg_labels(ignore_label=-1, key_result="y")', {'segmentation_mask': mask})
  np.testing.assert_array_equal(out['y'], [[0, 3, -1]])
  with pytest.raises(ValueError, match=r'mask_channel\(3\)'):
    run('mask_channel(3, key="annotation")', data)
  with pytest.raises(ValueError, match=r'1-channel.*mask_channel'):
    run('seg_labels(key="annotation")', data)


@pytest.mark.parametrize('spec, match', [
    ('seg_random_scale_crop(8, 2.0, 1.0)', 'scale_min <= scale_max'),
    ('seg_random_scale_crop(8, ignore_label=300)', 'ignore label must be an int in 0..255'),
    ('seg_pad(8, ignore_label=-1)', 'ignore label'),
    ('seg_remap("voc")', r"unknown table.*'ade20k'"),
    ('seg_remap([0, 256])', 'uint8'),
    ('seg_remap(3)', 'table name, a list'),
    ('seg_labels(ignore_label=0.5)', 'must be an int'),
    ('seg_resize(4, bogus=1)', 'Bad arguments'),
])
def test_bad_arguments(spec, match):
  with pytest.raises(ValueError, match=match):
    run(spec, encoded(4, 4))


def test_runtime_errors():
  with pytest.raises(tf.errors.InvalidArgumentError, match='larger than the padded size'):
    run('seg_pad(3)', encoded(4, 4))
  data = encoded(4, 4)
  data['segmentation_mask'] = data['segmentation_mask'][:3]
  with pytest.raises(tf.errors.InvalidArgumentError, match='differ in size'):
    run('seg_flip_lr', data)
  with pytest.raises(ValueError, match='uint8'):
    run('seg_remap("ade20k")', {'segmentation_mask': np.zeros((2, 2, 1), np.int32)})


def test_ops_are_registered():
  names = {'seg_resize', 'seg_random_scale_crop', 'seg_flip_lr', 'seg_pad', 'seg_remap',
           'mask_channel', 'seg_labels'}
  assert names <= set(registry.valid_ops('example'))
