"""Scanned encoder: which blocks share one `nn.scan`, and params between the two layouts.

With `model.encoder.scan=True` the blocks are cut into segments. A segment repeats a unit
of p consecutive blocks r times (r >= 2) and runs the unit under flax `nn.scan`, so XLA
compiles the unit once instead of p * r blocks; a block in no such segment runs as usual.
E.g. MoE every other block of 48: one segment of 24 units (dense, MoE); MoE in the last 2
(odd) blocks of 12: blocks 0-7 as 8 units (dense,), then 2 units (dense, MoE).

Param names (scanned): `Encoder/scan_{a}_{p}x{r}/block_{j}/...` with a leading layer axis
[r, ...]; slice k is block i = a + k p + j, whose unscanned name (the reference's) is
`Encoder/encoderblock_{i}/...`. Blocks outside segments keep `Encoder/encoderblock_{i}`.
The names say everything about the layout, so `unscan` needs no config; `scan` needs the
segments (`layout`, or `segments_of` the scanned names of a model).

Conversion works on flat {'/'-joined name: value} maps whose names contain
'Encoder/encoderblock_{i}/' or 'Encoder/scan_...' anywhere (params, or optimizer state
whose paths end with the param paths), with pluggable slice/stack functions so that the
checkpoint rules can convert lazy tensors (vmoe/checkpoints/initialization.py).
"""
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

from flax import traverse_util
import numpy as np

SCANNED = re.compile(r'(^|/)Encoder/scan_(\d+)_(\d+)x(\d+)/block_(\d+)/')
UNSCANNED = re.compile(r'(^|/)Encoder/encoderblock_(\d+)/')
# Layout cost: each unit's blocks are compiled once; a loop costs about half a block.
_LOOP_COST = 0.5


class Segment(NamedTuple):
  """Blocks start .. start + period * repeats - 1, a unit of `period` blocks r times."""
  start: int
  period: int
  repeats: int

  @property
  def name(self) -> str:
    return f'scan_{self.start}_{self.period}x{self.repeats}'

  def layer(self, k: int, j: int) -> int:
    """The block of unit member j in repetition k."""
    return self.start + k * self.period + j


