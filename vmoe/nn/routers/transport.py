"""Optimal-transport routers (Routers in Vision MoE, arXiv 2401.15969).

A transport plan P [S, E] between the tokens (mass 1 each) and the experts (mass S/E each)
balances the load before the hard choice is made. The plan only ranks; the combine weights
are the softmax gates at the chosen pairs, so gradients reach the router as in V-MoE.

- Entropic plan (Sinkhorn): max <P, logits> + eps * H(P), solved in the log domain with a
  fixed number of alternating row/column normalisations.
- L2-regularised plan (sparsity-constrained expert choice): max <P, gates> - l2/2 ||P||^2,
  solved by exact block-coordinate ascent on its dual: each half step fixes the column
  (row) potentials and sets every row (column) potential so that the clipped plan
  [f_s + g_e + gates_se]_+ / l2 meets that marginal exactly. Each half step is a threshold
  search over sorted values (as in a projection onto the simplex), needs no learning rate,
  and gives a sparse plan. No external solver package is used.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import routing as routing_lib
from vmoe.nn.routers.common import expert_choice_metrics

Array = jax.Array


def sinkhorn_plan(logits: Array, num_iters: int = 20, epsilon: float = 1.0) -> Array:
  """logits: [G, S, E] -> plan [G, S, E], rows sum to 1, columns to S / E."""
  _, s, e = logits.shape
  log_k = logits / epsilon
  log_col = jnp.log(s / e)

  def body(_, fg):
    f, g = fg
    f = -jax.nn.logsumexp(log_k + g[:, None, :], axis=2)
    g = log_col - jax.nn.logsumexp(log_k + f[:, :, None], axis=1)
    return f, g

  f0 = jnp.zeros(logits.shape[:2], logits.dtype)
  g0 = jnp.zeros(logits.shape[::2], logits.dtype)
  f, g = jax.lax.fori_loop(0, num_iters, body, (f0, g0))
  return jnp.exp(log_k + f[:, :, None] + g[:, None, :])


def _threshold(z: Array, mass: Array) -> Array:
  """tau with sum_i [z_i - tau]_+ = mass along the last axis. z: [..., n], mass: [...]."""
  zs = jnp.sort(z, axis=-1)[..., ::-1]
  cs = jnp.cumsum(zs, axis=-1)
  k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
  taus = (cs - mass[..., None]) / k
  # The support is the largest prefix whose smallest element stays above its threshold.
  n_support = jnp.sum(zs > taus, axis=-1, keepdims=True)
  return jnp.take_along_axis(taus, n_support - 1, axis=-1)[..., 0]


def l2_plan(sim: Array, l2: float = 0.1, num_iters: int = 20) -> Array:
  """sim: [G, S, E] -> sparse plan [G, S, E], rows sum to 1, columns to S / E."""
  _, s, e = sim.shape
  row_mass = jnp.full(sim.shape[:2], l2, sim.dtype)
  col_mass = jnp.full(sim.shape[::2], l2 * s / e, sim.dtype)

  def body(_, fg):
    f, g = fg
    f = -_threshold(sim + g[:, None, :], row_mass)
    g = -_threshold(jnp.swapaxes(sim + f[:, :, None], 1, 2), col_mass)
    return f, g

  f0 = jnp.zeros(sim.shape[:2], sim.dtype)
  g0 = jnp.zeros(sim.shape[::2], sim.dtype)
  f, g = jax.lax.fori_loop(0, num_iters, body, (f0, g0))
  return jnp.maximum(sim + f[:, :, None] + g[:, None, :], 0) / l2


def plan_metrics(plan: Array) -> dict:
  """Largest deviation of the plan's marginals from their targets, per group."""
  _, s, e = plan.shape
  return {'plan_row_error': jnp.max(jnp.abs(plan.sum(2) - 1), axis=1),
          'plan_col_error': jnp.max(jnp.abs(plan.sum(1) - s / e), axis=1)}


class _TransportRouter(nn.Module):
  """Shared body: logits (noisy in training), gates, plan; subclasses pick the slots.
  capacity: C slots per expert (vmoe.nn.models)."""
  num_experts: int
  capacity: int
  noise_std: float = 1.0

  @nn.nowrap
  def logits_and_gates(self, x: Array, train: bool):
    logits = nn.Dense(self.num_experts, use_bias=False, name='dense')(x)  # [G, S, E]
    self.sow('intermediates', 'logits', logits)
    if train and self.noise_std > 0:
      logits = logits + (self.noise_std / self.num_experts) * jax.random.normal(
          self.make_rng('gating'), logits.shape)
    return logits, jax.nn.softmax(logits)


class _SinkhornRouter(_TransportRouter):
  """Entropic plan from the (noisy) logits; it ranks, the softmax gates weigh."""
  sinkhorn_iters: int = 20
  epsilon: float = 1.0

  @nn.nowrap
  def gates_and_plan(self, x: Array, train: bool):
    logits, gates = self.logits_and_gates(x, train)
    plan = sinkhorn_plan(logits, self.sinkhorn_iters, self.epsilon)
    return gates, jax.lax.stop_gradient(plan)


class SinkhornTopExpertsPerItemRouter(_SinkhornRouter):
  """Sinkhorn token choice: each token's top-K experts of the entropic plan; the S x K
  choices of a group fill the slots."""
  SLOTS = 'choices'
  batch_priority: bool = False
  num_selected_experts: int = 1

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels  # Only super-class guided routing learns from the labels.
    gates, plan = self.gates_and_plan(x, train)
    routing = routing_lib.top_experts_per_item(
        plan, self.num_selected_experts, self.capacity, self.batch_priority, weights=gates)
    return routing, {'auxiliary_loss': jnp.zeros(x.shape[:1], x.dtype), **plan_metrics(plan)}


class SinkhornTopItemsPerExpertRouter(_SinkhornRouter):
  """Sinkhorn expert choice: each expert's top-C tokens of the entropic plan."""
  SLOTS = 'tokens'

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels  # Only super-class guided routing learns from the labels.
    gates, plan = self.gates_and_plan(x, train)
    routing = routing_lib.top_items_per_expert(plan, self.capacity, weights=gates)
    return routing, {**expert_choice_metrics(routing, x.shape[1], self.num_experts),
                     **plan_metrics(plan)}


class SparseTransportTopItemsPerExpertRouter(_TransportRouter):
  """Sparsity-constrained expert choice: top-C tokens per expert of the L2 plan.

  Pairs outside the plan's support rank below every pair inside it, ordered by gate, so
  an expert whose support is smaller than C still fills its slots sensibly.
  """
  SLOTS = 'tokens'
  l2_reg: float = 0.1
  transport_iters: int = 20

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels  # Only super-class guided routing learns from the labels.
    _, gates = self.logits_and_gates(x, train)
    plan = jax.lax.stop_gradient(l2_plan(gates, self.l2_reg, self.transport_iters))
    score = jnp.where(plan > 0, 1 + plan, jax.lax.stop_gradient(gates))
    routing = routing_lib.top_items_per_expert(score, self.capacity, weights=gates)
    return routing, {**expert_choice_metrics(routing, x.shape[1], self.num_experts),
                     **plan_metrics(plan),
                     'plan_nonzero_fraction': jnp.mean(plan > 0, axis=(1, 2))}
