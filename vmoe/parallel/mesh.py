"""Device meshes, where the train state and the batches live on them, global batches.

config.mesh maps axis names ('data', 'expert') to sizes over all devices of all
processes, one of them -1 for the rest (default {'data': -1}: plain data
parallelism). The batch is split over every axis of the mesh; the experts' weights
(and their optimizer state) over 'expert', everything else is replicated, or split
over 'data' too with config.fsdp (vmoe.parallel.rules). Inside each MoE layer the
tokens move between the batch layout and the expert layout by all-to-all
(vmoe.nn.moe.Sharding, built here by `moe_sharding`).

Axis types are Auto: the model code carries no sharding annotations except the MoE
layer's constraints, and the compiler propagates the batch sharding through its
reshapes and einsums, where Explicit axes would demand an out_sharding at every
reshape that touches the batch axis.
"""
import collections
from typing import Any, Iterable, Iterator, Mapping, Optional

import jax
import numpy as np

from vmoe.nn import moe
from vmoe.parallel import rules

P = jax.sharding.PartitionSpec
# Mesh axes in device order: 'expert' varies fastest, so that the devices exchanging
# tokens by all-to-all are neighbours (on one host when the expert axis fits in it).
AXES = ('data', 'expert')
DEFAULT_MESH = {'data': -1}


def check_mesh(spec: Optional[Mapping[str, int]], num_devices: int, where='config.mesh'
               ) -> dict[str, int]:
  """config.mesh -> {axis: size} over num_devices, in AXES order; ValueError if bad."""
  spec = dict(DEFAULT_MESH if spec is None else spec)
  unknown = sorted(set(spec) - set(AXES))
  if unknown:
    raise ValueError(f'{where} has unknown axis name(s) {unknown}; valid: {list(AXES)}, '
                     "e.g. {'data': -1, 'expert': 4}.")
  try:
    shape = rules.mesh_shape(spec, num_devices)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None
  return {a: shape[a] for a in AXES if a in shape}


def make_mesh(spec: Optional[Mapping[str, int]] = None) -> jax.sharding.Mesh:
  """The mesh of config.mesh (default: 1-D 'data') over all devices of all processes."""
  shape = check_mesh(spec, jax.device_count())
  return jax.make_mesh(tuple(shape.values()), tuple(shape),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def batch_spec(mesh: jax.sharding.Mesh) -> P:
  """[B, ...] split over every axis of the mesh."""
  return P(tuple(mesh.axis_names))


def moe_sharding(mesh: jax.sharding.Mesh) -> Optional[moe.Sharding]:
  """What the MoE layers need to know of the mesh (None on a single device)."""
  if mesh.size == 1:
    return None
  expert = 'expert' if mesh.shape.get('expert', 1) > 1 else None
  return moe.Sharding(mesh, tuple(mesh.axis_names), expert)


def state_sharding(mesh: jax.sharding.Mesh, abstract_state: Any, *, fsdp: bool = False
                   ) -> Any:
  """NamedShardings of a train state (or any tree of arrays) by the sharding rules.

  Optimizer-state leaves carry their param's path as a suffix, so e.g. Adam's mu and
  nu of an expert kernel get that kernel's spec.
  """
  specs = rules.partition_specs(abstract_state, dict(mesh.shape), fsdp=fsdp)
  return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def global_batch(local: Mapping[str, np.ndarray], sharding) -> dict:
  """This process's rows -> global jax arrays (split as `sharding` says)."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def device_batches(local: Iterable[Mapping[str, np.ndarray]], sharding, *, prefetch: int = 1
                   ) -> Iterator[dict]:
  """Global batches of the process-local ones, `prefetch` of them already sent to the
  devices while the step before them runs (dataset.prefetch_device, as in the
  reference; 0: each batch is sent when it is asked for)."""
  queue = collections.deque()
  for batch in local:
    queue.append(global_batch(batch, sharding))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
