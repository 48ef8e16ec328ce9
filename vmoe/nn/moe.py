"""The MoE layer: group tokens, route them, run the experts, combine.

One expert code path (`mlp.ExpertMlp`, experts stacked on a leading E axis) serves every
router and every dispatch kind; routers only decide who goes where (vmoe/nn/routing.py).

On a device mesh (`sharding`, set by the trainer from config.mesh) the groups stay where
the batch is, split over every mesh axis, while the expert buffers [G, E, C, D] are split
with E over the 'expert' axis and G over the others: each buffer is pinned to the batch
layout, then to the expert layout, and XLA moves it between the two by all-to-all (and
back after the experts). Without `sharding` the layer has no sharding annotation at all.
"""
import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import mlp
from vmoe.nn import routers as routers_lib
from vmoe.nn import routing as routing_lib

Array = jax.Array
P = jax.sharding.PartitionSpec


@dataclasses.dataclass(frozen=True)
class Sharding:
  """Where a MoE layer's arrays live on a device mesh (vmoe.parallel.mesh.moe_sharding).

  mesh: the device mesh; batch: its axes the batch, hence the groups [G], is split over;
  expert: its axis the experts [E] are split over (one of `batch`), or None.
  """
  mesh: jax.sharding.Mesh
  batch: tuple[str, ...]
  expert: Optional[str] = None

  def groups(self, x: Array) -> Array:
    """x: [G, ...] with G split over all the batch axes."""
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(self.mesh, P(self.batch)))

  def experts(self, x: Array) -> Array:
    """x: [G, E, ...] with E split over the expert axis, G over the other batch axes."""
    rest = tuple(a for a in self.batch if a != self.expert)
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(self.mesh, P(rest, self.expert)))


def _to_experts(x: Array, sharding: Optional[Sharding]) -> Array:
  """Dispatched buffers [G, E, C, D]: batch layout -> expert layout (all-to-all)."""
  return x if sharding is None else sharding.experts(sharding.groups(x))


def _to_groups(y: Array, sharding: Optional[Sharding]) -> Array:
  """Expert outputs [G, E, C, D]: expert layout -> batch layout (all-to-all)."""
  return y if sharding is None else sharding.groups(sharding.experts(y))


class MoeLayer(nn.Module):
  """Sparse (or soft) MoE of MLPs. Params: Router/..., Mlp/Dense_{0,1} with leading E.

  Attributes:
    group_size: S, tokens per group; all tokens [B, T] are split into B*T/S groups that
      are routed independently.
    router: router config (name, its options, and `dispatcher` {name: 'einsum' |
      'indices' | 'ragged', capacity or capacity_factor, batch_priority, bfloat16, ...}).
    compute_dtype: matmul precision of the experts (vmoe/nn/precision.py): 'float32' or
      'bfloat16' (bf16 inputs, float32 accumulation); the router stays float32.
    split_rngs: initialise each expert with its own random draw (else all the same).
    sharding: the device mesh's axes for the groups and the experts, or None (no
      sharding annotations; e.g. on one device).
  """
  mlp_dim: int
  num_experts: int
  group_size: int
  router: Optional[Mapping[str, Any]] = None
  dropout_rate: float = 0.0
  split_rngs: bool = False
  shared_experts: int = 0
  sharding: Optional[Sharding] = None
  compute_dtype: str = 'float32'

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
    if self.sharding is not None:
      xg = self.sharding.groups(xg)
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
    experts = mlp.ExpertMlp(self.mlp_dim, self.num_experts, self.dropout_rate,
                            self.split_rngs, self.compute_dtype, name='Mlp')
    if kind == 'ragged':  # Rows sorted by expert [G*S*K, D], no capacity buffers.
      if self.sharding is not None and self.sharding.expert is not None:
        raise ValueError("dispatcher.name='ragged' has no expert parallelism (its rows are "
                         "sorted across all groups); use 'indices' on a mesh with an "
                         "'expert' axis.")
      routing = routing.sorted_by_expert()
      x_in = routing.dispatch(xg.astype(io_dtype), kind).astype(x.dtype)
      y = experts(x_in, train=train, group_sizes=routing.group_sizes)
      out = routing.combine(y.astype(io_dtype), kind, s)
    else:
      x_in = _to_experts(routing.dispatch(xg.astype(io_dtype), kind),  # [G, E, C, D]
                         self.sharding).astype(x.dtype)
      y = experts(x_in, train=train)
      out = routing.combine(_to_groups(y.astype(io_dtype), self.sharding), kind, s)
    out = out.astype(x.dtype).reshape(b, t, d)
    # ViMoE shared experts: dense MLPs every token goes through, added to the routed output.
    for i in range(self.shared_experts):
      out = out + mlp.MlpBlock(self.mlp_dim, self.dropout_rate, self.compute_dtype,
                               name=f'SharedMlp_{i}')(x, train=train)
    return out, metrics
