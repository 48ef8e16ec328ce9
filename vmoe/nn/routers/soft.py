"""Soft MoE (arXiv 2308.00951): every slot is a softmax-weighted mix of all tokens."""
from typing import Optional

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
  capacity: P slots per expert, from the config's `num_slots`, or round(S *
  `capacity_factor` / E) (vmoe.nn.models). No token is dropped; no auxiliary loss.
  """
  SLOTS = 'soft'
  # Config keys that size the slots (hard routers size theirs under `dispatcher`).
  SIZING_KEYS = ('num_slots', 'capacity_factor')
  num_experts: int
  capacity: int
  noise_std: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (DenseRouting [G, S, E, P], metrics of [G] arrays)."""
    del labels  # Only super-class guided routing learns from the labels.
    g, _, d = x.shape
    mu = self.param('mu', nn.initializers.lecun_normal(), (d, self.num_experts, self.capacity))
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
