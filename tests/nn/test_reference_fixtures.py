"""The fixtures written by google-research/vmoe: same logits, routing and metrics."""
import json
import os

import numpy as np
import pytest

import jax

import vmoe
from vmoe.checkpoints import legacy
from vmoe.nn import models

pytestmark = pytest.mark.xla_defaults

FIXTURES = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'vmoe_reference')
# (name, suffix of the override run); the override config is `eval_override_model_kwargs`.
CASES = [('vmoe_tiny_token', 'cf0.5_bpr'), ('vmoe_tiny_gap_ec', 'cf0.5')]


def _path(name):
  return os.path.join(FIXTURES, name)


def _runs(name, suffix):
  config = json.load(open(_path(f'{name}_config.json')))
  return [('base', config['model_kwargs'], f'{name}_logits.npy'),
          (suffix, config['eval_override_model_kwargs'], f'{name}_logits_{suffix}.npy')]


@pytest.fixture(scope='module', params=CASES, ids=[c[0] for c in CASES])
def case(request):
  name, suffix = request.param
  params = legacy.restore(_path(name))
  images = np.load(_path(f'{name}_inputs.npy'))
  outputs = {}
  for run, config, logits_file in _runs(name, suffix):
    model = models.build_model(config, images.shape[1:3])
    (logits, metrics), state = jax.jit(
        lambda p, x: model.apply({'params': p}, x, mutable='intermediates'))(params, images)
    outputs[run] = (config, logits_file, logits, metrics, state['intermediates'])
  return name, params, images, outputs


def test_load_classifier_reproduces_logits(case):
  name, _, images, outputs = case
  config = json.load(open(_path(f'{name}_config.json')))
  for run, (_, logits_file, _, _, _) in outputs.items():
    overrides = {}
    if run != 'base':  # Reach the override run through `overrides`, as a user would.
      disp = config['eval_override_model_kwargs']['encoder']['moe']['router']['dispatcher']
      overrides = {f'encoder.moe.router.dispatcher.{k}': v for k, v in disp.items()}
    classify = vmoe.load_classifier(_path(name), config['model_kwargs'], overrides)
    logits = classify(images)
    assert logits.dtype == np.float32 and logits.shape == (8, 10)
    np.testing.assert_allclose(logits, np.load(_path(logits_file)), atol=1e-5, rtol=0)


def test_routing_matches_reference(case):
  name, _, _, outputs = case
  expected = np.load(_path(f'{name}_routing.npz'))
  for run, (_, _, _, _, inter) in outputs.items():
    blocks = [b for b in inter['Encoder'] if 'Moe' in inter['Encoder'][b]]
    assert blocks
    for block in blocks:
      moe = inter['Encoder'][block]['Moe']
      np.testing.assert_array_equal(moe['buffer_slot'][0],
                                    expected[f'{run}/{block}/buffer_slot_gse'])
      np.testing.assert_allclose(moe['combine_weight'][0],
                                 expected[f'{run}/{block}/combine_weight_gse'], atol=1e-6)
      np.testing.assert_allclose(moe['Router']['logits'][0],
                                 expected[f'{run}/{block}/router_logits_gse'], atol=1e-5)


def test_metrics_match_reference(case):
  name, _, _, outputs = case
  expected = json.load(open(_path(f'{name}_metrics.json')))
  for run, (_, _, _, metrics, _) in outputs.items():
    ref = expected[run]
    np.testing.assert_allclose(metrics['auxiliary_loss'], ref['auxiliary_loss'], atol=1e-7)
    for block, values in ref.items():
      if block == 'auxiliary_loss':
        continue
      for key, value in values.items():
        np.testing.assert_allclose(metrics[block][key], value, rtol=1e-5, atol=1e-7,
                                   err_msg=f'{run} {block} {key}')
    summary = expected[f'routing_summary_{run}']
    for block, s in summary.items():
      dropped = s['num_tokens_routed_to_0_experts'] / (s['num_groups'] * s['group_size'])
      np.testing.assert_allclose(np.mean(metrics[block]['dropped_tokens']), dropped, atol=1e-7)


def test_param_tree_matches_reference(case):
  name, params, images, outputs = case
  digests = json.load(open(_path(f'{name}_param_digests.json')))['leaves']
  for run, (config, *_) in outputs.items():
    model = models.build_model(config, images.shape[1:3])
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))['params']
    flat = {'/'.join(k.key for k in path): tuple(v.shape)
            for path, v in jax.tree_util.tree_leaves_with_path(shapes)}
    assert flat == {k: tuple(v['shape']) for k, v in digests.items()}
