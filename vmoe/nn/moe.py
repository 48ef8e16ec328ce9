"""The MoE layer: group tokens, route them, run the experts, combine.

One expert code path (`ExpertMlp`, experts stacked on a leading E axis) serves every
router and every dispatch kind; routers only decide who goes where (vmoe/nn/routing.py).
"""
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import routers as routers_lib
from vmoe.nn import routing as routing_lib

Array = jax.Array

# Dense MLP initialisers of ViT (vit_jax MlpBlock), used for dense and expert MLPs alike.
KERNEL_INIT = nn.initializers.xavier_uniform()
BIAS_INIT = nn.initializers.normal(stddev=1e-6)


def _stacked(init, num_experts: int, split: bool):
  """Initialiser of [E, ...] params: E draws (split) or one draw shared by all experts."""
  def f(key, shape, dtype=jnp.float32):
    if split:
      return jax.vmap(lambda k: init(k, shape[1:], dtype))(jax.random.split(key, num_experts))
    return jnp.broadcast_to(init(key, shape[1:], dtype), shape)
  return f


class ExpertDense(nn.Module):
  """E independent dense layers. x: [E, M, D_in] -> [E, M, features]."""
  features: int
  num_experts: int
  split_rngs: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    e, d = self.num_experts, x.shape[-1]
    kernel = self.param('kernel', _stacked(KERNEL_INIT, e, self.split_rngs),
                        (e, d, self.features))
    bias = self.param('bias', _stacked(BIAS_INIT, e, self.split_rngs), (e, self.features))
    return jnp.einsum('emd,edh->emh', x, kernel) + bias[:, None, :]


class ExpertMlp(nn.Module):
  """E expert MLPs (D -> H -> D, tanh-GELU). x: [G, E, C, D] -> [G, E, C, D]."""
  mlp_dim: int
  num_experts: int
  dropout_rate: float = 0.0
  split_rngs: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    g, e, c, d = x.shape
    # [E, G*C, D]: each expert's buffer is contiguous, the layout expert parallelism
    # shards on its leading axis.
    h = jnp.swapaxes(x, 0, 1).reshape(e, g * c, d)
    h = ExpertDense(self.mlp_dim, e, self.split_rngs, name='Dense_0')(h)
    h = nn.gelu(h)
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = ExpertDense(d, e, self.split_rngs, name='Dense_1')(h)
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return jnp.swapaxes(h.reshape(e, g, c, d), 0, 1)


class MoeLayer(nn.Module):
  """Sparse (or soft) MoE of MLPs. Params: Router/..., Mlp/Dense_{0,1} with leading E.

  Attributes:
    group_size: S, tokens per group; all tokens [B, T] are split into B*T/S groups that
      are routed independently.
    router: router config (name, its options, and `dispatcher` {name: 'einsum' |
      'indices', capacity or capacity_factor, batch_priority, bfloat16, ...}).
    split_rngs: initialise each expert with its own random draw (else all the same).
  """
  mlp_dim: int
  num_experts: int
  group_size: int
  router: Optional[Mapping[str, Any]] = None
  dropout_rate: float = 0.0
  split_rngs: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool):
    """x: [B, T, D] -> ([B, T, D], metrics of [G] arrays)."""
    b, t, d = x.shape
    s = self.group_size
    if (b * t) % s:
      raise ValueError(
          f'group_size={s} does not divide the {b * t} tokens of the batch ({b} images x '
          f'{t} tokens); use a multiple of {t} tokens per group (whole images) that '
          f'divides {b * t}.')
    xg = x.reshape(b * t // s, s, d)
    router = dict(self.router or {})
    name = router.pop('name', 'NoisyTopExpertsPerItemRouter')
    dispatcher = dict(router.get('dispatcher') or {})
    kind = dispatcher.get('name', 'einsum')
    routing, metrics = routers_lib.ROUTERS[name](
        num_experts=self.num_experts, name='Router', **router)(xg, train=train)
    if isinstance(routing, routing_lib.SparseRouting):
      metrics.update(routers_lib.routing_metrics(routing, s))
      if self.is_mutable_collection('intermediates'):
        slot, weight = routing.per_token(s)
        self.sow('intermediates', 'buffer_slot', slot)
        self.sow('intermediates', 'combine_weight', weight)
    # bfloat16 dispatch moves tokens in bfloat16 (half the memory and all-to-all bytes);
    # the experts still see the layer's dtype.
    io_dtype = jnp.bfloat16 if dispatcher.get('bfloat16', False) else x.dtype
    x_in = routing.dispatch(xg.astype(io_dtype), kind).astype(x.dtype)  # [G, E, C, D]
    y = ExpertMlp(self.mlp_dim, self.num_experts, self.dropout_rate, self.split_rngs,
                  name='Mlp')(x_in, train=train)
    out = routing.combine(y.astype(io_dtype), kind, s).astype(x.dtype)
    return out.reshape(b, t, d), metrics
