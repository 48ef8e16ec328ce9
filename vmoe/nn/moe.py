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
import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import ensemble
from vmoe.nn import mlp
from vmoe.nn import routers as routers_lib
from vmoe.nn import routing as routing_lib
from vmoe.nn import spec as spec_lib
from vmoe.nn.routers import common as router_metrics

Array = jax.Array
P = jax.sharding.PartitionSpec
# Params of the experts, stacked on a leading E axis ([L, E, ...] when scanned).
EXPERT_PARAMS = r'(^|/)Moe/Mlp/'
# The per-expert biases of bias load balancing: not trained by the loss, moved by their
# pseudo-gradient (vmoe.nn.routers.softmax, vmoe.train.optimizers).
BALANCE_PARAMS = r'(^|/)Moe/Router/balance_bias$'


def is_expert_param(name: str) -> bool:
  """name: a '/'-joined param (or optimizer-state) path."""
  return bool(re.search(EXPERT_PARAMS, name))


def is_balance_param(name: str) -> bool:
  """name: a '/'-joined param path."""
  return bool(re.search(BALANCE_PARAMS, name))


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
    spec: the resolved MoE layer (vmoe/nn/spec.py): router, dispatch kind, group size S
      (all tokens [B, T] are split into B*T/S groups that are routed independently),
      capacity, shared experts, ...
    mlp_dim, dropout_rate: the experts' hidden width and dropout (spec.dropout_rate, or
      the encoder's).
    compute_dtype: matmul precision of the experts (vmoe/nn/precision.py): 'float32' or
      'bfloat16' (bf16 inputs, float32 accumulation); the router stays float32.
    sharding: the device mesh's axes for the groups and the experts, or None (no
      sharding annotations; e.g. on one device).
  """
  spec: spec_lib.MoeSpec
  mlp_dim: int
  dropout_rate: float = 0.0
  compute_dtype: str = 'float32'
  sharding: Optional[Sharding] = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None,
               routing: Optional[routing_lib.ImageRouting] = None):
    """x: [B, T, D], labels: optional int [B] -> ([B, T, D], metrics of [G] arrays).
    E3 (spec.ensemble_size M > 1): B counts the M rows of each image (vmoe/nn/ensemble.py).

    routing: the encoder's per-image decision for every MoE layer (PerImageRouter with
    scope 'model'); without it the layer routes x with its own router, `Router`.
    """
    b, t, d = x.shape
    spec = self.spec
    s, m = spec.group_size, spec.ensemble_size
    xg = ensemble.to_groups(x, m, s)  # [B, T] in order; E3: [B, M, T] -> [B, T, M].
    if self.sharding is not None:
      xg = self.sharding.groups(xg)
    metrics = {}
    router = routers_lib.ROUTERS[spec.router]
    if routing is None and m > 1:
      routing, metrics = ensemble.route(router, spec.router_kwargs(), xg, m,
                                        train=train)
    elif routing is None:
      routing, metrics = router(**spec.router_kwargs(), name='Router')(
          xg, train=train, labels=labels)
    kind = spec.dispatch
    if isinstance(routing, routing_lib.ImageRouting):
      if spec.uses_chosen_experts(b, train):
        kind = 'chosen'
      else:
        routing = routing.tokens
    self._routing_metrics(routing, s, metrics)
    dispatcher = routing_lib.DISPATCHERS[kind](routing, s)
    # bfloat16 dispatch moves tokens in bfloat16 (half the memory and all-to-all bytes);
    # the experts still see the layer's dtype.
    io_dtype = jnp.bfloat16 if spec.bfloat16 else x.dtype
    experts = mlp.ExpertMlp(self.mlp_dim, spec.num_experts, self.dropout_rate,
                            spec.split_rngs, self.compute_dtype, name='Mlp')
    # Buffers [G, E, C, D] go to the experts' devices and back (all-to-all on a mesh with
    # an 'expert' axis); ragged rows [G*S*K, D] and chosen experts' images stay where they
    # are (the chosen experts' weights are gathered to them).
    buffers = isinstance(dispatcher, routing_lib.Buffers)
    x_in = dispatcher.dispatch(xg.astype(io_dtype))
    if buffers:
      x_in = _to_experts(x_in, self.sharding)
    y = experts(x_in.astype(x.dtype), train=train, group_sizes=dispatcher.group_sizes,
                experts=dispatcher.experts)
    y = y.astype(io_dtype)
    out = dispatcher.combine(_to_groups(y, self.sharding) if buffers else y)
    out = ensemble.from_groups(out.astype(x.dtype), m, t)
    # ViMoE shared experts: dense MLPs every token goes through, added to the routed output.
    for i in range(spec.shared_experts):
      out = out + mlp.MlpBlock(self.mlp_dim, self.dropout_rate, self.compute_dtype,
                               name=f'SharedMlp_{i}')(x, train=train)
    return out, metrics

  def _routing_metrics(self, routing, s: int, metrics: dict):
    """Adds the load metrics of a hard routing to `metrics`, and sows its per-token view
    (buffer slot, or rank of the chosen expert, and weight: [G, S, E]) for the routing
    analysis. Soft MoE has none: every token reaches every slot."""
    if isinstance(routing, routing_lib.DenseRouting):
      return
    if isinstance(routing, routing_lib.ImageRouting):
      metrics.update(router_metrics.image_metrics(routing, self.spec.num_experts))
    else:
      metrics.update(router_metrics.routing_metrics(routing, s))
    if self.is_mutable_collection('intermediates'):
      slot, weight = routing.per_token(s)
      self.sow('intermediates', 'buffer_slot', slot)
      self.sow('intermediates', 'combine_weight', weight)
