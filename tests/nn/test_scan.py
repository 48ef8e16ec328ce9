"""model.encoder.scan / remat: same function, same metrics, params convertible both ways."""
import functools

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe.checkpoints import export
from vmoe.checkpoints import initialization
from vmoe.configs import common
from vmoe.nn import models
from vmoe.nn import scan
from vmoe.nn.scan import Segment

LAYOUTS = {'every2': (4, (1, 3)), 'last2': (6, (3, 5))}
IMAGES = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))


def config(layout='every2', **encoder):
  num_layers, layers = LAYOUTS[layout]
  return dict(num_classes=3, patch_size=(4, 4), hidden_size=16, encoder=dict(
      num_layers=num_layers, mlp_dim=16, num_heads=2, **encoder, moe=dict(
          layers=layers, num_experts=4, group_size=5, router=dict(
              num_selected_experts=2, noise_std=0.0,
              dispatcher=dict(capacity_factor=2.0)))))


def flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def loss_and_grads(model, params):
  """Train mode (routing rngs split per scanned layer; no noise, so all agree) ->
  (grads, (logits, metrics, intermediates))."""
  def loss(p):
    (logits, metrics), state = model.apply(
        {'params': p}, IMAGES, train=True, mutable=['intermediates'],
        rngs={'dropout': jax.random.PRNGKey(1), 'gating': jax.random.PRNGKey(2)})
    return jnp.sum(logits * jnp.arange(3.)) + jnp.mean(metrics['auxiliary_loss']), (
        logits, metrics, state['intermediates']['Encoder'])
  return jax.jit(jax.grad(loss, has_aux=True))(params)


