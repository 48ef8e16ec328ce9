"""Few-shot ridge regression on frozen features, and its config."""
import numpy as np
import pytest

from vmoe.train import fewshot


def test_fewshot_config_errors():
  ok = {'train': {'name': 'digits'}, 'test': {'name': 'digits'}}
  fewshot.check_config(ok)
  for bad, message in [({**ok, 'shot': (1,)}, r"Unknown key\(s\) \['shot'\]"),
                       ({'train': ok['train']}, r'config.fewshot.test is required'),
                       ({**ok, 'shots': (0, 5)}, r'config.fewshot.shots=\(0, 5\)'),
                       ({**ok, 'l2s': (-1.0,)}, r'config.fewshot.l2s=\(-1.0,\)')]:
    with pytest.raises(ValueError, match=message):
      fewshot.check_config(bad)


def test_ridge_fewshot_separates_separable_classes():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 16)) * 4
  ytr, yte = rng.integers(0, 5, 200), rng.integers(0, 5, 100)
  xtr = centers[ytr] + rng.normal(size=(200, 16))
  xte = centers[yte] + rng.normal(size=(100, 16))
  res = fewshot.fewshot_sweep(xtr, ytr, xte, yte, 5, shots=(1, 10))
  assert res['10shot']['accuracy'] > 0.95
  assert set(res['1shot']['by_l2']) == set(res['10shot']['by_l2'])
  idx = fewshot.pick_shots(ytr, 3)
  assert np.bincount(ytr[idx]).tolist() == [3] * 5
