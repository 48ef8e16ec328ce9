"""The MoE layer: dispatch kinds agree, gradients reach everything, drops pass zero."""
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from vmoe.nn import models
from vmoe.nn import moe


def _layer(kind, router_name='NoisyTopExpertsPerItemRouter', split_rngs=True,
           compute_dtype='float32', k=2, **disp):
  router = {'name': router_name, 'dispatcher': {'name': kind, **disp}}
  if router_name != 'NoisyTopItemsPerExpertRouter':
    router.update(num_selected_experts=k)
  if router_name == 'NoisyTopExpertsPerItemRouter':
    router.update(importance_loss_weight=0.01, load_loss_weight=0.01)
  spec = models.resolve_moe(dict(layers=(0,), num_experts=4, group_size=12, router=router,
                                 split_rngs=split_rngs), tokens_per_image=6)
  return moe.MoeLayer(spec, mlp_dim=16, compute_dtype=compute_dtype)


def _init(layer, seed=2):
  return jax.jit(lambda k: layer.init(k, X, train=False))(jax.random.PRNGKey(seed))


@functools.cache
def _params(router_name):
  """Params do not depend on the dispatcher: one init per router for every test."""
  return _init(_layer('einsum', router_name, capacity_factor=1.0))


X = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 8))  # 2 groups of 12 tokens.
COT = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 8))


def _loss_and_grads(layer, params, train):
  """(loss, output, grads w.r.t. (params, x), number of choices the experts processed)."""
  def loss(p, x):
    (y, m), state = layer.apply(
        p, x, train=train, mutable=['intermediates'],
        rngs={'gating': jax.random.PRNGKey(5), 'dropout': jax.random.PRNGKey(6)})
    kept = jnp.sum(state['intermediates']['buffer_slot'][0] >= 0)
    return jnp.sum(y * COT) + jnp.mean(m['auxiliary_loss']), (y, kept)
  (value, (y, kept)), grads = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, X)
  return value, y, grads, int(kept)


ALL_KINDS = ('einsum', 'indices', 'ragged')
CASES = {  # name: (router, dispatcher options, train, dispatch kinds)
    'top2_train': ('NoisyTopExpertsPerItemRouter', {'capacity_factor': 1.0}, True, ALL_KINDS),
    'top2_bpr_low_capacity': ('NoisyTopExpertsPerItemRouter',
                              {'capacity_factor': 0.5, 'batch_priority': True}, False,
                              ALL_KINDS),
    # Room for every token in every expert: the dropless setting of 'ragged'.
    'top2_dropless': ('NoisyTopExpertsPerItemRouter', {'capacity': 12}, True, ALL_KINDS),
    # 2 images of 6 tokens per group pick 3 of 4 experts, each with room for 1 image.
    'per_image_low_capacity': ('PerImageRouter', {'capacity': 1, 'k': 3}, True, ALL_KINDS),
    'expert_choice_train': ('NoisyTopItemsPerExpertRouter', {'capacity_factor': 1.0}, True,
                            ('einsum', 'indices')),
}


@pytest.fixture(scope='module', params=list(CASES))
def all_kinds(request):
  router_name, disp, train, kinds = CASES[request.param]
  params = _params(router_name)
  return request.param, {kind: _loss_and_grads(_layer(kind, router_name, **disp), params,
                                               train) for kind in kinds}


@pytest.mark.xla_defaults
def test_dispatch_kinds_agree_on_outputs_and_gradients(all_kinds):
  _, out = all_kinds
  v1, y1, g1, _ = out['einsum']
  for kind in out:
    v2, y2, g2, _ = out[kind]
    np.testing.assert_allclose(y1, y2, atol=1e-5, err_msg=kind)
    np.testing.assert_allclose(v1, v2, rtol=1e-5, err_msg=kind)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=kind),
                 g1, g2)