def init(model):
  """Random params of the model's shapes (no init compile: the tests' time is compiling)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), IMAGES)['params'])
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), shapes)


@functools.cache
def unscanned_params(layout):
  return init(models.build_model(config(layout), IMAGES.shape[1:3]))


@functools.cache
def unscanned(layout):
  """(grads, (logits, metrics, intermediates)) of the unscanned model, no remat."""
  return loss_and_grads(models.build_model(config(layout), IMAGES.shape[1:3]),
                        unscanned_params(layout))


def scanned_params(layout, **encoder):
  model = models.build_model(config(layout, scan=True, **encoder), IMAGES.shape[1:3])
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), IMAGES)['params'])
  params = scan.scan_tree(unscanned_params(layout), scan.segments_of(flat(shapes)))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, shapes)
  return model, params


def assert_close(a, b, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5), a, b)


def test_layout():
  assert scan.layout((False, True) * 24) == (Segment(0, 2, 24),)
  last2 = [i in common.last_n(2, 12) for i in range(12)]
  assert scan.layout(last2) == (Segment(0, 1, 8), Segment(8, 2, 2))
  assert scan.layout([True, False, False]) == (Segment(1, 1, 2),)  # Block 0 unscanned.
  assert scan.layout([False, True, False]) == ()


# 'last2' has both kinds of segment: dense blocks alone (scan_0_1x2) and (dense, MoE)
# units as 'every2' (scan_2_2x2). One compile per case: this file's time is compiling.
@pytest.mark.parametrize('scanned, remat', [(True, 'full'), (False, 'dots_no_batch')])
def test_scan_and_remat_same_logits_metrics_grads(scanned, remat):
  if scanned:
    model, params = scanned_params('last2', remat=remat)
    names = {n.split('/')[1] for n in flat(params) if n.startswith('Encoder/')}
    assert names == {'scan_0_1x2', 'scan_2_2x2', 'posembed_input', 'encoder_norm'}
  else:
    model = models.build_model(config('last2', remat=remat), IMAGES.shape[1:3])
    params = unscanned_params('last2')
  grads, (logits, metrics, inter) = unscanned('last2')
  grads_s, (logits_s, metrics_s, inter_s) = loss_and_grads(model, params)
  assert_close(logits_s, logits)
  assert_close(metrics_s, metrics)  # Same per-layer keys 'encoderblock_i'.
  assert_close(scan.unscan_tree(grads_s), grads)
  # Routing intermediates are also sown per block, under the unscanned names.
  assert_close({k: inter_s[k] for k in ('encoderblock_3', 'encoderblock_5')},
               {k: inter[k] for k in ('encoderblock_3', 'encoderblock_5')})
  assert inter['encoderblock_5']['Moe']['buffer_slot'][0].shape == (2, 5, 4)  # [G, S, E].


def test_conversion_round_trips_exactly():
  params = flat(unscanned_params('last2'))
  segments = (Segment(0, 1, 2), Segment(2, 2, 2))
  s = scan.scan(params, segments)
  assert s['Encoder/scan_2_2x2/block_1/Moe/Mlp/Dense_0/kernel'].shape == (2, 4, 16, 16)
  np.testing.assert_array_equal(s['Encoder/scan_2_2x2/block_1/Moe/Mlp/Dense_0/kernel'][1],
                                params['Encoder/encoderblock_5/Moe/Mlp/Dense_0/kernel'])
  back = scan.unscan(s)
  assert sorted(back) == sorted(params)
  for n in params:
    np.testing.assert_array_equal(back[n], params[n])
  # Optimizer-state paths end with param paths: they convert alike.
  assert 'opt/mu/Encoder/scan_2_2x2/block_0/Mlp/Dense_0/bias' in scan.scan(
      {f'opt/mu/{n}': v for n, v in params.items()}, segments)


def test_initialization_and_export_either_way(tmp_path):
  params = unscanned_params('every2')
  model, params_s = scanned_params('every2')
  # A scanned model exports the reference's names; they load into a scanned model.
  export.export(params_s, 'npz', str(tmp_path / 'ref.npz'))
  with np.load(tmp_path / 'ref.npz') as z:
    assert sorted(z) == sorted(flat(params))
  zeros = jax.tree.map(jnp.zeros_like, params_s)
  loaded, report = initialization.initialize(
      params_s, zeros, {'source': 'npz', 'path': str(tmp_path / 'ref.npz')})
  assert_close(loaded, params_s, atol=0)
  assert 'stack(2)' in report.loaded['Encoder/scan_0_2x2/block_1/Moe/Mlp/Dense_0/kernel']
  # A checkpoint with scanned names loads into an unscanned model.
  np.savez(tmp_path / 'scanned.npz', **flat(params_s))
  loaded, _ = initialization.initialize(
      params, jax.tree.map(jnp.zeros_like, params),
      {'source': 'npz', 'path': str(tmp_path / 'scanned.npz')})
  assert_close(loaded, params, atol=0)
  # Rules speak the reference's names; a layer the checkpoint lacks keeps its init.
  loaded, report = initialization.initialize(
      params_s, zeros, {'source': 'npz', 'path': str(tmp_path / 'ref.npz'),
                        'rules': [('drop', '^Encoder/encoderblock_3/Moe/Router/')],
                        'allow_missing': '/Router/'})
  router = flat(loaded)['Encoder/scan_0_2x2/block_1/Moe/Router/dense/kernel']
  np.testing.assert_array_equal(router[1], 0)
  np.testing.assert_array_equal(
      router[0], flat(params)['Encoder/encoderblock_1/Moe/Router/dense/kernel'])
  assert 'only Encoder/encoderblock_3' in report.initialized[
      'Encoder/scan_0_2x2/block_1/Moe/Router/dense/kernel']


@pytest.mark.parametrize('key, value, match', [
    ('scan', 'yes', r"scan='yes' must be True"),
    ('remat', 'everything', r"remat='everything' is unknown; valid: \['dots', "),
])
def test_bad_options(key, value, match):
  with pytest.raises(ValueError, match=match):
    models.resolve(config(**{key: value}))


def test_bool_remat_and_layout_check():
  assert models.resolve(config(remat=True)).encoder.remat == 'full'
  assert models.resolve(config(remat=False)).encoder.remat == 'none'
  with pytest.raises(ValueError, match=r'holds scanned \(scan_0_2x2\) encoder blocks, but '
                                       'the model is unscanned'):
    scan.check_same_layout(['Encoder/scan_0_2x2/block_0/Mlp/Dense_0/bias'],
                           ['Encoder/encoderblock_0/Mlp/Dense_0/bias'], 'Checkpoint 7')
