"""Routers: tokens [G, S, D] -> (routing decision, metrics). Chosen by name from ROUTERS.

A router never touches the experts: it returns a routing object of vmoe/nn/routing.py and
a dict of per-group metrics ([G] arrays). 'auxiliary_loss' [G] is the weighted sum of the
router's losses that the trainer adds to the classification loss.
"""
import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import routing as routing_lib

Array = jax.Array
DISPATCHER_KEYS = ('name', 'capacity', 'capacity_factor', 'capacity_ceil_or_round',
                   'capacity_multiple_of', 'batch_priority', 'bfloat16')


def _cv_squared(v: Array) -> Array:
  """Squared coefficient of variation over the last axis (population variance)."""
  return jnp.var(v, axis=-1) / jnp.mean(v, axis=-1) ** 2


def importance_loss(gates: Array) -> Array:
  """gates: [G, S, E] clean softmax -> [G]. (std/mean)^2 of the per-expert gate sums."""
  return _cv_squared(jnp.sum(gates, axis=1))


def load_loss(logits: Array, noisy_logits: Array, noise_std: float, k: int) -> Array:
  """[G, S, E] clean and noisy logits -> [G].

  p[s, e] = P(expert e would still be in token s's top-k under fresh noise)
          = 1 - Phi((kth largest noisy logit of s - clean logit[s, e]) / noise_std).
  """
  threshold = jax.lax.top_k(noisy_logits, k)[0][..., -1:]  # [G, S, 1]
  p = 1.0 - jax.scipy.stats.norm.cdf((threshold - logits) / noise_std)
  return _cv_squared(jnp.mean(p, axis=1))


def gshard_loss(gates: Array) -> Array:
  """gates: [G, S, E] -> [G]. E * sum_e mean_gate_e * fraction_top1_e (GShard)."""
  e = gates.shape[-1]
  top1 = jax.nn.one_hot(jnp.argmax(gates, axis=-1), e, dtype=gates.dtype)
  return e * jnp.sum(jnp.mean(gates, axis=1) * jnp.mean(top1, axis=1), axis=-1)


def capacity_from_config(dispatcher: Mapping[str, Any], num_tokens: int,
                         num_experts: int) -> int:
  """Slots per expert from the dispatcher config: explicit `capacity` or a factor."""
  if dispatcher.get('capacity') is not None:
    return int(dispatcher['capacity'])
  return routing_lib.compute_capacity(
      num_tokens, num_experts, dispatcher['capacity_factor'],
      dispatcher.get('capacity_ceil_or_round', 'ceil'),
      dispatcher.get('capacity_multiple_of', 4))


def routing_metrics(routing: routing_lib.SparseRouting, num_tokens: int) -> dict:
  """Per-group load statistics of a hard routing.

  dropped_tokens: [G] fraction of tokens processed by no expert (only the residual).
  expert_load: [G, E] fraction of all routed tokens that expert e processed.
  """
  g, e, c = routing.slot_token.shape
  filled = routing.slot_token < num_tokens  # [G, E, C]
  per_expert = jnp.sum(filled, axis=-1).astype(jnp.float32)
  hits = jnp.zeros((g, num_tokens + 1), jnp.int32).at[
      jnp.arange(g)[:, None], routing.slot_token.reshape(g, e * c)].add(1)[:, :num_tokens]
  return {
      'dropped_tokens': jnp.mean(hits == 0, axis=-1),
      'expert_load': per_expert / jnp.maximum(jnp.sum(per_expert, -1, keepdims=True), 1),
  }


