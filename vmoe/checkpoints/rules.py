"""The rules of config.initialization: how checkpoint tensors become model params.

A rule is (kind, regex, *args); RULES[kind](tensors, ctx, regex, *args) returns the new
{name: Tensor} map. Tensors carry only shapes and a `make` function until the end, so a
whole rule set is checked against the model without reading any array.

  ('rename', regex, replacement)      re.sub on the names (\\1 groups allowed)
  ('drop', regex)                     the matching tensors are not used
  ('reinit', regex)                   the matching params keep their fresh init
  ('reshape', regex[, shape])         e.g. (-1,) or (E, D, H); no shape: the model's own
                                      (the reference's: a router kernel into E3's)
  ('expand_tile', regex, E)           x -> [E, ...x.shape], E copies (sparse upcycling)
  ('stack', regex_with_(?P<i>...), replacement[, axis])   per-layer tensors -> one [L, ...]
  ('unstack', regex, replacement_with_{i}[, axis])        [L, ...] -> L tensors
  ('resize_posemb', regex[, (h, w), (h', w')])  [1, c+h*w, D] -> the model's [1, c'+h'*w', D]
"""
import dataclasses
import inspect
import math
import re
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np


class Tensor(NamedTuple):
  """A checkpoint tensor as the rules see it, read only at the end.

  make(arrays) builds it from {checkpoint name: np.ndarray} of its `sources`; `how`
  lists the rules that changed it.
  """
  shape: tuple[int, ...]
  dtype: np.dtype
  sources: tuple[str, ...]
  make: Callable[[Mapping[str, np.ndarray]], np.ndarray]
  how: tuple[str, ...] = ()

  def then(self, shape, fn, step: str) -> 'Tensor':
    return self._replace(shape=tuple(shape), make=lambda a, m=self.make: fn(m(a)),
                         how=self.how + (step,))


@dataclasses.dataclass
class Context:
  """What the rules may look at (target shapes; the fresh init, known only once the
  arrays are made) and what they record."""
  target: Mapping[str, Any]
  init: dict[str, Any] = dataclasses.field(default_factory=dict)
  dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # source -> why.
  reinit: list[str] = dataclasses.field(default_factory=list)  # regexes.


def matching(tensors, pattern):
  return [n for n in tensors if re.search(pattern, n)]


def _rename(tensors, ctx, pattern: str, replacement: str):
  out = {}
  for n, t in tensors.items():
    new = re.sub(pattern, replacement, n) if re.search(pattern, n) else n
    if new in out:
      raise ValueError(f'rename {pattern!r} -> {replacement!r}: two checkpoint tensors '
                       f'({", ".join(out[new].sources + t.sources)}) become {new!r}.')
    renamed = new != n and t.how[-1:] != ('rename',)  # Successive renames count once.
    out[new] = t._replace(how=t.how + ('rename',)) if renamed else t
  return out


def _drop(tensors, ctx, pattern: str):
  for n in matching(tensors, pattern):
    ctx.dropped.update(dict.fromkeys(tensors.pop(n).sources, f'drop {pattern!r}'))
  return tensors


def _reinit(tensors, ctx, pattern: str):
  ctx.reinit.append(pattern)
  for n in matching(tensors, pattern):
    ctx.dropped.update(dict.fromkeys(tensors.pop(n).sources, f'reinit {pattern!r}'))
  return tensors


def _reshape(tensors, ctx, pattern: str, shape=None):
  """To `shape`, or without one to the model's shape of the same param (e.g. a router
  kernel [D, E] into an E3 model's [D, M, E/M], as the reference's 'reshape' rule)."""
  for n in matching(tensors, pattern):
    t = tensors[n]
    if shape is None and n not in ctx.target:
      raise ValueError(f'reshape {pattern!r}: {n} is not a param of the model, so it has '
                       'no shape to take; rename it first or give the shape.')
    want = tuple(int(d) for d in (shape if shape is not None else ctx.target[n].shape))
    new = np.empty(t.shape, bool).reshape(-1)  # Only to resolve -1 the way numpy does.
    try:
      new = new.reshape(want).shape
    except ValueError:
      raise ValueError(f'reshape {pattern!r}: {n} of shape {t.shape} cannot become '
                       f'{want}.') from None
    tensors[n] = t.then(new, lambda x, s=new: x.reshape(s), f'reshape{new}')
  return tensors


