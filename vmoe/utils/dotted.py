"""Dotted config keys ('encoder.moe.router.dispatcher.capacity_factor'): check, flatten, set."""
from typing import Any, Mapping

from vmoe.utils import checks


def check_path(config: Any, path: str):
  """Raises ValueError if `path` (e.g. 'optimizer.b1') is not in `config`, listing the
  valid keys where the lookup fails."""
  node, seen = config, []
  for part in path.split('.'):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      where = '.'.join(['config'] + seen)
      raise ValueError(f'Unknown config key {path!r}: {where} has no key {part!r}; valid '
                       f'keys: {sorted(keys)} (an override can only change keys the '
                       'config file defines).')
    node, seen = node[part], seen + [part]


def has_path(config: Any, path: str) -> bool:
  try:
    check_path(config, path)
  except ValueError:
    return False
  return True


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'encoder': {'moe': {'k': v}}} -> {'encoder.moe.k': v}."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(flatten(v, f'{prefix}{k}.'))
    else:
      flat[f'{prefix}{k}'] = v
  return flat


def with_values(config: Any, values: Mapping[str, Any]) -> dict:
  """A plain-dict copy of `config` with e.g. {'encoder.moe.group_size': 8} set; missing
  sub-configs on the way are created."""
  c = checks.to_dict(config)
  for key, value in values.items():
    node = c
    *path, last = key.split('.')
    for p in path:
      if node.get(p) is None:
        node[p] = {}
      elif not isinstance(node[p], dict):
        raise ValueError(f'Override {key!r}: {p!r} is not a sub-config.')
      node = node[p]
    node[last] = value
  return c
