"""Config validation helpers: each raises one ValueError that names the key, its value and
the fix. `where` is the dotted name of the value in the config, e.g. 'config.model'."""
import copy
from typing import Any, Iterable, Mapping


def to_dict(config: Any) -> dict:
  """A deep plain-dict copy of a dict or ml_collections.ConfigDict."""
  if hasattr(config, 'to_dict'):
    config = config.to_dict()
  return copy.deepcopy(dict(config))


def check_keys(d: Mapping[str, Any], valid: Iterable[str], where: str):
  unknown = sorted(set(d) - set(valid))
  if unknown:
    raise ValueError(f'Unknown key(s) {unknown} in {where}; valid keys: {sorted(valid)}.')


def is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def positive_int(value, where: str, *, optional: bool = False):
  """value, if a positive integer (or None when optional)."""
  if value is None and optional:
    return None
  if not is_int(value) or value < 1:
    raise ValueError(f'{where}={value!r} must be a positive integer'
                     f'{" or None" if optional else ""}.')
  return value


def required(d: Mapping[str, Any], key: str, where: str):
  if d.get(key) is None:
    raise ValueError(f'{where}.{key} is required.')
  return d[key]


def sub_config(d: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
  """d[key] as a mapping ({} if unset)."""
  value = d.get(key)
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise ValueError(f'{where}.{key}={value!r} must be a sub-config (a dict).')
  return value


def one_of(value, valid, where: str, hint: str = ''):
  """value, if in `valid` (a tuple or a sorted list, printed as given)."""
  if value not in valid:
    raise ValueError(f'{where}={value!r} is unknown; valid: {valid}{hint}.')
  return value
