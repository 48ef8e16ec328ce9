"""Few-shot linear evaluation: closed-form ridge regression on frozen pre-logits.

For each number of shots n, take the first n examples of every class from the train
features (a fixed, seeded order), fit W = (X^T X + l2 I)^-1 X^T Y with Y the one-hot
targets in {-1, 1} and a bias column, and report the test accuracy for every l2 strength.
"""
from typing import Sequence

import numpy as np


def pick_shots(labels: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
  """Indices of `shots` examples of every class (fewer if a class has fewer)."""
  order = np.random.default_rng(seed).permutation(len(labels))
  picked = [order[labels[order] == c][:shots] for c in np.unique(labels)]
  return np.sort(np.concatenate(picked))


def ridge_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                   y_test: np.ndarray, num_classes: int, l2s: Sequence[float]) -> dict:
  """x: [N, D] features, y: [N] int labels -> {l2: test accuracy}."""
  mean = x_train.mean(0, keepdims=True)
  xtr = np.concatenate([x_train - mean, np.ones((len(x_train), 1))], 1).astype(np.float64)
  xte = np.concatenate([x_test - mean, np.ones((len(x_test), 1))], 1).astype(np.float64)
  targets = 2.0 * np.eye(num_classes)[y_train] - 1.0
  gram, rhs = xtr.T @ xtr, xtr.T @ targets
  out = {}
  for l2 in l2s:
    reg = l2 * np.eye(gram.shape[0])
    reg[-1, -1] = 0.0  # Do not shrink the bias.
    w = np.linalg.solve(gram + reg, rhs)
    out[float(l2)] = float(np.mean(np.argmax(xte @ w, 1) == y_test))
  return out


def fewshot_sweep(train_features, train_labels, test_features, test_labels, num_classes,
                  shots: Sequence[int] = (1, 5, 10), l2s: Sequence[float] = tuple(
                      2.0 ** k for k in range(-6, 11, 2)), seed: int = 0) -> dict:
  """{'<n>shot': {'by_l2': {l2: acc}, 'best_l2': l2, 'accuracy': best acc}} for every n."""
  results = {}
  for n in shots:
    idx = pick_shots(train_labels, n, seed)
    by_l2 = ridge_accuracy(train_features[idx], train_labels[idx], test_features,
                           test_labels, num_classes, l2s)
    best = max(by_l2, key=by_l2.get)
    results[f'{n}shot'] = {'by_l2': by_l2, 'best_l2': best, 'accuracy': by_l2[best]}
  return results
