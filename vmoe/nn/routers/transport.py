"""Optimal-transport routers (Routers in Vision MoE, arXiv 2401.15969).

A transport plan P [S, E] between the tokens (mass 1 each) and the experts (mass S/E each)
balances the load before the hard choice is made. By default the plan only ranks and the
combine weights are the softmax gates at the chosen pairs (the reference's
use_softmax_combine_weights=True), so gradients reach the router as in V-MoE. With
use_softmax_combine_weights=False the plan's entries are the combine weights and the
gradient flows through the solver's iterations (unrolled by autodiff, not implicit
differentiation; see docs/routers.md).

- Entropic plan (Sinkhorn; the reference's KLProjection* routers): max <P, logits> +
  eps * H(P), `maxiter` alternating row/column normalisations in the log domain.
- L2-regularised plan (sparsity-constrained expert choice): max <P, sim> - l2/2 ||P||^2
  with sim = softmax(logits), solved exactly by block-coordinate ascent on its dual: each
  half step fixes the column (row) potentials and sets every row (column) potential so
  that the clipped plan [f_s + g_e + sim_se]_+ / l2 meets that marginal exactly, a
  threshold search over sorted values. The reference runs 20 Adam steps on the semi-dual
  instead (jaxopt); both give the same plan up to that solver's error.
- k-sparse plan (at most k nonzeros per expert column, or per token row): the same L2
  problem with a cardinality constraint, which is not convex; solved as the reference
  does, `maxiter` Adam steps (rate `adam_lr`) on the semi-dual, whose inner maximisation
  is a projection onto the k-sparse simplex (Blondel et al., arXiv 1710.06276).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vmoe.nn import routing as routing_lib
from vmoe.nn.routers.common import Router, expert_choice_metrics, importance_loss, load_loss

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


def l2_plan(sim: Array, l2: float = 1.0, num_iters: int = 20) -> Array:
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


def sparse_simplex_projection(x: Array, k: int) -> Array:
  """Euclidean projection of x [..., n] onto {p >= 0, sum p = 1, at most k nonzeros}:
  the simplex projection of its k largest entries (zero elsewhere)."""
  top, idx = jax.lax.top_k(x, k)
  tau = _threshold(top, jnp.ones(top.shape[:-1], x.dtype))
  vals = jnp.maximum(top - tau[..., None], 0)
  return jnp.sum(jax.nn.one_hot(idx, x.shape[-1], dtype=x.dtype) * vals[..., None], axis=-2)


def ksparse_plan(sim: Array, k: int, row_mass: float, col_mass: float,
                 num_iters: int = 20, adam_lr: float = 1e-2) -> Array:
  """sim: [G, M, N] -> plan [G, M, N] with at most k nonzeros per column, rows summing to
  row_mass and columns to col_mass (approximately: `num_iters` Adam steps from zero
  potentials, as the reference).

  Semi-dual: min over row potentials a [G, M] of sum_n col_mass * max_p (<p, a + sim_n> -
  col_mass |p|^2 / 2) - row_mass * sum_m a_m, p over k-sparse distributions; its gradient
  is the plan's row sums minus row_mass, the plan's column n being col_mass * the k-sparse
  projection of (a + sim[:, n]) / col_mass.
  """
  def plan(a):
    x = jnp.swapaxes(a[..., None] + sim, -1, -2) / col_mass  # [G, N, M]
    return jnp.swapaxes(sparse_simplex_projection(x, k), -1, -2) * col_mass

  opt = optax.adam(adam_lr)

  def body(_, state):
    a, opt_state = state
    updates, opt_state = opt.update(plan(a).sum(-1) - row_mass, opt_state, a)
    return optax.apply_updates(a, updates), opt_state

  a0 = jnp.zeros(sim.shape[:2], sim.dtype)
  a, _ = jax.lax.fori_loop(0, num_iters, body, (a0, opt.init(a0)))
  return plan(a)


def plan_metrics(plan: Array) -> dict:
  """Largest deviation of the plan's marginals from their targets, per group."""
  _, s, e = plan.shape
  return {'plan_row_error': jnp.max(jnp.abs(plan.sum(2) - 1), axis=1),
          'plan_col_error': jnp.max(jnp.abs(plan.sum(1) - s / e), axis=1)}


