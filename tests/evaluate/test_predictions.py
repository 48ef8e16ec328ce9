"""predictions.png / predictions.json of a segmenter, on a stand-in model."""
import json
import os

import numpy as np
import pytest

from vmoe.evaluate import predictions

IGNORE, C = 255, 4


def _batches(rng, valid):
  """Eval batches of 3 images 8x8 in [-1, 1], random labels with some ignored pixels."""
  out = []
  for v in valid:
    labels = rng.integers(0, C, (3, 8, 8)).astype(np.int32)
    labels[:, :2, :2] = IGNORE
    out.append({'image': rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32),
                'labels': labels, '__valid__': np.array(v)})
  return out


def _one_hot(labels):
  return (labels[..., None] == np.arange(C)).astype(np.float32)


def test_write_png_and_json_of_the_first_real_examples(tmp_path):
  rng = np.random.default_rng(0)
  batches = _batches(rng, [[True] * 3, [True, False, False]])
  random = lambda images: rng.normal(size=images.shape[:3] + (C,)).astype(np.float32)
  out = predictions.write(random, None, batches, str(tmp_path), 6, ignore_label=IGNORE,
                          class_names=['bg', 'a', 'b', 'c'], title='stand-in')
  assert out['png'] == str(tmp_path / 'predictions.png')
  assert os.path.getsize(out['png']) > 1000
  examples = json.loads((tmp_path / 'predictions.json').read_text())
  assert examples == out['examples']
  assert [e['index'] for e in examples] == [0, 1, 2, 3]  # Padding examples are not shown.
  assert all(0 <= e['pixel_accuracy'] <= 1 and 0 <= e['miou'] <= 1 for e in examples)
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]  # Written atomically.


def test_per_image_metrics():
  rng = np.random.default_rng(1)
  batch = _batches(rng, [[True] * 3])[0]
  batch['labels'][2] = IGNORE  # An image with no counted pixel.
  # evaluator.Forward's signature: (params, images) -> (logits, intermediates).
  perfect = lambda params, images: (_one_hot(batch['labels']), {})
  images, labels, logits = predictions.first_examples(perfect, {}, [batch], 2)
  assert images.shape == (2, 8, 8, 3) and labels.shape == (2, 8, 8)
  assert logits.shape == (2, 8, 8, C)
  got = [predictions.image_metrics(logits.argmax(-1)[i], labels[i], C, IGNORE) for i in range(2)]
  assert got == [{'pixel_accuracy': 1.0, 'miou': 1.0}] * 2
  # Half the counted pixels of class 0 predicted as class 1: IoU(0) = 1/2, IoU(1) = 0.
  truth = np.array([[0, 0, IGNORE, IGNORE]])
  m = predictions.image_metrics(np.array([[0, 1, 1, 1]]), truth, C, IGNORE)
  assert m == {'pixel_accuracy': 0.5, 'miou': 0.25}
  assert predictions.image_metrics(np.zeros((8, 8), int), batch['labels'][2], C, IGNORE) == {
      'pixel_accuracy': None, 'miou': None}


def test_palette_is_fixed_and_ignore_is_black():
  colours = predictions.palette(150)
  assert np.array_equal(colours, predictions.palette(150))
  assert len({tuple(c) for c in colours[:20]}) == 20 and colours.max(axis=1).min() > 0
  mask = np.array([[0, 1], [IGNORE, 3]])
  rgb = predictions.colour(mask, C, IGNORE)
  assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
  np.testing.assert_array_equal(rgb[1, 0], [0, 0, 0])
  np.testing.assert_array_equal(rgb[0, 1], colours[1])


def test_bad_num_and_empty_split(tmp_path):
  with pytest.raises(ValueError, match='num=0 must be at least 1'):
    predictions.write(lambda x: x, None, [], str(tmp_path), 0)
  with pytest.raises(ValueError, match='yielded no example'):
    predictions.write(lambda x: x, None, [], str(tmp_path), 2)
