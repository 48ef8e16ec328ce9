"""Soft MoE (arXiv 2308.00951): every slot is a softmax-weighted mix of all tokens."""
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import routing as routing_lib

Array = jax.Array


def l2_normalize(x: Array, axis: int, eps: float = 1e-6) -> Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + eps)


class SoftRouter(nn.Module):
  """Params mu [D, E, P] and a learned scalar scale (init 1), as in the reference.

  logits[s, e, p] = scale * <x_s / |x_s|, mu_ep / |mu_ep|>; dispatch = softmax over tokens
  (each slot mixes tokens), combine = softmax over all slots (each token mixes slots).
  P = num_slots, or round(S * capacity_factor / E). No token is dropped; no auxiliary loss.
  """
  num_experts: int
  num_slots: Optional[int] = None
  capacity_factor: Optional[float] = 1.0
  noise_std: float = 0.0
  dispatcher: Optional[Mapping[str, Any]] = None  # Only `name` ('einsum') and `bfloat16`.

  @nn.compact
  def __call__(self, x: Array, *, train: bool, **unused):
    """x: [G, S, D] -> (DenseRouting [G, S, E, P], metrics of [G] arrays)."""
    g, s, d = x.shape
    p = self.num_slots or routing_lib.compute_capacity(
        s, self.num_experts, self.capacity_factor, 'round', 1)
    mu = self.param('mu', nn.initializers.lecun_normal(), (d, self.num_experts, p))
    scale = self.param('scale', nn.initializers.ones, ())
    logits = jnp.einsum('gsd,dep->gsep', l2_normalize(x, -1) * scale, l2_normalize(mu, 0))
    self.sow('intermediates', 'logits', logits)
    if train and self.noise_std > 0:
      logits = logits + self.noise_std * jax.random.normal(self.make_rng('gating'),
                                                           logits.shape)
    dispatch = jax.nn.softmax(logits, axis=1)
    combine = jax.nn.softmax(logits, axis=(2, 3))
    metrics = {
        'auxiliary_loss': jnp.zeros((g,), x.dtype),
        'dispatch_weights_max': jnp.mean(jnp.max(dispatch, axis=1), axis=(1, 2)),
        'combine_weights_max': jnp.mean(jnp.max(combine, axis=(2, 3)), axis=1),
        'scale': jnp.broadcast_to(scale, (g,)),
    }
    return routing_lib.DenseRouting(dispatch, combine), metrics