def test_gradients_reach_router_and_every_expert(all_kinds):
  name, out = all_kinds
  for kind in out:
    g = out[kind][2][0]['params']
    assert np.abs(g['Router']['dense']['kernel']).max() > 0
    for dense in ('Dense_0', 'Dense_1'):
      per_expert = np.abs(g['Mlp'][dense]['kernel']).reshape(4, -1).sum(-1) > 0
      # 4 images, 1 image per expert: an expert may be left without an image.
      assert per_expert.all() or (name == 'per_image_low_capacity' and per_expert.sum() >= 3)


def test_low_capacity_drops_choices_and_dropless_does_not(all_kinds):
  # Else 'ragged equals einsum' would not show that ragged keeps the routing's drops.
  name, out = all_kinds
  kept = {kind: o[3] for kind, o in out.items()}
  assert len(set(kept.values())) == 1, kept
  k = CASES[name][1].get('k', 2)
  if 'low_capacity' in name:
    assert kept['einsum'] < 24 * k
  if 'dropless' in name:
    assert kept['einsum'] == 24 * k


def test_ragged_without_capacity_is_dropless():
  layer = _layer('ragged')
  # E / K: every expert has room for every token.
  assert layer.spec.capacity_rule.factor == 2.0 and layer.spec.capacity == 12
  m = jax.jit(lambda p: layer.apply(p, 3 * X, train=False)[1])(
      _params('NoisyTopExpertsPerItemRouter'))
  np.testing.assert_array_equal(m['dropped_tokens'], 0)


@pytest.mark.parametrize('router,message', [
    ({'name': 'NoisyTopItemsPerExpertRouter', 'dispatcher': {'name': 'ragged',
                                                             'capacity_factor': 1.0}},
     "'ragged' needs a router where each token picks K experts"),
    ({'name': 'SoftRouter', 'dispatcher': {'name': 'ragged'}}, "only 'einsum' dispatch"),
    ({'dispatcher': {'name': 'sorted', 'capacity_factor': 1.0}},
     r"dispatcher.name='sorted' is unknown; valid: \('einsum', 'indices', 'ragged'\)"),
])
def test_bad_dispatcher_fails_validation(router, message):
  config = {'num_classes': 3, 'patch_size': (2, 2), 'hidden_size': 8,
            'encoder': {'num_layers': 2, 'mlp_dim': 16, 'num_heads': 2,
                        'moe': {'layers': (1,), 'num_experts': 4, 'group_size': 12,
                                'router': router}}}
  with pytest.raises(ValueError, match=message):
    models.resolve(config)


def test_split_rngs_controls_expert_initialisation():
  for split in (False, True):
    p = _init(_layer('einsum', split_rngs=split, capacity_factor=1.0), 0)
    p = p['params']['Mlp']['Dense_0']['kernel']
    assert np.allclose(p[0], p[1]) != split


def test_tokens_dropped_by_every_expert_get_zero_output():
  for kind in ('indices', 'ragged'):
    layer = _layer(kind, capacity=1)  # 1 slot per expert: at most 4 of 12 tokens kept.
    params = _params('NoisyTopExpertsPerItemRouter')
    y, m = jax.jit(lambda p, layer=layer: layer.apply(p, X, train=False))(params)
    y = np.asarray(y).reshape(2, 12, 8)
    zero_rows = np.all(y == 0, axis=-1)
    assert zero_rows.sum(axis=1).min() >= 8
    np.testing.assert_allclose(m['dropped_tokens'], zero_rows.mean(axis=1))


def test_bfloat16_dispatch_is_close_to_float32(all_kinds):
  name, out = all_kinds
  if name != 'top2_train':
    pytest.skip('One case is enough.')
  router_name, disp, train, kinds = CASES[name]
  for kind in kinds:
    _, y16, g16, _ = _loss_and_grads(_layer(kind, router_name, bfloat16=True, **disp),
                                     _params(router_name), train)
    _, y32, g32, _ = out[kind]
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, y32, atol=5e-2)
    assert not np.array_equal(y16, y32)
    g16, g32 = g16[0]['params']['Mlp'], g32[0]['params']['Mlp']
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-2), g16, g32)
