"""Routing analysis on synthetic routings, and a segmenter's tokens by pixel class."""
import json

import jax
import numpy as np
import pytest

from vmoe.evaluate import analysis
from vmoe.nn import models
from vmoe.train import evaluator
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


# A segmenter's tokens: the majority pixel class of their patch.
IGNORE = 255
PIXELS = np.array([[[1, 1, 3, 4],
                    [2, IGNORE, 4, 3],
                    [IGNORE, IGNORE, IGNORE, 0],
                    [IGNORE, IGNORE, IGNORE, IGNORE]]])


def test_patch_labels_majority_ties_and_ignored_pixels():
  # Patches in row-major order: 1 beats 2; 3 and 4 tie (the smaller wins); only ignored
  # pixels (no label); ignored pixels do not count, so 0 wins with one pixel.
  np.testing.assert_array_equal(analysis.patch_labels(PIXELS, (2, 2), IGNORE),
                                [[1, 3, -1, 0]])
  # Patches of whole rows, and a batch: three-way ties of one pixel each.
  two = np.stack([PIXELS[0], PIXELS[0].T])
  np.testing.assert_array_equal(analysis.patch_labels(two, (1, 4), IGNORE),
                                [[1, 2, 0, -1], [1, 1, 3, 0]])
  # Rows and columns past the last whole patch are in no token.
  np.testing.assert_array_equal(analysis.patch_labels(PIXELS[:, :3, :3], (2, 2), IGNORE),
                                [[1]])
  assert (analysis.patch_labels(np.full((2, 4, 4), IGNORE), (2, 2), IGNORE) == -1).all()


def _segmenter_spec(classifier):
  config = dict(name='VisionTransformerMoe', num_classes=5, patch_size=(2, 2),
                hidden_size=8, classifier=classifier, decoder={'name': 'linear'},
                encoder=dict(num_layers=1, mlp_dim=8, num_heads=1))
  return models.resolve(config, image_size=(4, 4))


def test_token_labels_give_the_class_token_none():
  np.testing.assert_array_equal(
      analysis.token_labels(PIXELS, _segmenter_spec('token'), IGNORE), [[-1, 1, 3, -1, 0]])
  np.testing.assert_array_equal(
      analysis.token_labels(PIXELS, _segmenter_spec('gap'), IGNORE), [[1, 3, -1, 0]])


def test_per_token_labels_count_labelled_tokens_by_class():
  stats = analysis.RoutingStats(2, 2)
  # 2 images x 3 tokens (class token, 2 patches); image 1's second patch: ignored pixels.
  labels = np.array([[-1, 0, 1], [-1, 1, -1]])
  experts = np.array([[0, 1, 1, 0, -1, 1]])  # Image 1's first patch is dropped.
  stats.add(_slots(experts, 2), labels, np.array([True, True]))
  s = stats.summary()
  assert s['class_expert_counts'] == [[0, 1], [0, 1]]
  assert s['dropped_fraction'] == 1 / 6  # Unlabelled tokens are routed or dropped too.
  with pytest.raises(ValueError, match=r'labels of shape \(2, 2\) do not match the 2 '
                                       r'images x 3 tokens'):
    stats.add(_slots(experts, 2), labels[:, 1:], np.array([True, True]))


def test_collect_routes_a_segmenter_by_pixel_class():
  """A real segmenter's routing, counted by patch class; the class token and padding
  images in no class."""
  spec = models.resolve(dict(
      name='VisionTransformerMoe', num_classes=5, patch_size=(2, 2), hidden_size=8,
      classifier='token', decoder={'name': 'linear'},
      encoder=dict(num_layers=2, mlp_dim=8, num_heads=1, moe=dict(
          layers=(1,), num_experts=2, group_size=10,
          router=dict(num_selected_experts=1, noise_std=0.0,
                      dispatcher=dict(name='einsum', capacity_factor=2.0))))),
      image_size=(4, 4))
  model = models.build(spec)
  images = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), images)['params']
  batch = {'image': images, 'labels': np.concatenate([PIXELS, PIXELS]),
           '__valid__': np.array([True, False])}
  stats = analysis.collect(
      evaluator.Forward(model, outputs='intermediates'), params, [batch], 5,
      lambda b: analysis.token_labels(b['labels'], spec, IGNORE))
  counts = np.asarray(stats['encoderblock_1'].summary()['class_expert_counts'])
  # Image 0's labelled patches: classes 1, 3 and 0, each to one expert (capacity 2x).
  np.testing.assert_array_equal(counts.sum(axis=1), [1, 1, 0, 1, 0])
  assert stats['encoderblock_1'].tokens == 5
