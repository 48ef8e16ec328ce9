"""The MoE layer: dispatch kinds agree, gradients reach everything, drops pass zero."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from vmoe.nn import moe


def _layer(kind, router_name='NoisyTopExpertsPerItemRouter', split_rngs=True, **disp):
  router = {'name': router_name, 'dispatcher': {'name': kind, **disp}}
  if router_name == 'NoisyTopExpertsPerItemRouter':
    router.update(num_selected_experts=2, importance_loss_weight=0.01, load_loss_weight=0.01)
  return moe.MoeLayer(mlp_dim=16, num_experts=4, group_size=12, router=router,
                      split_rngs=split_rngs)


def _init(layer, seed=2):
  return jax.jit(lambda k: layer.init(k, X, train=False))(jax.random.PRNGKey(seed))


X = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 8))  # 2 groups of 12 tokens.
COT = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 8))


def _loss_and_grads(layer, params, train):
  def loss(p, x):
    y, m = layer.apply(p, x, train=train,
                       rngs={'gating': jax.random.PRNGKey(5), 'dropout': jax.random.PRNGKey(6)})
    return jnp.sum(y * COT) + jnp.mean(m['auxiliary_loss']), y
  (value, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, X)
  return value, y, grads


CASES = {  # name: (router, dispatcher options, train)
    'top2_train': ('NoisyTopExpertsPerItemRouter', {'capacity_factor': 1.0}, True),
    'top2_bpr_low_capacity': ('NoisyTopExpertsPerItemRouter',
                              {'capacity_factor': 0.5, 'batch_priority': True}, False),
    'expert_choice_train': ('NoisyTopItemsPerExpertRouter', {'capacity_factor': 1.0}, True),
}


@pytest.fixture(scope='module', params=list(CASES))
def both_kinds(request):
  router_name, disp, train = CASES[request.param]
  params = _init(_layer('einsum', router_name, **disp))
  return params, {kind: _loss_and_grads(_layer(kind, router_name, **disp), params, train)
                  for kind in ('einsum', 'indices')}


def test_einsum_and_indices_agree_on_outputs_and_gradients(both_kinds):
  _, out = both_kinds
  (v1, y1, g1), (v2, y2, g2) = out['einsum'], out['indices']
  np.testing.assert_allclose(y1, y2, atol=1e-5)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)


def test_gradients_reach_router_and_every_expert(both_kinds):
  _, out = both_kinds
  for kind in out:
    g = out[kind][2][0]['params']
    assert np.abs(g['Router']['dense']['kernel']).min() > 0
    for dense in ('Dense_0', 'Dense_1'):
      per_expert = np.abs(g['Mlp'][dense]['kernel']).reshape(4, -1).sum(-1)
      assert (per_expert > 0).all(), per_expert


def test_split_rngs_controls_expert_initialisation():
  for split in (False, True):
    p = _init(_layer('einsum', split_rngs=split, capacity_factor=1.0), 0)
    p = p['params']['Mlp']['Dense_0']['kernel']
    assert np.allclose(p[0], p[1]) != split


def test_tokens_dropped_by_every_expert_get_zero_output():
  layer = _layer('indices', capacity=1)  # 1 slot per expert: at most 4 of 12 tokens kept.
  params = _init(layer)
  y, m = jax.jit(lambda p: layer.apply(p, X, train=False))(params)
  y = np.asarray(y).reshape(2, 12, 8)
  zero_rows = np.all(y == 0, axis=-1)
  assert zero_rows.sum(axis=1).min() >= 8
  np.testing.assert_allclose(m['dropped_tokens'], zero_rows.mean(axis=1))


def test_bfloat16_dispatch_is_close_to_float32():
  params = _init(_layer('einsum', capacity_factor=1.0))
  apply = lambda layer: jax.jit(lambda p: layer.apply(p, X, train=False)[0])(params)
  y32 = apply(_layer('einsum', capacity_factor=1.0))
  y16 = apply(_layer('einsum', capacity_factor=1.0, bfloat16=True))
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(y16, y32, atol=5e-2)
  assert not np.array_equal(y16, y32)
