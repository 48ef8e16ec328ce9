"""Few-shot linear evaluation: closed-form ridge regression on frozen pre-logits.

For each number of shots n, take the first n examples of every class from the train
features (a fixed, seeded order), fit W = (X^T X + l2 I)^-1 X^T Y with Y the one-hot
targets in {-1, 1} and a bias column, and report the test accuracy for every l2 strength.
"""
from typing import Any, Mapping, Sequence

import numpy as np

from vmoe.nn import models
from vmoe.nn import spec as spec_lib
from vmoe.train import evaluator
from vmoe.utils import checks
from vmoe.utils import files

DEFAULT_SHOTS = (1, 5, 10)
DEFAULT_L2S = tuple(2.0 ** k for k in range(-6, 11, 2))


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
                  shots: Sequence[int] = DEFAULT_SHOTS,
                  l2s: Sequence[float] = DEFAULT_L2S, seed: int = 0) -> dict:
  """{'<n>shot': {'by_l2': {l2: acc}, 'best_l2': l2, 'accuracy': best acc}} for every n."""
  results = {}
  for n in shots:
    idx = pick_shots(train_labels, n, seed)
    by_l2 = ridge_accuracy(train_features[idx], train_labels[idx], test_features,
                           test_labels, num_classes, l2s)
    best = max(by_l2, key=by_l2.get)
    results[f'{n}shot'] = {'by_l2': by_l2, 'best_l2': best, 'accuracy': by_l2[best]}
  return results


CONFIG_KEYS = frozenset({'every_steps', 'train', 'test', 'shots', 'l2s', 'seed'})


def check_config(cfg: Mapping[str, Any], where: str = 'config.fewshot'):
  """One ValueError for a bad few-shot config (keys, shots, l2s, datasets given; the
  datasets themselves are checked with the run's other datasets)."""
  checks.check_keys(cfg, CONFIG_KEYS, where)
  checks.positive_int(cfg.get('every_steps'), f'{where}.every_steps', optional=True)
  for split in ('train', 'test'):
    if not cfg.get(split):
      raise ValueError(f'{where}.{split} is required: a dataset config (name, split, '
                       'process, batch_size) of the data to fit / score the linear probe.')
  shots = cfg.get('shots', DEFAULT_SHOTS)
  if not shots or any(not isinstance(n, int) or n < 1 for n in shots):
    raise ValueError(f'{where}.shots={shots!r} must be positive integers, e.g. (1, 5, 10).')
  l2s = cfg.get('l2s', DEFAULT_L2S)
  if not l2s or any(not isinstance(x, (int, float)) or x < 0 for x in l2s):
    raise ValueError(f'{where}.l2s={l2s!r} must be non-negative numbers.')


def features(forward, params, iterable) -> tuple[np.ndarray, np.ndarray]:
  """(x [N, D] frozen features, y [N] class ids) of the valid examples of `iterable`."""
  xs, ys = [], []
  for batch, out, _ in forward.batches(params, iterable):
    valid = batch['__valid__'].astype(bool)
    xs.append(out[valid])
    ys.append(evaluator.labels_of(batch)[valid])
  return np.concatenate(xs).astype(np.float64), np.concatenate(ys)


class FewshotEvaluator:
  """Few-shot linear accuracy of a model's pre-logits (the head is ignored), for any
  params of that model: called every `every_steps` in training, and by vmoe.evaluate.

  spec: the model, resolved for the images of `train` and `test`, the eval iterables
  (vmoe.data.pipeline.make_eval_iterable) to draw the shots from and to score on.
  cfg: config.fewshot ({'shots': (1, 5, 10), 'l2s': ridge strengths, 'seed': order of
  the shots, ...}).
  """

  def __init__(self, spec: spec_lib.ModelSpec, cfg: Mapping[str, Any], train, test):
    self.num_classes = spec.num_classes
    self.forward = evaluator.Forward(models.build(spec), outputs='pre_logits')
    self.train, self.test = train, test
    self.shots = tuple(cfg.get('shots') or DEFAULT_SHOTS)
    self.l2s = tuple(cfg.get('l2s') or DEFAULT_L2S)
    self.seed = cfg.get('seed', 0)

  def __call__(self, params) -> dict:
    x_train, y_train = features(self.forward, params, self.train)
    x_test, y_test = features(self.forward, params, self.test)
    return fewshot_sweep(x_train, y_train, x_test, y_test, self.num_classes,
                         shots=self.shots, l2s=self.l2s, seed=self.seed)


def scalars(results: Mapping[str, Any]) -> dict[str, float]:
  """{'fewshot/5shot': best accuracy, ...} for metric writers."""
  return {f'fewshot/{k}': v['accuracy'] for k, v in results.items()}


def plot(results: Mapping[str, Any], path: str):
  """PNG: accuracy against the ridge strength, one line per number of shots."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in results.items():
    l2s = sorted(r['by_l2'], key=float)
    ax.plot([float(x) for x in l2s], [100 * r['by_l2'][x] for x in l2s], 'o-',
            label=f'{name} (best {100 * r["accuracy"]:.1f}%)')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('ridge L2 strength')
  ax.set_ylabel('test accuracy (%)')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  files.save_figure(fig, path)
