"""Routing analysis on synthetic routings."""
import json

import numpy as np

from vmoe.evaluate import analysis
from vmoe.utils import files


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
  files.write_json(str(tmp_path / 'routing.json'), rec)
  assert json.loads((tmp_path / 'routing.json').read_text()) == rec


def test_dropped_tokens_and_padding_are_counted_right():
  stats = analysis.RoutingStats(2, 2)
  experts = np.array([[0, -1, 1, 1]])  # Image 0: tokens 0, 1; image 1 (padding): 2, 3.
  stats.add(_slots(experts, 2), np.array([1, 0]), np.array([True, False]))
  s = stats.summary()
  assert s['dropped_fraction'] == 0.5
  assert s['class_expert_counts'] == [[0, 0], [1, 0]]


def test_superclass_by_expert_counts(tmp_path):
  stats = analysis.RoutingStats(4, 2)
  labels = np.array([0, 1, 2, 3])  # Super-classes {0, 2} -> 0 and {1, 3} -> 1.
  experts = np.array([[0, 0, 1, 1, 0, 0, 1, 0]])  # 2 tokens per image.
  stats.add(_slots(experts, 2), labels, np.ones(4, bool))
  s = stats.summary(superclasses=[0, 1, 0, 1])
  assert s['class_expert_counts'] == [[2, 0], [0, 2], [2, 0], [1, 1]]
  assert s['superclass_expert_counts'] == [[4, 0], [1, 3]]
  analysis.plot_superclasses({'encoderblock_3': s}, str(tmp_path / 'sc.png'))
  analysis.plot_summary({'encoderblock_3': s}, str(tmp_path / 'summary.png'))
  assert (tmp_path / 'sc.png').stat().st_size > 1000
  assert (tmp_path / 'summary.png').stat().st_size > 1000
