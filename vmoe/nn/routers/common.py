"""What every router shares: auxiliary losses and load metrics."""
import jax
import jax.numpy as jnp

from vmoe.nn import routing as routing_lib

Array = jax.Array


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