def sparsity_metrics(plan: Array) -> dict:
  """Nonzeros of a sparse plan per expert and per token (the reference's names)."""
  metrics = {}
  for what, axis in (('items_per_expert', 1), ('experts_per_item', 2)):
    n = jnp.count_nonzero(plan, axis=axis).astype(jnp.float32)  # [G, E] or [G, S]
    metrics.update({f'num_{what}_min': jnp.min(n, 1), f'num_{what}_max': jnp.max(n, 1),
                    f'num_{what}_avg': jnp.mean(n, 1)})
  return metrics


class _TransportRouter(Router):
  """Shared options. maxiter: the solver's iterations; use_softmax_combine_weights: the
  softmax gates (True) or the plan (False, gradients through the solve) weigh the
  experts' outputs."""
  maxiter: int = 20
  use_softmax_combine_weights: bool = True

  @nn.nowrap
  def weights(self, gates: Array, plan: Array) -> Array:
    return gates if self.use_softmax_combine_weights else plan

  @nn.nowrap
  def rank(self, plan: Array) -> Array:
    """The plan as scores: it only ranks unless it also weighs."""
    return jax.lax.stop_gradient(plan) if self.use_softmax_combine_weights else plan


class SinkhornTopExpertsPerItemRouter(_TransportRouter):
  """Sinkhorn token choice (the reference's KLProjectionNoisyTopExpertsPerItemRouter):
  each token's top-K experts of the entropic plan of the (noisy in training) logits; the
  S x K choices of a group fill the slots. As in the reference, the combine weights are
  the softmax of the clean logits, also in training, and the V-MoE losses are available
  but off (weights 0).
  """
  SLOTS = 'choices'
  batch_priority: bool = False
  num_selected_experts: int = 1
  epsilon: float = 1.0
  importance_loss_weight: float = 0.0
  load_loss_weight: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels  # Only super-class guided routing learns from the labels.
    k, e = self.num_selected_experts, self.num_experts
    logits = self.gating_logits(x)
    gates = jax.nn.softmax(logits)
    metrics = {'importance_loss': importance_loss(gates)}
    aux = self.importance_loss_weight * metrics['importance_loss']
    noisy = logits
    if self.noisy(train):
      sigma = self.noise_std / e
      noisy = logits + self.noise(logits.shape, sigma)
      metrics['load_loss'] = load_loss(logits, noisy, sigma, k)
      aux = aux + self.load_loss_weight * metrics['load_loss']
    plan = self.rank(sinkhorn_plan(noisy, self.maxiter, self.epsilon))
    routing = routing_lib.top_experts_per_item(
        plan, k, self.capacity, self.batch_priority, weights=self.weights(gates, plan))
    metrics.update(auxiliary_loss=aux, **plan_metrics(plan))
    return routing, self.with_z_loss(metrics, logits)


class SinkhornTopItemsPerExpertRouter(_TransportRouter):
  """Sinkhorn expert choice (the reference's KLProjectionNoisyTopItemsPerExpertRouter):
  each expert's top-C tokens of the entropic plan; combine weights: the (noisy in
  training) softmax, as in the reference."""
  SLOTS = 'tokens'
  epsilon: float = 1.0

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels  # Only super-class guided routing learns from the labels.
    logits = self.gating_logits(x)
    noisy = logits
    if self.noisy(train):
      noisy = logits + self.noise(logits.shape, self.noise_std / self.num_experts)
    plan = self.rank(sinkhorn_plan(noisy, self.maxiter, self.epsilon))
    routing = routing_lib.top_items_per_expert(
        plan, self.capacity, weights=self.weights(jax.nn.softmax(noisy), plan))
    metrics = {**expert_choice_metrics(routing, x.shape[1], self.num_experts),
               **plan_metrics(plan)}
    return routing, self.with_z_loss(metrics, logits)


