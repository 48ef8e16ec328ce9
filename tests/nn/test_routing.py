"""Hand-computed routing decisions, capacity rounding and auxiliary losses."""
import numpy as np
import pytest
import scipy.stats

import jax
import jax.numpy as jnp

from vmoe.nn import models
from vmoe.nn import routers
from vmoe.nn import routing
from vmoe.nn.routers import common

# Jitted once per shape: op-by-op execution would compile every primitive separately.
top_experts = jax.jit(routing.top_experts_per_item, static_argnums=(1, 2, 3))
top_items = jax.jit(routing.top_items_per_expert, static_argnums=(1,))


@pytest.mark.parametrize('tokens,experts,cf,ceil_or_round,multiple_of,expected', [
    (400 * 2, 8, 1.05, 'ceil', 4, 108),  # S=400, K=2: 105 -> 108.
    (34 * 2, 4, 1.0, 'ceil', 4, 20),     # The token fixture: 17 -> 20.
    (34 * 2, 4, 0.5, 'ceil', 4, 12),     # 8.5 -> 9 -> 12.
    (34 * 2, 4, 0.5, 'round', None, 8),  # round(8.5) = 8 (banker's rounding as Python's).
    (64, 8, 1.0, 'ceil', 4, 8),
    (10, 4, 1.0, 'ceil', 1, 3),
    (10, 4, 0.01, 'ceil', None, 1),
])
def test_compute_capacity(tokens, experts, cf, ceil_or_round, multiple_of, expected):
  assert models.compute_capacity(tokens, experts, cf, ceil_or_round, multiple_of) == expected


def test_capacity_below_one_is_an_error():
  with pytest.raises(ValueError, match='capacity_factor=0.01'):
    models.compute_capacity(10, 4, 0.01, 'round', None)


def _per_token(r: routing.SparseRouting, s: int):
  return jax.jit(lambda r: r.per_token(s))(r)


def _dense(r: routing.SparseRouting, s: int):
  slot, weight = _per_token(r, s)
  return np.asarray(slot[0]), np.asarray(weight[0])


def _gates(rows):
  return jnp.asarray([rows], jnp.float32)  # [1, S, E]


# Top-1 experts of tokens 0..5 are 0, 0, 0, 1, 2, 1; token 2 is the most confident.
GATES_K1 = _gates([[.5, .3, .2], [.6, .2, .2], [.9, .05, .05],
                   [.1, .8, .1], [.2, .1, .7], [.3, .4, .3]])


def test_top1_first_come_first_served_drops_the_late_token():
  slot, weight = _dense(top_experts(GATES_K1, 1, 2, False), 6)
  np.testing.assert_array_equal(slot, [[0, -1, -1], [1, -1, -1], [-1, -1, -1],
                                       [-1, 0, -1], [-1, -1, 0], [-1, 1, -1]])
  np.testing.assert_allclose(weight[:, 0], [.5, .6, 0, 0, 0, 0])
  np.testing.assert_allclose(weight[3:].max(-1), [.8, .7, .4])


def test_top1_batch_priority_drops_the_least_confident_token():
  slot, weight = _dense(top_experts(GATES_K1, 1, 2, True), 6)
  # BPR order by top-1 gate: t2 (.9), t3 (.8), t4 (.7), t1 (.6), t0 (.5), t5 (.4).
  np.testing.assert_array_equal(slot[:, 0], [-1, 1, 0, -1, -1, -1])
  np.testing.assert_array_equal(slot[:, 1], [-1, -1, -1, 0, -1, 1])
  np.testing.assert_allclose(weight[:, 0], [0, .6, .9, 0, 0, 0])