def _expand_tile(tensors, ctx, pattern: str, num_experts: int):
  """x: [...] -> [E, ...], E copies (sparse upcycling of a dense MLP into experts)."""
  e = int(num_experts)
  if e < 1:
    raise ValueError(f'expand_tile {pattern!r}: num_experts={num_experts} must be >= 1.')
  for n in matching(tensors, pattern):
    t = tensors[n]
    tensors[n] = t.then((e,) + t.shape, lambda x: np.broadcast_to(x[None], (e,) + x.shape),
                        f'expand_tile({e})')
  return tensors


def take(t: Tensor, i: int, axis: int = 0) -> Tensor:
  """Slice i of t on `axis` (which is removed)."""
  shape = t.shape[:axis % len(t.shape)] + t.shape[axis % len(t.shape) + 1:]
  return t.then(shape, lambda x: np.take(x, i, axis), f'unstack[{i}]')


def stack(ts: list[Tensor], axis: int = 0) -> Tensor:
  """Tensors of one shape and dtype -> one, stacked on a new `axis`."""
  makes = [t.make for t in ts]
  shape = list(ts[0].shape)
  shape.insert(axis % (len(shape) + 1), len(ts))
  return Tensor(tuple(shape), ts[0].dtype, sum((t.sources for t in ts), ()),
                lambda a: np.stack([m(a) for m in makes], axis),
                ts[0].how + (f'stack({len(ts)})',))


def _unstack(tensors, ctx, pattern: str, replacement: str, axis: int = 0):
  """[.., L, ..] under a scanned name -> L tensors; '{i}' in replacement is the index."""
  out = {n: t for n, t in tensors.items() if not re.search(pattern, n)}
  for n in matching(tensors, pattern):
    t = tensors[n]
    if not -len(t.shape) <= axis < len(t.shape):
      raise ValueError(f'unstack {pattern!r}: {n} of shape {t.shape} has no axis {axis}.')
    for i in range(t.shape[axis]):
      new = re.sub(pattern, replacement.replace('{i}', str(i)), n)
      if new in out or new == n:
        raise ValueError(f'unstack {pattern!r} -> {replacement!r}: {n} slice {i} becomes '
                         f'{new!r}, a name already taken; put "{{i}}" in the replacement.')
      out[new] = take(t, i, axis)
  return out


def _stack(tensors, ctx, pattern: str, replacement: str, axis: int = 0):
  """Tensors whose names differ by the group (?P<i>\\d+) -> one, stacked on a new axis."""
  if 'i' not in re.compile(pattern).groupindex:
    raise ValueError(f'stack {pattern!r}: the regex needs a group (?P<i>\\d+) that '
                     'captures the layer index.')
  groups, out = {}, {}
  for n, t in tensors.items():
    m = re.search(pattern, n)
    if m:
      groups.setdefault(re.sub(pattern, replacement, n), {})[int(m['i'])] = (n, t)
    else:
      out[n] = t
  for new, parts in groups.items():
    names = [parts[i][0] for i in sorted(parts)]
    if sorted(parts) != list(range(len(parts))):
      raise ValueError(f'stack {pattern!r}: {new} would be stacked from indices '
                       f'{sorted(parts)} ({names}); they must be 0..L-1 with none missing.')
    ts = [parts[i][1] for i in range(len(parts))]
    if len({(t.shape, t.dtype) for t in ts}) > 1 or new in out:
      raise ValueError(f'stack {pattern!r}: cannot stack {names} into {new!r} (different '
                       'shapes/dtypes, or the name is taken).')
    out[new] = stack(ts, axis)
  return out


