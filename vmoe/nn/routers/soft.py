"""Soft MoE (arXiv 2308.00951): every slot is a softmax-weighted mix of all tokens."""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import routing as routing_lib
from vmoe.nn.routers.common import Router

Array = jax.Array
PRECISIONS = (None, 'default', 'high', 'highest')


def l2_normalize(x: Array, axis: int, eps: float = 1e-6) -> Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + eps)


def initializer(spec: Any, default):
  """An initializer from a config value: None (`default`), a number (that constant), the
  name of a jax.nn.initializers factory (e.g. 'lecun_normal'; 'ones' and 'zeros' as
  they are) or an initializer itself."""
  if spec is None:
    return default
  if isinstance(spec, (int, float)) and not isinstance(spec, bool):
    return nn.initializers.constant(spec)
  if isinstance(spec, str):
    init = getattr(jax.nn.initializers, spec)
    return init if spec in ('ones', 'zeros') else init()
  return spec


def _pairwise_cosine(x: Array, precision) -> Array:
  """x: [G, N, M] -> [G, N, N] cosine similarities between the N vectors of each group."""
  x = x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-9)
  return jnp.einsum('gnm,gkm->gnk', x, x, precision=precision)


def _similarity_stats(sim: Array, name: str) -> dict:
  """min, max and mean over the off-diagonal pairs of sim [G, N, N], per group."""
  n = sim.shape[-1]
  off = ~jnp.eye(n, dtype=bool)
  return {f'{name}_similarity_min': jnp.min(jnp.where(off, sim, jnp.inf), axis=(1, 2)),
          f'{name}_similarity_max': jnp.max(jnp.where(off, sim, -jnp.inf), axis=(1, 2)),
          f'{name}_similarity_mean': jnp.sum(jnp.where(off, sim, 0), axis=(1, 2))
                                     / (n * (n - 1))}


class SoftRouter(Router):
  """Params mu [D, E, P] and a learned scalar scale, as in the reference.

  logits[s, e, p] = <x_s / |x_s|, mu_ep / |mu_ep|> * scale (the scale multiplies the
  smaller of the two normalised arrays, as the reference); dispatch = softmax over tokens
  (each slot mixes tokens), combine = softmax over all slots (each token mixes slots).
  capacity: P slots per expert, from the config's `num_slots`, or round(S *
  `capacity_factor` / E) (vmoe.nn.models). No token is dropped; no auxiliary loss.
  mu_init / scale_init: initializers (see `initializer`; lecun_normal and ones by
  default); precision: of the logits' einsum (None: JAX's default).
  compute_similarity_metrics: also report the cosine similarities between the combine
  weights of token pairs, the dispatch weights of slot pairs and the mu's of slot pairs
  (the reference's metrics; O(S^2 + (EP)^2) per group).
  """
  SLOTS = 'soft'
  # Config keys that size the slots (hard routers size theirs under `dispatcher`).
  SIZING_KEYS = ('num_slots', 'capacity_factor')
  noise_std: float = 0.0
  mu_init: Any = None
  scale_init: Any = None
  precision: Optional[str] = None
  compute_similarity_metrics: bool = True

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (DenseRouting [G, S, E, P], metrics of [G] arrays)."""
    del labels  # Only super-class guided routing learns from the labels.
    g, s, d = x.shape
    e, p = self.num_experts, self.capacity
    dtype = self.dtype or x.dtype
    mu = self.param('mu', initializer(self.mu_init, nn.initializers.lecun_normal()),
                    (d, e, p))
    scale = self.param('scale', initializer(self.scale_init, nn.initializers.ones), ())
    x, mu, scale = (l2_normalize(x.astype(dtype), -1), l2_normalize(mu.astype(dtype), 0),
                    scale.astype(dtype))
    if x.size < mu.size:
      x = x * scale
    else:
      mu = mu * scale
    logits = jnp.einsum('gsd,dep->gsep', x, mu, precision=self.precision)
    self.sow('intermediates', 'logits', logits)
    if self.noisy(train):
      logits = logits + self.noise(logits.shape, self.noise_std)
    dispatch = jax.nn.softmax(logits, axis=1)
    combine = jax.nn.softmax(logits, axis=(2, 3))
    metrics = {
        'auxiliary_loss': jnp.zeros((g,), jnp.float32),
        'combine_weights_min_mean': jnp.mean(jnp.min(combine, axis=(2, 3)), axis=1),
        'combine_weights_max_mean': jnp.mean(jnp.max(combine, axis=(2, 3)), axis=1),
        'dispatch_weights_min_mean': jnp.mean(jnp.min(dispatch, axis=1), axis=(1, 2)),
        'dispatch_weights_max_mean': jnp.mean(jnp.max(dispatch, axis=1), axis=(1, 2)),
        'scale': jnp.broadcast_to(scale, (g,)),
    }
    if self.compute_similarity_metrics:
      slots = jnp.swapaxes(dispatch.reshape(g, s, e * p), 1, 2)  # [G, EP, S]
      mu_sim = _similarity_stats(
          _pairwise_cosine(mu.reshape(d, e * p).T[None], self.precision), 'mu')
      metrics.update(
          **_similarity_stats(_pairwise_cosine(combine.reshape(g, s, e * p),
                                               self.precision), 'combine_weights'),
          **_similarity_stats(_pairwise_cosine(slots, self.precision), 'dispatch_weights'),
          **{k: jnp.broadcast_to(v, (g,)) for k, v in mu_sim.items()})
    return routing_lib.DenseRouting(dispatch, combine), self.with_z_loss(
        metrics, logits, axis=(2, 3))