def test_top2_all_first_choices_before_any_second_choice():
  gates = _gates([[.7, .3], [.6, .4], [.2, .8]])
  r = top_experts(gates, 2, 2, False)
  slot, weight = _dense(r, 3)
  # Tier 1: t0->e0 @0, t1->e0 @1, t2->e1 @0. Tier 2: t0->e1 @1, t1->e1 full, t2->e0 full.
  np.testing.assert_array_equal(slot, [[0, 1], [1, -1], [-1, 0]])
  np.testing.assert_allclose(weight, [[.7, .3], [.6, 0], [0, .8]])  # Not renormalised.
  np.testing.assert_array_equal(r.token_slot[0], [[0, 3], [1, 4], [2, 4]])  # 4 = E*C.
  np.testing.assert_array_equal(r.slot_token[0], [[0, 1], [2, 0]])


def test_explicit_capacity_never_exceeded_and_full_capacity_drops_nothing():
  gates = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (3, 40, 5)))
  for c in (1, 3, 80):
    slot, _ = _per_token(top_experts(gates, 2, c, True), 40)
    per_expert = np.sum(np.asarray(slot) >= 0, axis=1)  # [G, E]
    assert per_expert.max() <= c
    if c == 80:
      assert (np.sum(np.asarray(slot) >= 0, axis=2) == 2).all()


def test_expert_choice_fills_every_expert():
  gates = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (2, 16, 4)))
  r = top_items(gates, 5)
  assert (np.asarray(r.slot_token) < 16).all()
  top = np.sort(np.asarray(gates), axis=1)[:, ::-1][:, :5]  # [G, C, E]
  np.testing.assert_allclose(np.asarray(r.slot_weight), np.swapaxes(top, 1, 2))


def _np_cv2(v):
  return np.var(v, axis=-1) / np.mean(v, axis=-1) ** 2


def test_auxiliary_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 20, 6)).astype(np.float32)
  noisy = logits + rng.normal(scale=1 / 6, size=logits.shape).astype(np.float32)
  gates = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(common.importance_loss(gates), _np_cv2(gates.sum(1)), rtol=1e-5)
  top1 = np.eye(6)[gates.argmax(-1)]
  np.testing.assert_allclose(common.gshard_loss(gates),
                             6 * np.sum(gates.mean(1) * top1.mean(1), -1), rtol=1e-5)
  threshold = np.sort(noisy, axis=-1)[..., -2:-1]  # 2nd largest noisy logit (K=2).
  p = 1 - scipy.stats.norm.cdf((threshold - logits) / (1 / 6))
  np.testing.assert_allclose(common.load_loss(logits, noisy, 1 / 6, 2), _np_cv2(p.mean(1)),
                             rtol=1e-4)


def test_router_metrics_and_noise_only_in_training():
  router = routers.NoisyTopExpertsPerItemRouter(
      num_experts=4, num_selected_experts=2, importance_loss_weight=0.5,
      load_loss_weight=0.25, gshard_loss_weight=0.125, capacity=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
  params = router.init(jax.random.PRNGKey(1), x, train=False)
  _, m_eval = router.apply(params, x, train=False)
  assert 'load_loss' not in m_eval
  np.testing.assert_allclose(
      m_eval['auxiliary_loss'],
      0.5 * m_eval['importance_loss'] + 0.125 * m_eval['gshard_loss'], rtol=1e-6)
  r1, m1 = router.apply(params, x, train=True, rngs={'gating': jax.random.PRNGKey(2)})
  r2, _ = router.apply(params, x, train=True, rngs={'gating': jax.random.PRNGKey(3)})
  np.testing.assert_allclose(
      m1['auxiliary_loss'], 0.5 * m1['importance_loss'] + 0.25 * m1['load_loss']
      + 0.125 * m1['gshard_loss'], rtol=1e-6)
  # Importance uses the clean gates, so it is the same in train and eval.
  np.testing.assert_allclose(m1['importance_loss'], m_eval['importance_loss'], rtol=1e-6)
  assert not np.allclose(r1.slot_weight, r2.slot_weight)


def test_routing_metrics_count_dropped_tokens():
  r = top_experts(GATES_K1, 1, 2, False)
  m = common.routing_metrics(r, 6)
  np.testing.assert_allclose(m['dropped_tokens'], [1 / 6])
  np.testing.assert_allclose(m['expert_load'], [[2 / 5, 2 / 5, 1 / 5]])