class NoisyTopExpertsPerItemRouter(nn.Module):
  """V-MoE token choice (arXiv 2106.05974): top-K experts per token by noisy softmax.

  Training adds N(0, (noise_std / E)^2) noise to the logits; the noisy softmax is used to
  dispatch and combine (weights not renormalised over the K picks). Eval uses the clean one.
  Defaults follow the reference implementation (loss weights 1.0; paper configs use 0.005).
  """
  num_experts: int
  num_selected_experts: int = 1
  noise_std: float = 1.0
  importance_loss_weight: float = 1.0
  load_loss_weight: float = 1.0
  gshard_loss_weight: float = 0.0
  dispatcher: Optional[Mapping[str, Any]] = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    _, s, _ = x.shape
    k, e = self.num_selected_experts, self.num_experts
    logits = nn.Dense(e, use_bias=False, name='dense')(x)  # [G, S, E]
    self.sow('intermediates', 'logits', logits)
    gates_clean = jax.nn.softmax(logits)
    metrics = {'importance_loss': importance_loss(gates_clean)}
    losses = [(self.importance_loss_weight, 'importance_loss')]
    gates = gates_clean
    if train and self.noise_std > 0:
      sigma = self.noise_std / e
      noisy = logits + sigma * jax.random.normal(self.make_rng('gating'), logits.shape)
      gates = jax.nn.softmax(noisy)
      metrics['load_loss'] = load_loss(logits, noisy, sigma, k)
      losses.append((self.load_loss_weight, 'load_loss'))
    metrics['gshard_loss'] = gshard_loss(gates)
    losses.append((self.gshard_loss_weight, 'gshard_loss'))
    # Losses with weight 0 are left out of the sum: some have ill-defined gradients.
    metrics['auxiliary_loss'] = sum(
        (w * metrics[n] for w, n in losses if w > 0), jnp.zeros(x.shape[0], x.dtype))
    dispatcher = self.dispatcher or {}
    capacity = capacity_from_config(dispatcher, s * k, e)
    routing = routing_lib.top_experts_per_item(
        gates, k, capacity, bool(dispatcher.get('batch_priority', False)))
    return routing, metrics


class NoisyTopItemsPerExpertRouter(nn.Module):
  """Expert choice (arXiv 2202.09368): each expert takes its top-C tokens by gate.

  Gates are the (noisy in training) softmax over experts; capacity comes from S, not
  S * K. Loads are balanced by construction, so there is no auxiliary loss; a token may be
  taken by 0..E experts.
  """
  num_experts: int
  noise_std: float = 1.0
  dispatcher: Optional[Mapping[str, Any]] = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    g, s, _ = x.shape
    e = self.num_experts
    logits = nn.Dense(e, use_bias=False, name='dense')(x)  # [G, S, E]
    self.sow('intermediates', 'logits', logits)
    if train and self.noise_std > 0:
      logits = logits + (self.noise_std / e) * jax.random.normal(
          self.make_rng('gating'), logits.shape)
    gates = jax.nn.softmax(logits)
    capacity = capacity_from_config(self.dispatcher or {}, s, e)
    routing = routing_lib.top_items_per_expert(gates, capacity)
    per_item = jnp.zeros((g, s), jnp.int32).at[
        jnp.arange(g)[:, None], routing.slot_token.reshape(g, -1)].add(1)
    metrics = {
        'auxiliary_loss': jnp.zeros((g,), x.dtype),
        'num_experts_per_item_min': jnp.min(per_item, axis=1),
        'num_experts_per_item_max': jnp.max(per_item, axis=1),
        'min_selected_gate': jnp.min(routing.slot_weight, axis=(1, 2)),
        'max_selected_gate': jnp.max(routing.slot_weight, axis=(1, 2)),
    }
    for n in (2 ** i for i in range(e.bit_length()) if 2 ** i <= e):
      metrics[f'ratio_processed_items_by_at_least_{n}_experts'] = jnp.mean(
          per_item >= n, axis=1)
    return routing, metrics


ROUTERS = {
    'NoisyTopExpertsPerItemRouter': NoisyTopExpertsPerItemRouter,
    'NoisyTopItemsPerExpertRouter': NoisyTopItemsPerExpertRouter,
}


def router_fields(name: str) -> tuple[str, ...]:
  """Config keys a router accepts (its dataclass fields, plus 'name')."""
  cls = ROUTERS[name]
  return ('name',) + tuple(f.name for f in dataclasses.fields(cls)
                           if f.name not in ('parent', 'name', 'num_experts'))
