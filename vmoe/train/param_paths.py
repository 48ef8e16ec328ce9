"""Param paths as '/'-joined strings ('Encoder/encoderblock_1/Moe/Mlp/...').

Optimizer options select params by regex on these paths.
"""
import re
from typing import Any, Callable, Sequence

import jax


def _key_str(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def map_paths(fn: Callable[[str, Any], Any], tree):
  """Like jax.tree.map, but `fn(path, leaf)` also gets the leaf's path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn('/'.join(_key_str(k) for k in path), x), tree)


def first_match(patterns: Sequence[tuple[str, Any]], path: str, default: Any):
  """The value paired with the first regex that `re.search`es `path`."""
  for pattern, value in patterns:
    if re.search(pattern, path):
      return value
  return default


def compile_patterns(patterns: Sequence[tuple[str, Any]], *, what: str):
  """Checks that each regex compiles (one clear error naming the bad one)."""
  for pattern, _ in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'Invalid regex {pattern!r} in {what}: {e}.') from None
