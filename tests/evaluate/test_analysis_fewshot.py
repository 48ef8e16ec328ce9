"""Routing analysis on synthetic routings, and few-shot ridge regression."""
import json

import numpy as np

from vmoe.evaluate import analysis
from vmoe.evaluate import fewshot


def _slots(experts_of_token, e):
  """[G, S] expert ids (-1 = dropped) -> buffer_slot [G, S, E]."""
  slot = -np.ones(experts_of_token.shape + (e,), np.int32)
  g, s = np.nonzero(experts_of_token >= 0)
  slot[g, s, experts_of_token[g, s]] = 0
  return slot


def test_specialised_layer_is_kept_and_random_one_made_dense(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 8)  # 32 images of 4 classes, 2 tokens each.
  valid = np.ones(32, bool)
  spec, rand = analysis.RoutingStats(4, 4), analysis.RoutingStats(4, 4)
  by_class = np.repeat(labels, 2).reshape(4, 16)  # Expert = class: full specialisation.
  spec.add(_slots(by_class, 4), labels, valid)
  rand.add(_slots(rng.integers(0, 4, (4, 16)), 4), labels, valid)
  s_spec, s_rand = spec.summary(), rand.summary()
  np.testing.assert_allclose(s_spec['specialisation'], 1.0)
  assert s_rand['specialisation'] < 0.2
  np.testing.assert_allclose(s_spec['expert_load'], 0.25)
  np.testing.assert_allclose(s_spec['load_entropy'], 1.0)
  rec = analysis.recommend({'encoderblock_1': s_rand, 'encoderblock_3': s_spec})
  assert rec['keep_moe'] == ['encoderblock_3'] and rec['make_dense'] == ['encoderblock_1']
  analysis.plot_layers({'encoderblock_1': s_rand, 'encoderblock_3': s_spec},
                       str(tmp_path / 'routing.png'))
  assert (tmp_path / 'routing.png').stat().st_size > 1000
  analysis.write_json(str(tmp_path / 'routing.json'), rec)
  assert json.loads((tmp_path / 'routing.json').read_text()) == rec


def test_dropped_tokens_and_padding_are_counted_right():
  stats = analysis.RoutingStats(2, 2)
  experts = np.array([[0, -1, 1, 1]])  # Image 0: tokens 0, 1; image 1 (padding): 2, 3.
  stats.add(_slots(experts, 2), np.array([1, 0]), np.array([True, False]))
  s = stats.summary()
  assert s['dropped_fraction'] == 0.5
  assert s['class_expert_counts'] == [[0, 0], [1, 0]]


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
