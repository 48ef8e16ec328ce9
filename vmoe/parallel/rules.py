"""Where arrays live on a device mesh: mesh shapes from configs, and sharding rules.

Params get a PartitionSpec from ordered (regex, axes) rules matched against their
'/'-joined path (first match wins; `axes` names the mesh axis of each leading dim, None
for replicated). By default the experts' weights (`.../Moe/Mlp/Dense_k/{kernel,bias}`,
leading axis E) are split over the 'expert' axis and everything else is replicated; with
`fsdp=True` the largest other dimension divisible by the 'data' axis is split over it
too. Optimizer state follows the params (its leaves carry the param paths as suffixes).
"""
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from vmoe.nn import moe
from vmoe.nn import scan
from vmoe.utils import paths

P = jax.sharding.PartitionSpec
# Scanned blocks (vmoe/nn/scan.py) stack their params on a leading layer axis: [L, E, ...].
EXPERT_RULES = ((scan.SCANNED.pattern + moe.EXPERT_PARAMS.removeprefix('(^|/)'),
                 (None, 'expert')),
                (moe.EXPERT_PARAMS, ('expert',)))


def parse_mesh(spec: str) -> dict[str, int]:
  """'data:16,expert:32' -> {'data': 16, 'expert': 32} (sizes may be -1)."""
  items = {}
  for item in filter(None, spec.split(',')):
    name, sep, size = item.partition(':')
    try:
      items[name.strip()] = int(size)
    except ValueError:
      sep = ''
    if not sep or not name.strip():
      raise ValueError(f'Bad mesh item {item!r} in {spec!r}: expected NAME:SIZE, e.g. '
                       "'data:16,expert:32'.")
  return items


def mesh_shape(spec: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
  """'data:16,expert:32' or {'data': -1, 'expert': 4} -> {axis: size} over num_devices.

  One axis may be -1: it takes the devices the others leave.
  """
  if isinstance(spec, str):
    spec = parse_mesh(spec)
  shape = dict(spec)
  fill = [k for k, v in shape.items() if v == -1]
  bad = {k: v for k, v in shape.items() if v != -1 and (not isinstance(v, int) or v < 1)}
  if bad or len(fill) > 1 or not shape:
    raise ValueError(f'Mesh {dict(spec)} is invalid: sizes must be positive integers, at '
                     'most one of them -1 (the rest of the devices).')
  known = math.prod(v for v in shape.values() if v != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f'Mesh {dict(spec)}: {num_devices} devices are not a multiple of '
                       f'{known}; change the fixed axis sizes.')
    shape[fill[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f'Mesh {shape} has {math.prod(shape.values())} devices but there are '
                     f'{num_devices}; make the sizes multiply to {num_devices} (or use -1).')
  return shape


def spec_for(path: str, shape: Sequence[int], mesh: Mapping[str, int], *,
             rules=EXPERT_RULES, fsdp: bool = False) -> P:
  """PartitionSpec of one array: the first matching rule, dims that do not divide stay
  replicated (e.g. a scalar optimizer count)."""
  axes = [None] * len(shape)
  for i, axis in enumerate(paths.first_match(rules, path, ())[:len(shape)]):
    if axis is not None and mesh.get(axis, 1) > 1 and shape[i] % mesh[axis] == 0:
      axes[i] = axis
  data = mesh.get('data', 1)
  if fsdp and data > 1 and 'data' not in axes:
    free = [i for i, a in enumerate(axes) if a is None and shape[i] % data == 0]
    if free:
      axes[max(free, key=lambda i: shape[i])] = 'data'
  while axes and axes[-1] is None:
    axes.pop()
  return P(*axes)


def partition_specs(tree: Any, mesh: Mapping[str, int], *, rules=EXPERT_RULES,
                    fsdp: bool = False) -> Any:
  """Tree of PartitionSpec for a tree of arrays / ShapeDtypeStructs."""
  return paths.map_with_paths(
      lambda path, x: spec_for(path, np.shape(x), mesh, rules=rules, fsdp=fsdp), tree)


def bytes_per_device(tree: Any, specs: Any, mesh: Mapping[str, int]) -> int:
  """Bytes one device holds of `tree` sharded by `specs` (ceil per split dim)."""
  total = 0
  for x, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(
      specs, is_leaf=lambda s: isinstance(s, P))):
    shape = list(np.shape(x))
    for i, axis in enumerate(spec):
      for a in (axis if isinstance(axis, tuple) else (axis,)):
        if a is not None:
          shape[i] = -(-shape[i] // mesh[a])
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total