class _SparseExpertChoice(_TransportRouter):
  """Expert choice on a sparse plan of sim = softmax(clean logits): each expert takes its
  top-C tokens by plan, and a pick outside the plan's support (plan 0) leaves its slot
  empty, as in the reference. No gating noise, in training either (the reference's)."""
  SLOTS = 'tokens'

  @nn.nowrap
  def route(self, x: Array, plan_fn):
    logits = self.gating_logits(x)
    sim = jax.nn.softmax(logits)
    plan = self.rank(plan_fn(sim))
    routing = routing_lib.top_items_per_expert(
        plan, self.capacity, weights=self.weights(sim, plan), drop_zero=True)
    metrics = {**expert_choice_metrics(routing, x.shape[1], self.num_experts),
               **plan_metrics(plan), **sparsity_metrics(plan)}
    return routing, self.with_z_loss(metrics, logits)


class SparseTransportTopItemsPerExpertRouter(_SparseExpertChoice):
  """Sparsity-constrained expert choice (the reference's
  SparseProjectionTransportTopItemsPerExpertRouter): the L2-regularised plan (strength
  `l2_reg`, the reference's 1), solved exactly in `maxiter` block-coordinate steps."""
  l2_reg: float = 1.0

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels, train  # No noise, no labels.
    return self.route(x, lambda sim: l2_plan(sim, self.l2_reg, self.maxiter))


class KSparseTransportTopItemsPerExpertRouter(_SparseExpertChoice):
  """k-sparse expert choice (the reference's
  KSparseProjectionTransportTopItemsPerExpertRouter): the L2 plan with at most C (the
  capacity) nonzeros per expert column, `maxiter` Adam steps of rate `adam_lr`."""
  adam_lr: float = 1e-2

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels, train  # No noise, no labels.
    s, e = x.shape[1], self.num_experts
    return self.route(x, lambda sim: ksparse_plan(
        sim, self.capacity, 1.0, s / e, self.maxiter, self.adam_lr))


class KSparseTransportTopExpertsPerItemRouter(_TransportRouter):
  """k-sparse token choice (the reference's
  KSparseProjectionTransportTopExpertsPerItemRouter): the L2 plan of sim = softmax(clean
  logits) with at most K nonzeros per token row, the top-K experts of each row fill the
  slots as the S x K choices of token choice; a choice outside the row's support (plan
  0) takes its slot but leaves it empty, as in the reference. No noise, no auxiliary
  loss.
  """
  SLOTS = 'choices'
  batch_priority: bool = False
  num_selected_experts: int = 1
  adam_lr: float = 1e-2

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels, train  # No noise, no labels.
    s, e, k = x.shape[1], self.num_experts, self.num_selected_experts
    logits = self.gating_logits(x)
    sim = jax.nn.softmax(logits)
    # Rows are the constrained side: solve on the transpose, experts (mass S / E) as its
    # rows and tokens (mass 1) as its k-sparse columns.
    plan = self.rank(jnp.swapaxes(ksparse_plan(
        jnp.swapaxes(sim, 1, 2), k, s / e, 1.0, self.maxiter, self.adam_lr), 1, 2))
    routing = routing_lib.top_experts_per_item(
        plan, k, self.capacity, self.batch_priority, weights=self.weights(sim, plan),
        drop_zero=True)
    metrics = {'auxiliary_loss': jnp.zeros(x.shape[:1], jnp.float32),
               **plan_metrics(plan), **sparsity_metrics(plan)}
    return routing, self.with_z_loss(metrics, logits)