def resize_grid(grid: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """[h, w, D] -> [h', w', D], bilinear with corners aligned (scipy zoom order=1)."""
  for axis, n_new in enumerate(hw):
    n = grid.shape[axis]
    pos = np.linspace(0, n - 1, n_new) if n_new > 1 else np.full(1, (n - 1) / 2)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (pos - lo).reshape([-1 if a == axis else 1 for a in range(grid.ndim)])
    grid = np.take(grid, lo, axis) * (1 - w) + np.take(grid, hi, axis) * w
  return grid


def _grid(tokens: int, given, what: str) -> tuple[tuple[int, int], int]:
  """(grid (h, w), prefix tokens 0 or 1) of a position embedding with `tokens` rows."""
  if given is None:
    side = math.isqrt(tokens)
    given = (side, side) if side * side == tokens else (math.isqrt(tokens - 1),) * 2
  h, w = map(int, given)
  if tokens - h * w not in (0, 1):
    raise ValueError(f'resize_posemb: {what} has {tokens} tokens, which is not an {h}x{w} '
                     'grid (+ 1 class token); give the grids: (\'resize_posemb\', regex, '
                     '(h, w), (h_new, w_new)).')
  return (h, w), tokens - h * w


def _resize_posemb(tensors, ctx, pattern: str, grid=None, new_grid=None):
  """[1, c + h*w, D] -> the target's [1, c' + h'*w', D]; the class token row is kept
  (c=c'=1), dropped (c'=0) or freshly initialised (c=0, c'=1)."""
  for n in matching(tensors, pattern):
    t = tensors[n]
    if n not in ctx.target:
      raise ValueError(f'resize_posemb {pattern!r}: {n} is not a param of the model, so '
                       'its new shape is unknown; put this rule after the renames.')
    new = tuple(ctx.target[n].shape)
    if len(t.shape) != 3 or len(new) != 3 or t.shape[::2] != new[::2]:
      raise ValueError(f'resize_posemb {pattern!r}: {n} {t.shape} -> {new} is not '
                       '[1, tokens, D] -> [1, tokens\', D].')
    (h, w), c = _grid(t.shape[1], grid, f'checkpoint {n} {t.shape}')
    (h2, w2), c2 = _grid(new[1], new_grid, f'model {n} {new}')

    def fn(x, n=n, c=c, c2=c2, hw=(h, w), hw2=(h2, w2)):
      g = resize_grid(x[0, c:].reshape(*hw, -1).astype(np.float64), hw2)
      token = np.asarray(ctx.init[n])[:, :c2] if c2 > c else x[:, :c2]
      return np.concatenate([token.astype(x.dtype),
                             g.reshape(1, -1, x.shape[-1]).astype(x.dtype)], 1)

    tensors[n] = t.then(new, fn, f'resize_posemb({h}x{w}->{h2}x{w2})')
  return tensors


RULES = {'rename': _rename, 'drop': _drop, 'reinit': _reinit, 'reshape': _reshape,
         'expand_tile': _expand_tile, 'stack': _stack, 'unstack': _unstack,
         'resize_posemb': _resize_posemb}


def check_rules(rules) -> list[tuple]:
  out = []
  for i, rule in enumerate(rules or ()):
    if not isinstance(rule, (list, tuple)) or not rule or rule[0] not in RULES:
      raise ValueError(f'config.initialization.rules[{i}]={rule!r}: expected (kind, regex, '
                       f'...) with kind in {sorted(RULES)}.')
    kind, *args = rule
    params = list(inspect.signature(RULES[kind]).parameters)[2:]
    try:
      inspect.signature(RULES[kind]).bind(None, None, *args)
      re.compile(args[0])
    except TypeError:
      raise ValueError(f'config.initialization.rules[{i}]={rule!r}: {kind!r} takes '
                       f'({", ".join(params)}).') from None
    except re.error as e:
      raise ValueError(f'config.initialization.rules[{i}]: invalid regex {args[0]!r}: '
                       f'{e}.') from None
    out.append(tuple(rule))
  return out