def layout(kinds: Sequence[Any]) -> tuple[Segment, ...]:
  """Segments (repeats >= 2) minimising compiled blocks + loops; kinds[i]: block i's type.

  E.g. kinds of 'every other MoE' (D, M, D, M) -> (Segment(0, 2, 2),). Blocks in no
  segment are left out (they run unscanned).
  """
  kinds, n = tuple(kinds), len(kinds)
  best: list[tuple[float, tuple[Segment, ...]]] = [(0.0, ())] + [(float('inf'), ())] * n
  for i in range(n):
    cost, segs = best[i]
    if cost + 1 < best[i + 1][0]:  # Block i unscanned.
      best[i + 1] = (cost + 1, segs)
    for p in range(1, (n - i) // 2 + 1):
      r = 1
      while i + (r + 1) * p <= n and kinds[i + r * p:i + (r + 1) * p] == kinds[i:i + p]:
        r += 1
        c = cost + p + _LOOP_COST
        if c < best[i + r * p][0]:
          best[i + r * p] = (c, segs + (Segment(i, p, r),))
  return best[n][1]


def segments_of(names: Iterable[str]) -> tuple[Segment, ...]:
  """The segments named in scanned param names (sorted; empty for an unscanned tree)."""
  return tuple(sorted({Segment(*map(int, m.group(2, 3, 4)))
                       for m in map(SCANNED.search, names) if m}))


def is_scanned(names: Iterable[str]) -> bool:
  return bool(segments_of(names))


def unscan(flat: Mapping[str, Any], take: Callable[[Any, int], Any] = lambda x, k: x[k]
           ) -> dict[str, Any]:
  """Scanned names -> the reference's: value [r, ...] -> r values take(value, k)."""
  out = {n: v for n, v in flat.items() if not SCANNED.search(n)}
  for n, v in flat.items():
    m = SCANNED.search(n)
    if not m:
      continue
    seg, j = Segment(*map(int, m.group(2, 3, 4))), int(m[5])
    if tuple(v.shape)[:1] != (seg.repeats,):
      raise ValueError(f'{n} has shape {tuple(v.shape)}, but its name says {seg.repeats} '
                       'layers on the leading axis.')
    for k in range(seg.repeats):
      new = f'{n[:m.start()]}{m[1]}Encoder/encoderblock_{seg.layer(k, j)}/{n[m.end():]}'
      if new in out:
        raise ValueError(f'Unscanning {n}: {new} is also in the tree; a tree holds each '
                         'block once, either scanned or not.')
      out[new] = take(v, k)
  return out


def scan(flat: Mapping[str, Any], segments: Sequence[Segment],
         stack: Optional[Callable[[str, list[tuple[str, Any]]], Any]] = None
         ) -> dict[str, Any]:
  """Reference names -> scanned, for the blocks in `segments`.

  stack(scanned name, [(unscanned name, value or None if absent)] in layer order) -> the
  stacked value; by default np.stack, and a missing layer is a ValueError.
  """
  stack = stack or _stack
  by_layer: dict[int, dict[tuple[str, str], str]] = {}
  out = {}
  for n in flat:
    m = UNSCANNED.search(n)
    if m:  # (prefix, rest) identify the param across blocks.
      by_layer.setdefault(int(m[2]), {})[(n[:m.start()] + m[1], n[m.end():])] = n
    else:
      out[n] = flat[n]
  scanned = set()
  for seg in segments:
    for j in range(seg.period):
      keys = set().union(*(by_layer.get(seg.layer(k, j), {}) for k in range(seg.repeats)))
      for pre, rest in sorted(keys):
        members = [by_layer.get(seg.layer(k, j), {}).get((pre, rest))
                   for k in range(seg.repeats)]
        new = f'{pre}Encoder/{seg.name}/block_{j}/{rest}'
        out[new] = stack(new, [(m or f'{pre}Encoder/encoderblock_{seg.layer(k, j)}/{rest}',
                                flat[m] if m else None) for k, m in enumerate(members)])
      scanned.update(seg.layer(k, j) for k in range(seg.repeats))
  for i, names in by_layer.items():
    if i not in scanned:
      out.update({n: flat[n] for n in names.values()})
  return out


def _stack(new: str, members: list[tuple[str, Any]]):
  missing = [n for n, v in members if v is None]
  if missing:
    raise ValueError(f'Cannot build {new}: {missing} not in the tree.')
  return np.stack([np.asarray(v) for _, v in members])


def unscan_tree(tree: Any) -> Any:
  """Nested params (or any tree with param paths) -> the reference's unscanned layout."""
  flat = traverse_util.flatten_dict(tree, sep='/')
  return traverse_util.unflatten_dict(unscan(flat), sep='/') if is_scanned(flat) else tree


def scan_tree(tree: Any, segments: Sequence[Segment]) -> Any:
  """Nested unscanned params -> the layout of `segments` (e.g. `vit.Encoder(spec).segments()`)."""
  flat = traverse_util.flatten_dict(tree, sep='/')
  return traverse_util.unflatten_dict(scan(flat, segments), sep='/')


def check_same_layout(saved: Iterable[str], model: Iterable[str], where: str):
  """A ValueError if the names `saved` (a checkpoint) and `model` differ in scan layout."""
  a, b = segments_of(saved), segments_of(model)
  if a != b:
    what = lambda s: f'scanned ({", ".join(x.name for x in s)})' if s else 'unscanned'
    raise ValueError(
        f'{where} holds {what(a)} encoder blocks, but the model is {what(b)}: '
        'model.encoder.scan (or the MoE layers) changed since it was written. Resume with '
        'the setting it was written with, or start a new --workdir with '
        "config.initialization={'source': 'orbax', 'path': <old workdir>}, which converts "
        'the params to either layout (the optimizer state starts afresh).')
