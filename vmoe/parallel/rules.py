"""Where arrays live on a device mesh: mesh shapes from configs, and sharding rules.

Params get a PartitionSpec from ordered (regex, axes) rules matched against their
'/'-joined path (first match wins; `axes` names the mesh axis of each leading dim, None
for replicated). By default the experts' weights (`.../Moe/Mlp/Dense_k/{kernel,bias}`,
leading axis E) are split over the 'expert' axis and everything else is replicated; with
`fsdp=True` the largest other dimension divisible by the 'data' axis is split over it
too. Optimizer state follows the params (its leaves carry the param paths as suffixes).
"""
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

P = jax.sharding.PartitionSpec
# Scanned blocks (vmoe/nn/scan.py) stack their params on a leading layer axis: [L, E, ...].
EXPERT_RULES = ((r'(^|/)scan_\d+_\d+x\d+/block_\d+/Moe/Mlp/', (None, 'expert')),
                (r'(^|/)Moe/Mlp/', ('expert',)))


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


def path_of(keys) -> str:
  """jax key path -> 'Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in keys)


def spec_for(path: str, shape: Sequence[int], mesh: Mapping[str, int], *,
             rules=EXPERT_RULES, fsdp: bool = False) -> P:
  """PartitionSpec of one array: the first matching rule, dims that do not divide stay
  replicated (e.g. a scalar optimizer count)."""
  axes = [None] * len(shape)
  for pattern, rule_axes in rules:
    if re.search(pattern, path):
      for i, axis in enumerate(rule_axes[:len(shape)]):
        if axis is not None and mesh.get(axis, 1) > 1 and shape[i] % mesh[axis] == 0:
          axes[i] = axis
      break
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
  return jax.tree_util.tree_map_with_path(
      lambda keys, x: spec_for(path_of(keys), np.shape(x), mesh, rules=rules, fsdp=fsdp),
      tree)


def check_experts(params: Any, mesh: Mapping[str, int], rules=EXPERT_RULES):
  """The expert axis must divide the number of experts of every MoE layer."""
  size = mesh.get('expert', 1)
  for keys, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = path_of(keys)
    axes = next((a for p, a in rules if re.search(p, path)), ())
    e = np.shape(x)[axes.index('expert')] if 'expert' in axes else None
    if size > 1 and e is not None and e % size:
      raise ValueError(f'{path} has {e} experts, not divisible by the mesh '
                       f"axis 'expert' of size {size}; use num_experts a multiple of {size} "
                       'or a smaller expert axis.')


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
