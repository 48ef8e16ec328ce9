"""Preprocessing ops, the pp-string parser and mixup."""
import numpy as np
import pytest
import tensorflow as tf

from vmoe.data import pp_ops
from vmoe.data import registry

RNG = np.random.RandomState(0)
IMAGE = RNG.randint(0, 256, size=(6, 10, 3)).astype(np.uint8)


def run(spec, data=None, seed=(0, 0), kind='example'):
  data = {'image': IMAGE, 'label': 3} if data is None else data
  fn = pp_ops.get_pp_fn(spec, kind)
  out = fn({k: tf.convert_to_tensor(v) for k, v in data.items()},
           tf.constant(seed, tf.int64))
  return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize('encode', [tf.io.encode_png, tf.io.encode_jpeg, None])
def test_decode(encode):
  image = IMAGE if encode is None else encode(IMAGE).numpy()
  out = run('decode', {'image': image})['image']
  assert out.shape == IMAGE.shape and out.dtype == np.uint8
  if encode is not tf.io.encode_jpeg:  # Lossless or no-op.
    np.testing.assert_array_equal(out, IMAGE)


def test_decode_gray_to_rgb():
  gray = IMAGE[..., :1]
  for image in (gray, tf.io.encode_png(gray).numpy()):
    out = run('decode', {'image': image})['image']
    np.testing.assert_array_equal(out, np.repeat(gray, 3, -1))


def test_resize_and_crops():
  assert run('resize(4)')['image'].shape == (4, 4, 3)
  out = run('resize(4, 6)')['image']
  assert out.shape == (4, 6, 3) and out.dtype == np.uint8
  const = np.full((6, 10, 3), 77, np.uint8)
  np.testing.assert_array_equal(run('resize(3, 5)', {'image': const})['image'],
                                77)
  assert run('resize_small(3)')['image'].shape == (3, 5, 3)
  np.testing.assert_array_equal(run('central_crop(2, 4)')['image'],
                                IMAGE[2:4, 3:7])
  np.testing.assert_array_equal(run('central_crop((2, 4))')['image'],
                                IMAGE[2:4, 3:7])


@pytest.mark.parametrize('op', ['inception_crop(4, area_min=20)',
                                'decode_jpeg_and_inception_crop(4, area_min=20)'])
def test_inception_crops_are_seeded(op):
  outs = [run(op, seed=(0, s))['image'] for s in range(6)]
  assert all(o.shape == (4, 4, 3) and o.dtype == np.uint8 for o in outs)
  np.testing.assert_array_equal(outs[0], run(op, seed=(0, 0))['image'])
  assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_decode_jpeg_and_inception_crop_inputs_agree():
  """Same crop box for an encoded PNG, a JPEG and a decoded image."""
  op = 'decode_jpeg_and_inception_crop(area_min=30)'
  crop = run(op, seed=(1, 2))['image']
  png = run(op, {'image': tf.io.encode_png(IMAGE).numpy()}, (1, 2))['image']
  np.testing.assert_array_equal(crop, png)
  jpeg = run(op, {'image': tf.io.encode_jpeg(IMAGE).numpy()}, (1, 2))['image']
  assert jpeg.shape == crop.shape
  assert crop.size < IMAGE.size or np.array_equal(crop, IMAGE)


def test_flip_lr():
  outs = [run('flip_lr', seed=(0, s))['image'] for s in range(12)]
  flipped = [np.array_equal(o, IMAGE[:, ::-1]) for o in outs]
  assert all(f or np.array_equal(o, IMAGE) for f, o in zip(flipped, outs))
  assert 0 < sum(flipped) < len(outs)
  np.testing.assert_array_equal(outs[3], run('flip_lr', seed=(0, 3))['image'])


def test_value_range():
  image = np.array([[[0, 255, 51]]], np.uint8)
  out = run('value_range(-1, 1)', {'image': image})['image']
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[[-1, 1, -0.6]]], atol=1e-6)
  out = run('value_range(0, 1, 0, 51, clip_values=True)', {'image': image})
  np.testing.assert_allclose(out['image'], [[[0, 1, 1]]])


def test_onehot_and_keep():
  out = run('onehot(5, key="label", key_result="labels")|keep("image", "labels")')
  assert sorted(out) == ['image', 'labels']
  np.testing.assert_array_equal(out['labels'], [0, 0, 0, 1, 0])
  assert out['labels'].dtype == np.float32
  out = run('onehot(4, on=0.9, off=0.1)')  # Defaults: label -> labels.
  np.testing.assert_allclose(out['labels'], [0.1, 0.1, 0.1, 0.9])
  out = run('onehot(4, inkey="label", outkey="y")|keep(["y"])')  # Reference.
  assert list(out) == ['y']
  out = run('onehot(4)', {'label': np.array([0, 2, 2])})
  np.testing.assert_array_equal(out['labels'], [1, 0, 1, 0])
  with pytest.raises(ValueError, match='nope'):
    run('keep("image", "nope")')


def test_mixup_mixes_images_and_labels_alike():
  labels = np.eye(4, dtype=np.float32)
  images = RNG.uniform(size=(4, 3, 3, 3)).astype(np.float32)
  data = {'image': images, 'labels': labels}
  out = run('mixup(0.4)', data, seed=(5, 6), kind='batch')
  lam = out['labels'][0, 0]
  assert 0 < lam < 1
  np.testing.assert_allclose(out['labels'],
                             lam * labels + (1 - lam) * np.roll(labels, 1, 0))
  np.testing.assert_allclose(out['image'],
                             lam * images + (1 - lam) * np.roll(images, 1, 0),
                             rtol=1e-6)
  again = run('mixup(0.4)', data, seed=(5, 6), kind='batch')
  np.testing.assert_array_equal(out['image'], again['image'])
  lams = {run('mixup(0.4)', data, (5, s), kind='batch')['labels'][0, 0]
          for s in range(4)}
  assert len(lams) == 4
  with pytest.raises(ValueError, match='float'):
    run('mixup(0.4)', {'image': IMAGE[None], 'labels': labels[:1]},
        kind='batch')


@pytest.mark.parametrize('spec, match', [
    ('decode|blur(3)', r"Unknown pp op 'blur'.*'decode'.*'value_range'"),
    ('mixup(0.2)', 'batch op'),
    ('resize(size=3, bogus=1)', 'Bad arguments'),
    ('resize(x)', 'literals'),
    ('__import__("os").system("true")', 'Cannot parse'),
    ('resize(3', 'Cannot parse'),
    ('randaug(2, -1)', 'magnitude'),
])
def test_bad_pp_strings(spec, match):
  with pytest.raises(ValueError, match=match):
    pp_ops.get_pp_fn(spec)


def test_parse_op():
  assert registry.parse_op('onehot(10, key="label", on=0.9)') == (
      'onehot', [10], {'key': 'label', 'on': 0.9})
  assert registry.parse_op('flip_lr') == ('flip_lr', [], {})
  assert registry.valid_ops('batch') == ['mixup']
