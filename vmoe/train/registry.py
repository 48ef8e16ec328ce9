"""Components chosen by name, with one clear error for a bad name or keyword."""
import inspect
from typing import Any, Callable, Mapping


def signature_keys(fn: Callable[..., Any]) -> tuple[set[str], set[str]]:
  """Returns (all keyword names, required keyword names) of `fn`."""
  params = inspect.signature(fn).parameters.values()
  names = {p.name for p in params if p.kind is not p.VAR_KEYWORD}
  required = {p.name for p in params
              if p.default is p.empty and p.kind is not p.VAR_KEYWORD}
  return names, required


def check_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], *,
                 what: str, extra_valid: set[str] = frozenset(),
                 provided: set[str] = frozenset()):
  """Raises ValueError if `kwargs` has a key `fn` does not take or lacks one.

  `extra_valid`: keys the caller consumes itself; `provided`: keys the caller
  passes itself (so the user must not, and need not, give them).
  """
  names, required = signature_keys(fn)
  valid = (names - provided) | extra_valid
  unknown = set(kwargs) - valid
  if unknown:
    raise ValueError(f'Unknown keys {sorted(unknown)} in {what}; valid keys: '
                     f'{sorted(valid)}.')
  missing = required - provided - set(kwargs)
  if missing:
    raise ValueError(f'Missing keys {sorted(missing)} in {what}; valid keys: '
                     f'{sorted(valid)}.')


def lookup(registry: Mapping[str, Callable[..., Any]], name: str, *,
           key: str) -> Callable[..., Any]:
  """registry[name]; `key` is the config key that gave the name."""
  if name not in registry:
    raise ValueError(f'{key}={name!r} is unknown; valid: {sorted(registry)}.')
  return registry[name]
