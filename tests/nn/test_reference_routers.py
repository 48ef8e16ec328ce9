"""Routers against the reference's decisions (tests/fixtures/vmoe_reference/
routers_sparse_ot.npz, see tests/fixtures/README.md) and its definitions: k-sparse plans,
Sinkhorn token choice's combine weights, bfloat16 dispatch, plans as combine weights,
`deterministic`, z-loss and bias balancing."""
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from vmoe.nn import models
from vmoe.nn import moe
from vmoe.nn import routers
from vmoe.nn.routers import transport

pytestmark = pytest.mark.xla_defaults

FIXTURE = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'vmoe_reference',
                       'routers_sparse_ot.npz')


def _router(name, num_experts, group_size, **options):
  """The router module of `name` (any alias) with the reference's defaults."""
  spec = models.resolve_moe(
      dict(layers=(0,), num_experts=num_experts, group_size=group_size,
           router={'name': name, **options}), tokens_per_image=1)
  return routers.ROUTERS[spec.router](**spec.router_kwargs())


def _identity_apply(router, logits, train=False, **kwargs):
  """The router on inputs = logits [G, S, E] with its gating kernel set to the identity."""
  e = logits.shape[-1]
  params = {'params': {'dense': {'kernel': jnp.eye(e)}}}
  return jax.jit(lambda x: router.apply(params, x, train=train, **kwargs))(logits)


def _chosen(routing, num_tokens):
  slot, weight = routing.per_token(num_tokens)
  return np.asarray(slot) >= 0, np.asarray(weight)


@pytest.mark.parametrize('name', ['SparseProjectionTransportTopItemsPerExpertRouter',
                                  'KSparseProjectionTransportTopItemsPerExpertRouter'])
@pytest.mark.parametrize('cf', [1.0, 2.1])
def test_sparse_expert_choice_agrees_with_the_reference(name, cf):
  ref = np.load(FIXTURE)
  logits = jnp.asarray(ref['init/logits'])
  g, s, e = logits.shape
  key = f'init/{"ksparse" if name.startswith("KSparse") else "sparse"}_ec_cf{cf}'
  router = _router(name, e, s, dispatcher={'name': 'einsum', 'capacity_factor': cf})
  routing, _ = _identity_apply(router, logits)
  ours, weight = _chosen(routing, s)
  theirs = ref[f'{key}/slot'] >= 0
  for i in range(g):  # The Jaccard overlap of the chosen (token, expert) pairs.
    jaccard = (ours[i] & theirs[i]).sum() / (ours[i] | theirs[i]).sum()
    assert jaccard >= 0.97, (i, jaccard)
  both = ours & theirs
  np.testing.assert_allclose(weight[both], ref[f'{key}/weight'][both], atol=1e-4)


@pytest.mark.parametrize('columns,k,met', [
    (True, 8, True), (True, 32, True), (True, 12, False),  # Expert choice, S / E = 8.
    (False, 1, True), (False, 4, True), (False, 2, False)])  # Token choice, E = 4.
def test_ksparse_plans_have_at_most_k_nonzeros_and_meet_the_marginals(columns, k, met):
  """The k-sparse side's marginal holds exactly; the other one too where k is S / E (or E
  for rows: a partition) or does not bind. In between, the semi-dual of this non-convex
  problem has a gap and the other marginal is only approximate (docs/routers.md)."""
  s, e = 32, 4
  sim = jax.nn.softmax(2 * jax.random.normal(jax.random.PRNGKey(1), (2, s, e)))
  if columns:  # At most k tokens per expert; tokens of mass 1, experts of mass S / E.
    plan = transport.ksparse_plan(sim, k, 1.0, s / e, num_iters=2000, adam_lr=1e-3)
  else:  # At most k experts per token: the transposed problem.
    plan = jnp.swapaxes(transport.ksparse_plan(jnp.swapaxes(sim, 1, 2), k, s / e, 1.0,
                                               num_iters=2000, adam_lr=1e-3), 1, 2)
  plan = np.asarray(plan)
  assert (plan >= 0).all()
  assert np.count_nonzero(plan, axis=1 if columns else 2).max() <= k
  sparse_side, other_side = (plan.sum(1) - s / e, plan.sum(2) - 1)[::1 if columns else -1]
  np.testing.assert_allclose(sparse_side, 0, atol=1e-5)
  if met:
    np.testing.assert_allclose(other_side, 0, atol=2e-3)


