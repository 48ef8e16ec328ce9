"""What every router shares: the gating layer, its noise, auxiliary losses, load metrics."""
from typing import Optional
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import routing as routing_lib

Array = jax.Array
DTYPES = (None, 'float32', 'bfloat16', 'float16')


class Router(nn.Module):
  """Attributes every router has (vmoe.nn.models resolves the first two).

  num_experts: E; capacity: slots per expert.
  noise_std: gating noise N(0, (noise_std / E)^2) on the logits, where the router uses it.
  deterministic: None (the reference's default: noise in training only), True (never
    noise) or False (noise at evaluation too; without a 'gating' rng stream, as in
    evaluation, the noise comes from a fixed key, so evaluation stays reproducible).
  dtype: the gating layer's computation dtype (None: the input's), as the reference.
  z_loss_weight: weight of the router z-loss (ST-MoE, arXiv 2202.08906), mean over tokens
    of logsumexp(logits)^2; it keeps the logits small. 0 (the default) leaves it out.
  """
  num_experts: int
  capacity: int
  noise_std: float = 1.0
  deterministic: Optional[bool] = None
  dtype: Optional[str] = None
  z_loss_weight: float = 0.0

  @nn.nowrap
  def gating_logits(self, x: Array) -> Array:
    """x: [G, S, D] -> logits [G, S, E] of the gating layer `dense` (sown)."""
    logits = nn.Dense(self.num_experts, use_bias=False, dtype=self.dtype,
                      name='dense')(x)
    self.sow('intermediates', 'logits', logits)
    return logits

  @nn.nowrap
  def noisy(self, train: bool) -> bool:
    """Whether gating noise applies in this call."""
    on = train if self.deterministic is None else not self.deterministic
    return on and self.noise_std > 0

  @nn.nowrap
  def noise(self, shape, std: float) -> Array:
    """N(0, std^2) of `shape` from the 'gating' stream; without one (evaluation), from a
    key fixed per layer (its module path)."""
    key = (self.make_rng('gating') if self.has_rng('gating') else jax.random.key(
        zlib.crc32('/'.join(self.path).encode())))
    return std * jax.random.normal(key, shape)

  @nn.nowrap
  def with_z_loss(self, metrics: dict, logits: Array, axis=-1) -> dict:
    """metrics with 'z_loss' [G] of `logits` [G, S, ...] (softmax over `axis`) and, if
    z_loss_weight > 0, its weighted value added to 'auxiliary_loss'."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=axis)
    metrics['z_loss'] = jnp.mean(jnp.square(z).reshape(z.shape[0], -1), axis=1)
    if self.z_loss_weight > 0:
      metrics['auxiliary_loss'] = (metrics['auxiliary_loss']
                                   + self.z_loss_weight * metrics['z_loss'])
    return metrics


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


def experts_per_token(routing: routing_lib.SparseRouting, num_tokens: int) -> Array:
  """[G, S] number of experts that process each token (empty slots hold S: dropped)."""
  g = routing.slot_token.shape[0]
  return jnp.zeros((g, num_tokens + 1), jnp.int32).at[
      jnp.arange(g)[:, None], routing.slot_token.reshape(g, -1)].add(1)[:, :num_tokens]


def routing_metrics(routing: routing_lib.SparseRouting, num_tokens: int) -> dict:
  """Per-group load statistics of a hard routing.

  dropped_tokens: [G] fraction of tokens processed by no expert (only the residual).
  expert_load: [G, E] fraction of all routed tokens that expert e processed.
  """
  filled = routing.slot_token < num_tokens  # [G, E, C]
  per_expert = jnp.sum(filled, axis=-1).astype(jnp.float32)
  hits = experts_per_token(routing, num_tokens)
  return {
      'dropped_tokens': jnp.mean(hits == 0, axis=-1),
      'expert_load': per_expert / jnp.maximum(jnp.sum(per_expert, -1, keepdims=True), 1),
  }


def image_metrics(routing: routing_lib.ImageRouting, num_experts: int) -> dict:
  """routing_metrics of the chosen-experts path: nothing is dropped, and each expert's
  load is its share of the group's image choices."""
  g = routing.tokens.slot_token.shape[0]
  b, k = routing.expert.shape
  per_expert = jnp.sum(jax.nn.one_hot(routing.expert, num_experts), axis=1)  # [B, E]
  per_expert = jnp.sum(per_expert.reshape(g, b // g, num_experts), axis=1)
  return {'dropped_tokens': jnp.zeros((g,), jnp.float32),
          'expert_load': per_expert / (b // g * k)}


def expert_choice_metrics(routing: routing_lib.SparseRouting, num_tokens: int,
                          num_experts: int) -> dict:
  """Per-group statistics of routers where experts pick tokens (names of the reference)."""
  g = routing.slot_token.shape[0]
  per_item = experts_per_token(routing, num_tokens)
  metrics = {
      'auxiliary_loss': jnp.zeros((g,), jnp.float32),
      'num_experts_per_item_min': jnp.min(per_item, axis=1),
      'num_experts_per_item_max': jnp.max(per_item, axis=1),
      'min_selected_gate': jnp.min(routing.slot_weight, axis=(1, 2)),
      'max_selected_gate': jnp.max(routing.slot_weight, axis=(1, 2)),
  }
  for n in (2 ** i for i in range(num_experts.bit_length()) if 2 ** i <= num_experts):
    metrics[f'ratio_processed_items_by_at_least_{n}_experts'] = jnp.mean(per_item >= n, 1)
  return metrics
