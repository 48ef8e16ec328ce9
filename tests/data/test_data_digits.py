"""The offline 'digits' TFDS dataset."""
import collections
import os
import threading

import numpy as np
from sklearn.datasets import load_digits
import tensorflow_datasets as tfds

from vmoe.data import digits


def test_splits_and_contents(digits_data_dir, split_examples):
  builder = tfds.builder('digits', data_dir=digits_data_dir)
  assert builder.is_prepared()
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 1437, 'test': 360}
  assert builder.info.features['label'].num_classes == 10
  train, test = split_examples('train'), split_examples('test')
  assert sum(train.values()) == 1437 and sum(test.values()) == 360
  assert not set(train) & set(test)
  test_labels = collections.Counter(label for _, label in test.elements())
  assert test_labels == {c: 36 for c in range(10)}  # Stratified.
  train_labels = {label for _, label in train}
  assert train_labels == set(range(10))
  # Exactly sklearn's images, rescaled 0..16 -> 0..255 and gray -> RGB.
  sk = load_digits()
  expected = collections.Counter(
      (np.repeat(np.round(img * 255 / 16).astype(np.uint8)[..., None], 3,
                 -1).tobytes(), int(y)) for img, y in zip(sk.images, sk.target))
  assert train + test == expected
  pixels = np.frombuffer(b''.join(img for img, _ in train), np.uint8)
  assert pixels.min() == 0 and pixels.max() == 255


def test_split_is_fixed():
  idx = digits.split_indices()
  # Pinned: the split must not change across numpy / sklearn versions.
  np.testing.assert_array_equal(idx['test'][:8], [6, 14, 18, 22, 26, 32, 36, 38])
  assert len(idx['train']) == 1437 and len(idx['test']) == 360


def test_concurrent_prepare_is_safe(tmp_path):
  data_dir = str(tmp_path)
  errors = []

  def prepare():
    try:
      digits.prepare(data_dir)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=prepare) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert digits.Digits(data_dir=data_dir).is_prepared()
  # No temporary build directory is left behind.
  assert os.listdir(data_dir) == ['digits']