def test_sinkhorn_token_choice_combines_with_the_clean_softmax_in_training():
  logits = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 4))
  router = _router('KLProjectionNoisyTopExpertsPerItemRouter', 4, 16,
                   num_selected_experts=2, dispatcher={'capacity_factor': 2.0})
  clean = np.asarray(jax.nn.softmax(logits))
  routing, _ = _identity_apply(router, logits, train=True,
                               rngs={'gating': jax.random.PRNGKey(3)})
  chosen, weight = _chosen(routing, 16)
  np.testing.assert_allclose(weight[chosen], clean[chosen], rtol=1e-6)
  # The plan was drawn from noisy logits: training and evaluation choose differently.
  eval_chosen, _ = _chosen(_identity_apply(router, logits)[0], 16)
  assert (chosen != eval_chosen).any()


def _expert_mlp(p, x):
  """The experts of MoeLayer's Mlp on buffers x [E, N, D], float32 throughout."""
  hi = jax.lax.Precision.HIGHEST
  h = jax.nn.gelu(jnp.einsum('end,edh->enh', x, p['Dense_0']['kernel'], precision=hi)
                  + p['Dense_0']['bias'][:, None])
  return (jnp.einsum('enh,ehd->end', h, p['Dense_1']['kernel'], precision=hi)
          + p['Dense_1']['bias'][:, None])


