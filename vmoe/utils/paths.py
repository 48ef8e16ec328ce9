"""Param paths as '/'-joined strings ('Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel'), and
the first of ordered (regex, value) rules that matches one (re.search)."""
import functools
import re
from typing import Any, Callable, Sequence

import jax

# A jax key path (DictKey, GetAttrKey, SequenceKey, ...) -> 'a/b/0/c'.
path_str = functools.partial(jax.tree_util.keystr, simple=True, separator='/')


def map_with_paths(fn: Callable[[str, Any], Any], tree):
  """Like jax.tree.map, but `fn(path, leaf)` also gets the leaf's '/'-joined path."""
  return jax.tree_util.tree_map_with_path(lambda keys, x: fn(path_str(keys), x), tree)


def first_match(rules: Sequence[tuple[str, Any]], path: str, default: Any = None):
  """The value paired with the first regex that `re.search`es `path`, else default."""
  for pattern, value in rules:
    if re.search(pattern, path):
      return value
  return default


def check_patterns(patterns: Sequence[str], *, what: str):
  """Each regex compiles (one clear error naming the bad one)."""
  for pattern in patterns:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f'Invalid regex {pattern!r} in {what}: {e}.') from None
