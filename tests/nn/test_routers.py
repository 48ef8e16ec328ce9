"""Property tests of every router, and the layer-level guarantees they give."""
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from vmoe.nn import mlp
from vmoe.nn import moe
from vmoe.nn import models
from vmoe.nn import routers
from vmoe.nn.routers import transport
from vmoe.utils import dotted

pytestmark = pytest.mark.xla_defaults

G, S, D, E, T = 2, 24, 8, 4, 6  # 4 images of 6 tokens per group.
X = jax.random.normal(jax.random.PRNGKey(0), (G * S // T, T, D))
HARD = {
    'NoisyTopExpertsPerItemRouter': {'num_selected_experts': 2},
    'NoisyTopItemsPerExpertRouter': {},
    'SinkhornTopExpertsPerItemRouter': {'num_selected_experts': 2},
    'SinkhornTopItemsPerExpertRouter': {},
    'SparseTransportTopItemsPerExpertRouter': {},
    'KSparseTransportTopItemsPerExpertRouter': {},
    'KSparseTransportTopExpertsPerItemRouter': {'num_selected_experts': 2},
    'PerImageRouter': {'num_selected_experts': 2},
}
# Sparse plans may leave a chosen slot empty (a pick outside the plan's support).
SPARSE = ('SparseTransportTopItemsPerExpertRouter', 'KSparseTransportTopItemsPerExpertRouter',
          'KSparseTransportTopExpertsPerItemRouter')


def _layer(name, kind='einsum', shared=0, **router):
  if name == 'SoftRouter':
    router.setdefault('num_slots', 3)
    disp = {'name': kind}
  else:
    disp = {'name': kind, 'capacity_factor': 1.0, 'capacity_multiple_of': 1}
  spec = models.resolve_moe(
      dict(layers=(0,), num_experts=E, group_size=S, shared_experts=shared,
           router={'name': name, 'dispatcher': disp, **router}), tokens_per_image=T)
  return moe.MoeLayer(spec, mlp_dim=16)


def _run(layer, train=True, mutable=False):
  params = jax.jit(lambda k: layer.init(k, X, train=False))(jax.random.PRNGKey(1))
  rngs = {'gating': jax.random.PRNGKey(2), 'dropout': jax.random.PRNGKey(3)}

  def loss(p):
    (y, m), state = layer.apply(p, X, train=train, rngs=rngs, mutable=['intermediates'])
    return jnp.sum(y ** 2) + jnp.mean(m['auxiliary_loss']), (y, m, state)

  (_, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return params, grads, aux


@pytest.fixture(scope='module', params=sorted(HARD) + ['SoftRouter'])
def routed(request):
  name = request.param
  layer = _layer(name, **HARD.get(name, {}))
  return name, _run(layer)


def test_hard_routers_respect_capacity(routed):
  name, (_, _, (y, m, state)) = routed
  if name == 'SoftRouter':
    pytest.skip('Soft MoE has no capacity.')
  inter = state['intermediates']
  slot = np.asarray(inter['buffer_slot'][0])  # [G, S, E]
  capacity = 12 if name == 'PerImageRouter' else (12 if 'TopExperts' in name else 6)
  assert slot.max() < capacity
  counts = (slot >= 0).sum(axis=1)  # [G, E] tokens per expert
  assert counts.max() <= capacity
  if 'TopItems' in name and name not in SPARSE:  # Expert choice fills all C slots.
    np.testing.assert_array_equal(counts, capacity)
  if 'TopExperts' in name or name == 'PerImageRouter':
    assert (slot >= 0).sum(axis=2).max() <= 2  # At most K experts per token.
  assert np.isfinite(np.asarray(y)).all()
  assert np.isfinite(np.asarray(m['auxiliary_loss'])).all()


def test_gradients_reach_router_and_experts(routed):
  name, (_, grads, _) = routed
  g = grads['params']
  router_grads = g['Router']['mu'] if name == 'SoftRouter' else g['Router']['dense']['kernel']
  assert np.abs(router_grads).sum() > 0
  assert (np.abs(g['Mlp']['Dense_0']['kernel']).reshape(E, -1).sum(-1) > 0).any()


def test_per_image_routing_sends_every_token_of_an_image_to_the_same_experts():
  _, _, (_, _, state) = _run(_layer('PerImageRouter', num_selected_experts=2))
  slot = np.asarray(state['intermediates']['buffer_slot'][0])  # [G, S, E]
  chosen = (slot >= 0).reshape(G, S // T, T, E)
  assert (chosen == chosen[:, :, :1]).all()
  assert chosen.any()


def test_soft_routing_weights_are_convex():
  layer = _layer('SoftRouter')
  params = jax.jit(lambda k: layer.init(k, X, train=False))(jax.random.PRNGKey(1))
  router = routers.SoftRouter(**layer.spec.router_kwargs())
  assert layer.spec.capacity == 3  # num_slots.
  r, _ = jax.jit(lambda p: router.apply({'params': p}, X.reshape(G, S, D), train=False))(
      params['params']['Router'])
  assert r.dispatch_weights.shape == (G, S, E, 3)
  np.testing.assert_allclose(r.dispatch_weights.sum(axis=1), 1, atol=1e-5)
  np.testing.assert_allclose(r.combine_weights.sum(axis=(2, 3)), 1, atol=1e-5)


def test_sinkhorn_plan_marginals():
  logits = 2 * jax.random.normal(jax.random.PRNGKey(4), (3, 32, 8))
  plan = transport.sinkhorn_plan(logits, num_iters=20)
  np.testing.assert_allclose(plan.sum(axis=2), 1, atol=1e-3)
  np.testing.assert_allclose(plan.sum(axis=1), 32 / 8, atol=1e-3)


def test_l2_plan_is_sparse_and_meets_marginals():
  gates = jax.nn.softmax(3 * jax.random.normal(jax.random.PRNGKey(5), (2, 32, 8)))
  plan = transport.l2_plan(gates, l2=0.1, num_iters=50)
  assert (plan >= 0).all()
  np.testing.assert_allclose(plan.sum(axis=2), 1, atol=1e-3)
  np.testing.assert_allclose(plan.sum(axis=1), 32 / 8, atol=1e-3)
  assert 0 < np.mean(plan > 0) < 0.5


def test_plan_threshold_matches_brute_force():
  z = np.array([[0.9, 0.1, 0.5, 0.45]], np.float32)
  tau = float(transport._threshold(jnp.asarray(z), jnp.asarray([0.5]))[0])
  np.testing.assert_allclose(np.maximum(z - tau, 0).sum(), 0.5, rtol=1e-6)


@pytest.mark.parametrize('name', ['NoisyTopItemsPerExpertRouter', 'SinkhornTopExpertsPerItemRouter',
                                  'PerImageRouter'])
def test_indices_dispatch_agrees_with_einsum(name):
  opts = HARD[name]
  _, g1, (y1, _, _) = _run(_layer(name, 'einsum', **opts))
  _, g2, (y2, _, _) = _run(_layer(name, 'indices', **opts))
  np.testing.assert_allclose(y1, y2, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)


def test_shared_expert_output_is_shared_mlp_plus_routed_output():
  layer = _layer('NoisyTopExpertsPerItemRouter', shared=1, num_selected_experts=1)
  params, _, (y, _, _) = _run(layer, train=False)
  p = params['params']
  routed = _layer('NoisyTopExpertsPerItemRouter', num_selected_experts=1)
  y_routed = jax.jit(lambda q: routed.apply({'params': q}, X, train=False)[0])(
      {k: v for k, v in p.items() if k != 'SharedMlp_0'})
  y_shared = jax.jit(lambda q: mlp.MlpBlock(16).apply({'params': q}, X, train=False))(
      p['SharedMlp_0'])
  np.testing.assert_allclose(y, y_routed + y_shared, atol=1e-5)


def test_superclass_guidance_adds_its_loss(tmp_path):
  path = tmp_path / 'superclasses.json'
  path.write_text(json.dumps({'superclass_of_class': [0, 1, 2, 3, 0, 1]}))
  spec = models.resolve_moe(
      dict(layers=(0,), num_experts=E, group_size=S, router=dict(
          name='PerImageRouter', num_selected_experts=1, superclasses=str(path),
          dispatcher={'capacity_factor': 1.0})), tokens_per_image=T, num_classes=6)
  assert spec.superclasses == (0, 1, 2, 3, 0, 1)  # The file, read once.
  router = routers.PerImageRouter(**spec.router_kwargs())
  xg = X.reshape(G, S, D)
  labels = jnp.arange(G * S // T) % 6
  params = jax.jit(lambda k: router.init(k, xg, train=False))(jax.random.PRNGKey(0))
  _, m = jax.jit(lambda p: router.apply(p, xg, train=True, labels=labels,
                                        rngs={'gating': jax.random.PRNGKey(1)}))(params)
  np.testing.assert_allclose(m['auxiliary_loss'], 0.3 * m['superclass_loss'], rtol=1e-6)
  assert (np.asarray(m['superclass_loss']) > 0).all()


BASE = {
    'num_classes': 6, 'patch_size': (2, 2), 'hidden_size': 8, 'classifier': 'gap',
    'encoder': {'num_layers': 2, 'mlp_dim': 16, 'num_heads': 2,
                'moe': {'layers': (1,), 'num_experts': E, 'group_size': 8,
                        'router': {'name': 'PerImageRouter', 'num_selected_experts': 2,
                                   'dispatcher': {'capacity_factor': 1.0}}}},
}


@pytest.mark.parametrize('overrides,message', [
    ({'encoder.moe.router.name': 'Top2'}, "router.name='Top2' is unknown; valid: \\["),
    ({'encoder.moe.router.num_selected_experts': 5}, 'num_selected_experts=5 must be in'),
    ({'encoder.moe.router': {'name': 'SoftRouter', 'num_slots': 0}},
     'num_slots=0 must be an integer >= 1'),
    ({'encoder.moe.router.name': 'SoftRouter', 'encoder.moe.router.dispatcher': {}},
     r"Unknown key\(s\) \['num_selected_experts'\]"),
    ({'encoder.moe.router': {'name': 'SoftRouter', 'dispatcher': {'name': 'indices'}}},
     "only 'einsum' dispatch applies"),
    ({'encoder.moe.router.superclasses': [0, 1, 2]}, 'has 3 classes but the model has '
                                                     'num_classes=6'),
    ({'encoder.moe.router.superclasses': [0, 1, 2, 3, 4, 5]}, r'Super-classes \[4, 5\]'),
    ({'encoder.moe.router.image_repr': 'max'}, "image_repr='max' is unknown"),
    ({'encoder.moe.shared_experts': -1}, 'shared_experts=-1'),
    ({'encoder.moe.router.deterministic': 'yes'}, "deterministic='yes' must be None"),
    ({'encoder.moe.router.dtype': 'int8'}, "dtype='int8' is unknown"),
    ({'encoder.moe.router.z_loss_weight': -1}, 'z_loss_weight=-1 must be a number >= 0'),
    ({'encoder.moe.router.name': 'NoisyTopExpertsPerItemRouter',
      'encoder.moe.router.load_balancing': 'aux'}, "load_balancing='aux' is unknown"),
    ({'encoder.moe.router': {'name': 'KLProjectionNoisyTopExpertsPerItemRouter',
                             'maxiter': 0, 'dispatcher': {'capacity_factor': 1.0}}},
     'maxiter=0'),
    ({'encoder.moe.router.use_lbfgs': True}, r"Unknown key\(s\) \['use_lbfgs'\]"),
    ({'encoder.moe.split_rngs': ['gating']}, "split_rngs=\\['gating'\\] must be True"),
    ({'encoder.moe.dropout_rate': 1.5}, 'dropout_rate=1.5 must be a number in'),
])
def test_bad_router_settings_fail_before_compilation(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.resolve(dotted.with_values(BASE, overrides), image_size=(4, 4))


def test_superclass_file_with_wrong_class_count(tmp_path):
  path = tmp_path / 'sc.json'
  path.write_text(json.dumps({'superclass_of_class': [0, 1, 2, 3]}))
  with pytest.raises(ValueError, match='has 4 classes but the model has num_classes=6'):
    models.resolve(dotted.with_values(BASE, {'encoder.moe.router.superclasses': str(path)}))