def test_bfloat16_dispatch_error_is_no_larger_than_the_references():
  """At the benchmark's layer (benchmarks/moe_layer.py: D 768, H 3072, E 8, K 2, groups
  of 392), 8 images: the reference's Bfloat16Dispatcher rounds the tokens and the expert
  outputs only; its combine weights and weighted sums stay float32."""
  b, t, d, h, e, s = 8, 196, 768, 3072, 8, 392
  x = jax.random.normal(jax.random.PRNGKey(4), (b, t, d))

  def layer(bf16):
    spec = models.resolve_moe(dict(
        layers=(0,), num_experts=e, group_size=s, router=dict(
            num_selected_experts=2, dispatcher=dict(capacity_factor=1.05, bfloat16=bf16))),
        tokens_per_image=t)
    return moe.MoeLayer(spec, mlp_dim=h)

  params = jax.jit(lambda k: layer(False).init(k, x, train=False))(jax.random.PRNGKey(5))
  f32, state = jax.jit(lambda p: layer(False).apply(p, x, train=False,
                                                    mutable=['intermediates']))(params)
  ours = jax.jit(lambda p: layer(True).apply(p, x, train=False)[0])(params)
  # The reference's recipe from the same routing decisions: per (token, expert) weight.
  slot = state['intermediates']['buffer_slot'][0]  # [G, S, E]
  weight = state['intermediates']['combine_weight'][0]
  bf = lambda v: v.astype(jnp.bfloat16).astype(jnp.float32)
  xg = bf(x.reshape(-1, s, d))

  @jax.jit
  def reference(p):
    y = _expert_mlp(p, jnp.broadcast_to(xg.reshape(1, -1, d), (e, xg.size // d, d)))
    y = bf(y).reshape(e, -1, s, d)  # Every expert on every token, rounded.
    w = jnp.where(slot >= 0, weight, 0)  # [G, S, E]
    return jnp.einsum('egsd,gse->gsd', y, w, precision=jax.lax.Precision.HIGHEST)

  ref = reference(params['params']['Mlp']).reshape(b, t, d)
  f32 = f32[0]
  err_ours = float(jnp.max(jnp.abs(ours - f32)))
  err_ref = float(jnp.max(jnp.abs(ref - f32)))
  assert err_ours <= 1.05 * err_ref, (err_ours, err_ref)
  assert ours.dtype == jnp.float32


@pytest.mark.parametrize('name,options', [
    ('KLProjectionNoisyTopExpertsPerItemRouter', {'num_selected_experts': 2}),
    ('KLProjectionNoisyTopItemsPerExpertRouter', {}),
    ('SparseProjectionTransportTopItemsPerExpertRouter', {}),
    ('KSparseProjectionTransportTopItemsPerExpertRouter', {}),
    ('KSparseProjectionTransportTopExpertsPerItemRouter', {'num_selected_experts': 2}),
])
def test_gradients_reach_the_router_through_the_plan_as_combine_weights(name, options):
  g, s, dim, e = 2, 16, 6, 4
  x = jax.random.normal(jax.random.PRNGKey(6), (g, s, dim))
  router = _router(name, e, s, use_softmax_combine_weights=False,
                   dispatcher={'capacity_factor': 2.0}, **options)
  params = router.init(jax.random.PRNGKey(7), x, train=False)
  target = jax.random.normal(jax.random.PRNGKey(8), (g, s, e))

  def loss(p):  # A function of the combine weights only.
    routing, _ = router.apply(p, x, train=False)
    return jnp.sum(routing.per_token(s)[1] * target)

  grad = jax.jit(jax.grad(loss))(params)['params']['dense']['kernel']
  assert np.isfinite(np.asarray(grad)).all()
  assert np.abs(np.asarray(grad)).sum() > 0
  # The combine weights are the plan's entries at the chosen pairs.
  routing, _ = jax.jit(lambda p: router.apply(p, x, train=False))(params)
  _, w = routing.per_token(s)
  assert np.asarray(w).max() > 0


def test_deterministic_overrides_noise_in_both_directions():
  logits = jax.random.normal(jax.random.PRNGKey(9), (2, 16, 4))
  rngs = {'gating': jax.random.PRNGKey(10)}

  def weights(train, **options):
    router = _router('NoisyTopExpertsPerItemRouter', 4, 16, num_selected_experts=2,
                     dispatcher={'capacity_factor': 2.0}, **options)
    return np.asarray(_chosen(_identity_apply(router, logits, train, rngs=rngs)[0], 16)[1])

  clean = weights(False)
  assert not np.allclose(weights(True), clean)  # The reference's default.
  np.testing.assert_array_equal(weights(True, deterministic=True), clean)
  noisy_eval = weights(False, deterministic=False)
  assert not np.allclose(noisy_eval, clean)
  # Without a 'gating' stream (evaluation), the noise is fixed: evaluation repeats.
  router = _router('NoisyTopExpertsPerItemRouter', 4, 16, num_selected_experts=2,
                   deterministic=False, dispatcher={'capacity_factor': 2.0})
  a = _chosen(_identity_apply(router, logits)[0], 16)[1]
  np.testing.assert_array_equal(a, _chosen(_identity_apply(router, logits)[0], 16)[1])


@pytest.mark.parametrize('name', sorted(routers.ROUTERS))
def test_z_loss_is_reported_and_weighted_into_the_auxiliary_loss(name):
  g, s, dim, e = 2, 16, 6, 4
  x = 3 * jax.random.normal(jax.random.PRNGKey(11), (g, s, dim))
  sizing = ({'num_slots': 2} if name == 'SoftRouter'
            else {'dispatcher': {'capacity_factor': 2.0}})
  kwargs = {'labels': None}
  spec_t = 4 if name == 'PerImageRouter' else 1

  def run(weight):
    spec = models.resolve_moe(
        dict(layers=(0,), num_experts=e, group_size=s,
             router={'name': name, 'z_loss_weight': weight, **sizing}),
        tokens_per_image=spec_t)
    router = routers.ROUTERS[spec.router](**spec.router_kwargs())
    params = router.init(jax.random.PRNGKey(12), x, train=False)
    return jax.jit(lambda p: router.apply(p, x, train=False, **kwargs)[1])(params)

  m0, m1 = run(0.0), run(0.5)
  assert (np.asarray(m0['z_loss']) > 0).all()
  np.testing.assert_allclose(m1['auxiliary_loss'], m0['auxiliary_loss'] + 0.5 * m0['z_loss'],
                             rtol=1e-5)


def test_bias_balancing_moves_the_bias_against_the_load_and_only_chooses():
  g, s, e = 2, 32, 4
  logits = jnp.tile(jnp.array([2.0, 0.0, 0.0, -2.0]), (g, s, 1))  # Expert 0 is busiest.
  logits = logits + 0.1 * jax.random.normal(jax.random.PRNGKey(13), logits.shape)
  router = _router('NoisyTopExpertsPerItemRouter', e, s, num_selected_experts=1,
                   load_balancing='bias', bias_update_rate=0.01, importance_loss_weight=0,
                   load_loss_weight=0, dispatcher={'capacity_factor': 2.0})
  params = {'params': {'dense': {'kernel': jnp.eye(e)},
                       'balance_bias': jnp.array([0.0, 0.0, 0.0, 1.0])}}

  def aux(p):
    _, m = router.apply(p, logits, train=False)
    return jnp.mean(m['auxiliary_loss'])

  value, grad = jax.jit(jax.value_and_grad(aux))(params)
  assert float(value) == 0.0  # The pseudo-gradient term adds nothing to the loss.
  # With the bias expert 3 takes every token (1 + softmax(-2)_3 beats softmax(2)_0).
  np.testing.assert_allclose(grad['params']['balance_bias'], [-0.01, -0.01, -0.01, 0.01])
  np.testing.assert_array_equal(grad['params']['dense']['kernel'], 0)
  routing, _ = jax.jit(lambda p: router.apply(p, logits, train=False))(params)
  chosen, weight = _chosen(routing, s)
  gates = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_allclose(weight[chosen], gates[chosen], rtol=1e-6)  # No bias in weights.
  assert chosen[..., 3].sum() == min(g * s, g * routing.slot_token.shape[-1])
