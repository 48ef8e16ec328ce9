"""The MoE layer: group tokens, route them, run the experts, combine.

One expert code path (`mlp.ExpertMlp`, experts stacked on a leading E axis) serves every
router and every dispatch kind; routers only decide who goes where (vmoe/nn/routing.py).
"""
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import mlp
from vmoe.nn import routers as routers_lib
from vmoe.nn import routing as routing_lib

Array = jax.Array

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
  shared_experts: int = 0

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [B, T, D], labels: optional int [B] -> ([B, T, D], metrics of [G] arrays)."""
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
        num_experts=self.num_experts, name='Router', **router)(
            xg, train=train, tokens_per_image=t, labels=labels)
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
    y = mlp.ExpertMlp(self.mlp_dim, self.num_experts, self.dropout_rate, self.split_rngs,
                  name='Mlp')(x_in, train=train)
    out = routing.combine(y.astype(io_dtype), kind, s).astype(x.dtype).reshape(b, t, d)
    # ViMoE shared experts: dense MLPs every token goes through, added to the routed output.
    for i in range(self.shared_experts):
      out = out + mlp.MlpBlock(self.mlp_dim, self.dropout_rate, name=f'SharedMlp_{i}')(
          x, train=train)
    return out, metrics
