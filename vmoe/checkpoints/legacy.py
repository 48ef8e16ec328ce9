"""Reader and writer for the released V-MoE checkpoint format (version '20220622').

A checkpoint is `PREFIX.index` plus `PREFIX.data-NNNNN-of-NNNNN` files, each ONE msgpack
object (spec: docs/reference_checkpoints.md). The index mirrors the params tree; each leaf
(ext 8) holds the global shape/dtype, the sorted disjoint n-d slices that tile the array and
the data file ("shard") of each slice. A data file maps LEAF_ID (position of the leaf in a
depth-first walk with `sorted()` keys) to `[[SUBCHUNKS, NDSLICE], ...]`, where SUBCHUNKS are
1-D arrays whose concatenation, reshaped to the slice's extent, is `array[NDSLICE]`.

Inside this module an n-d slice is a "box": `((start_0, stop_0), ..., (start_{n-1},
stop_{n-1}))`, `()` for scalars. Paths are tuples of keys, shown as 'a/b/c' in errors.
"""
from collections.abc import Mapping
import math
import os
from typing import Any, NamedTuple
import uuid

import jax
import ml_dtypes  # noqa: F401  # pylint: disable=unused-import  # registers 'bfloat16' & co. with numpy.
import msgpack
import numpy as np

VERSION = '20220622'
CHUNKS_MAGIC = '__msgpack_array_chunk_a87ca2__'
# The msgpack ext codes these files use (flax's 1 and 3, vmoe's 6 and 8). The other codes
# of the spec (2 complex, 4 shaped array, 5 slice) only ever occur nested inside payloads.
_NDARRAY, _NPSCALAR, _SLICE_ND, _INDEX_INFO = 1, 3, 6, 8
Box = tuple[tuple[int, int], ...]


class LegacyCheckpointError(ValueError):
  """A legacy checkpoint is missing, truncated, corrupt or incomplete."""


class IndexInfo(NamedTuple):
  """Index leaf (ext 8): array of `shape`/`dtype`, `boxes[i]` is stored in file `shards[i]`."""
  shape: tuple[int, ...]
  dtype: np.dtype
  boxes: list[Box]
  shards: list[int]


# ------------------------------------------------------------------------------- decoding
def _raw(data: bytes) -> Any:
  # Nested payloads are decoded with raw=True by the reference, so strings may be bytes.
  return msgpack.unpackb(data, raw=True)


def _dtype(name) -> np.dtype:
  name = name.decode() if isinstance(name, bytes) else name
  try:
    return np.dtype(name)
  except TypeError:
    raise LegacyCheckpointError(f'unknown dtype {name!r}') from None


def _decode_ndarray(data: bytes) -> np.ndarray:
  shape, name, buf = _raw(data)
  return np.frombuffer(buf, _dtype(name)).reshape(shape)


def _decode_slice(data: bytes) -> tuple[int, int]:
  start, stop, step = _raw(data)
  if not (isinstance(start, int) and isinstance(stop, int) and step in (None, 1)):
    raise LegacyCheckpointError(f'bad slice payload {[start, stop, step]}')
  return start, stop


def _decode_box(data: bytes) -> Box:
  return tuple(_decode_slice(s) for s in _raw(data))


def _decode_index_info(data: bytes) -> IndexInfo:
  aval, boxes, shards = _raw(data)
  shape, name, _, _ = _raw(aval)  # Shaped array (ext 4): [shape, dtype, weak_type, {}].
  return IndexInfo(tuple(shape), _dtype(name), [_decode_box(b) for b in boxes], list(shards))


_DECODERS = {_NDARRAY: _decode_ndarray, _NPSCALAR: lambda d: _decode_ndarray(d)[()],
             _SLICE_ND: _decode_box, _INDEX_INFO: _decode_index_info}


def _ext_hook(code: int, data: bytes) -> Any:
  if code not in _DECODERS:
    raise LegacyCheckpointError(f'unknown msgpack ext code {code}')
  return _DECODERS[code](data)


def _load(path: str, missing: str) -> Any:
  """Reads and decodes one msgpack file; `missing` is the error message if it is absent."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise LegacyCheckpointError(missing) from None
  try:
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook)
  except LegacyCheckpointError as e:  # From _ext_hook, which does not know the file.
    raise LegacyCheckpointError(f'{path} is corrupt: {e}') from None
  except (ValueError, TypeError, msgpack.UnpackException) as e:
    raise LegacyCheckpointError(
        f'{path} is truncated or corrupt (msgpack unpacking failed: {e!r})') from None


# ----------------------------------------------------------------------------- trees
def _name(path: tuple[str, ...]) -> str:
  return '/'.join(path)


def _flatten(tree: Mapping, path=()):
  """Yields (path, leaf) depth-first with keys in sorted() order: LEAF_ID = position."""
  for k in sorted(tree):
    if isinstance(tree[k], Mapping):
      yield from _flatten(tree[k], path + (k,))
    else:
      yield path + (k,), tree[k]


def _map_tree(fn, tree: Mapping, path=()) -> dict:
  """Like jax.tree.map on nested dicts, but keeps empty dicts and passes the path."""
  return {k: _map_tree(fn, v, path + (k,)) if isinstance(v, Mapping) else fn(path + (k,), v)
          for k, v in sorted(tree.items())}


def _state_dict(tree: Any, path=()) -> Any:
  """Nested dict with str keys; lists/tuples become maps '0', '1', ... (as flax stores them)."""
  if isinstance(tree, (list, tuple)):
    tree = {str(i): x for i, x in enumerate(tree)}
  if not isinstance(tree, Mapping):
    return tree
  for k in tree:
    if not isinstance(k, str):
      raise ValueError(f'Key {k!r} under {_name(path) or "the root"} is not a str; the format '
                       'needs str keys.')
  return {k: _state_dict(v, path + (k,)) for k, v in tree.items()}


def _as_box(region, shape: tuple[int, ...], what: str) -> Box:
  """Tuple of python slices (step 1, missing trailing axes = whole axis) -> Box."""
  region = (region,) if isinstance(region, slice) else region
  if not (isinstance(region, (tuple, list)) and len(region) <= len(shape)
          and all(isinstance(s, slice) for s in region)):
    raise ValueError(f'{what}: expected a tuple of at most {len(shape)} slices, got {region!r}.')
  region = tuple(region) + (slice(None),) * (len(shape) - len(region))
  box = []
  for s, n in zip(region, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f'{what}: slice {s} has step {step}; only step 1 is supported.')
    box.append((start, max(start, stop)))
  return tuple(box)


def _intersect(box: Box, region: Box):
  """Returns (src, dst) python slices: chunk[src] goes to out[dst]; None if disjoint."""
  lo = [max(b[0], r[0]) for b, r in zip(box, region)]
  hi = [min(b[1], r[1]) for b, r in zip(box, region)]
  if any(h <= lo_ for lo_, h in zip(lo, hi)):
    return None
  src = tuple(slice(a - b[0], h - b[0]) for a, h, b in zip(lo, hi, box))
  dst = tuple(slice(a - r[0], h - r[0]) for a, h, r in zip(lo, hi, region))
  return src, dst


def _extent(box: Box) -> tuple[int, ...]:
  return tuple(stop - start for start, stop in box)


# ----------------------------------------------------------------------------- reader
def _read_index(prefix: str) -> tuple[dict, int]:
  """Returns (tree of IndexInfo, shard_count), validated against itself."""
  path = prefix + '.index'
  index = _load(path, f'missing index file {path}')
  if not (isinstance(index, dict) and isinstance(index.get('index'), dict)
          and isinstance(index.get('shard_count'), int)):
    raise LegacyCheckpointError(f'{path} is corrupt: not a map with "shard_count" and "index".')
  if index.get('version', VERSION) != VERSION:  # Older files have no version, same layout.
    raise LegacyCheckpointError(f'{path}: unsupported version {index["version"]!r}.')
  n = index['shard_count']
  for p, info in _flatten(index['index']):
    if not isinstance(info, IndexInfo):
      raise LegacyCheckpointError(f'{path} is corrupt: leaf {_name(p)} is not an index info.')
    ok = len(info.boxes) == len(info.shards) and all(0 <= s < n for s in info.shards) and all(
        len(b) == len(info.shape) and all(0 <= lo <= hi <= d for (lo, hi), d in zip(b, info.shape))
        for b in info.boxes)
    if not ok:
      raise LegacyCheckpointError(
          f'{path} is corrupt: param {_name(p)} {info.shape} has bad slices {info.boxes} or '
          f'shards {info.shards} (shard_count={n}).')
  return index['index'], n


def read_tree_structure(prefix: str) -> dict:
  """Nested dict of `jax.ShapeDtypeStruct(global shape, dtype)`, read from PREFIX.index only."""
  tree, _ = _read_index(prefix)
  return _map_tree(lambda _, info: jax.ShapeDtypeStruct(info.shape, info.dtype), tree)


def _regions(index: Any, wanted: Any, path=()) -> Any:
  """`wanted` with every leaf and every None subtree expanded to the Box of each array."""
  if isinstance(index, IndexInfo):
    if isinstance(wanted, Mapping):
      raise ValueError(f'wanted: {_name(path)} is an array, not a subtree.')
    return _as_box(() if wanted is None else wanted, index.shape, f'wanted[{_name(path)!r}]')
  wanted = dict.fromkeys(index) if wanted is None else wanted
  if not isinstance(wanted, Mapping):
    raise ValueError(f'wanted: {_name(path) or "the root"} is a subtree; give a dict or None.')
  for k in wanted:
    if k not in index:
      raise ValueError(f'wanted: {_name(path + (k,))} is not in the checkpoint '
                       f'(keys there: {sorted(index)}).')
  return {k: _regions(index[k], w, path + (k,)) for k, w in wanted.items()}


def restore(prefix: str, *, wanted: Mapping | None = None) -> dict:
  """Reads a legacy checkpoint (or regions of its arrays) into numpy.

  Args:
    prefix: path without '.index' / '.data-NNNNN-of-NNNNN'.
    wanted: None for everything, or a nested dict (the tree or a subset of it) whose
      leaves are None (whole array / subtree) or a tuple of slices, e.g. `(slice(0, 2),)`
      to read experts 0..1 of a `[E, D, H]` kernel. Only the data files holding a chunk
      that intersects a wanted region are opened.
  Returns:
    Nested dict of np.ndarray (the wanted region's shape, e.g. `[2, D, H]` above).
  Raises:
    LegacyCheckpointError: missing/truncated/corrupt file, or an element of a wanted region
      that is not written exactly once.
  """
  tree, shard_count = _read_index(prefix)
  infos = dict(_flatten(tree))
  leaf_id = {p: i for i, p in enumerate(infos)}
  nested = _regions(tree, wanted)
  regions = dict(_flatten(nested))
  out = {p: np.empty(_extent(r), infos[p].dtype) for p, r in regions.items()}
  # A mask per array, so that a gap or an overlap can never go unnoticed.
  written = {p: np.zeros(_extent(r), bool) for p, r in regions.items()}
  plan = {}  # shard -> path -> boxes that must be read from that file.
  for p, region in regions.items():
    for box, shard in zip(infos[p].boxes, infos[p].shards):
      if _intersect(box, region) is not None:
        plan.setdefault(shard, {}).setdefault(p, set()).add(box)
  for shard, todo in sorted(plan.items()):
    path = f'{prefix}.data-{shard:05d}-of-{shard_count:05d}'
    names = sorted(map(_name, todo))
    listed = ', '.join(names[:3]) + (f' and {len(names) - 3} more' if len(names) > 3 else '')
    data = _load(path, f'missing data file {path} (listed by the index for params {listed})')
    if not isinstance(data, dict) or data.get(CHUNKS_MAGIC) is not True:
      raise LegacyCheckpointError(f'{path} is corrupt: not an array-chunk file.')
    for p, boxes in todo.items():
      info, found = infos[p], set()
      home = dict(zip(info.boxes, info.shards))
      for entry in data.get(str(leaf_id[p]), []):
        what = f'{path}: param {_name(p)}'
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                and all(isinstance(c, np.ndarray) for c in entry[0])
                and isinstance(entry[1], tuple)):
          raise LegacyCheckpointError(f'{what}: corrupt chunk entry.')
        subchunks, box = entry
        if home.get(box) != shard:
          raise LegacyCheckpointError(f'{what}: chunk {box} is not listed by the index here.')
        if box not in boxes:
          continue  # Listed, but outside every wanted region.
        flat = np.concatenate(subchunks) if subchunks else np.empty(0, info.dtype)
        if flat.dtype != info.dtype or flat.size != math.prod(_extent(box)):
          raise LegacyCheckpointError(
              f'{what}: chunk of {flat.size} {flat.dtype} elements does not match its slice '
              f'{box} ({math.prod(_extent(box))} {info.dtype} elements).')
        src, dst = _intersect(box, regions[p])
        if written[p][dst].any():
          raise LegacyCheckpointError(f'{what}: elements of {box} are written more than once.')
        out[p][dst] = flat.reshape(_extent(box))[src]
        written[p][dst] = True
        found.add(box)
      if boxes - found:
        raise LegacyCheckpointError(
            f'{path}: param {_name(p)}: the index lists slices {sorted(boxes - found)} in this '
            'file, but the file holds no such chunk.')
  for p, mask in written.items():
    if not mask.all():
      first = tuple(int(i[0]) for i in np.nonzero(~mask))
      raise LegacyCheckpointError(
          f'{prefix}: param {_name(p)}: {int((~mask).sum())} elements of region '
          f'{regions[p]} are never written (first at offset {first}); the index slices '
          f'{infos[p].boxes} do not tile the array.')
  return _map_tree(lambda p, _: out[p], nested)


# ----------------------------------------------------------------------------- writer
def _pack(x: Any) -> bytes:
  return msgpack.packb(x, use_bin_type=True)


def _box_bytes(box: Box) -> bytes:
  # Each axis is a nested packed [start, stop, None], not an ext 5 (as the reference does).
  return _pack([_pack([start, stop, None]) for start, stop in box])


def _index_info(x: np.ndarray, boxes: list[Box], shards: list[int]) -> msgpack.ExtType:
  aval = _pack([list(x.shape), x.dtype.name, False, {}])
  return msgpack.ExtType(_INDEX_INFO, _pack([aval, [_box_bytes(b) for b in boxes], shards]))


def _write_data_file(f, chunks: dict, max_chunk_bytes: int):
  """Streams {MAGIC: True, LEAF_ID: [[SUBCHUNKS, NDSLICE], ...]}, one chunk in memory at a time.

  chunks: {leaf_id: [(array, box), ...]}, leaf ids ascending (the reference's order).
  """
  pk = msgpack.Packer(use_bin_type=True)
  f.write(pk.pack_map_header(len(chunks) + 1) + pk.pack(CHUNKS_MAGIC) + pk.pack(True))
  for i, pieces in chunks.items():
    f.write(pk.pack(str(i)) + pk.pack_array_header(len(pieces)))
    for x, box in pieces:
      flat = np.ascontiguousarray(x[tuple(slice(*b) for b in box)]).reshape(-1)
      # Subchunks keep each msgpack bin under max_chunk_bytes (bins must stay < 2 GiB).
      n = max(1, max_chunk_bytes // flat.itemsize)
      starts = range(0, flat.size, n) or [0]
      f.write(pk.pack_array_header(2) + pk.pack_array_header(len(starts)))
      for s in starts:
        sub = flat[s:s + n]
        payload = _pack([list(sub.shape), sub.dtype.name, sub.tobytes()])
        f.write(pk.pack(msgpack.ExtType(_NDARRAY, payload)))
      f.write(pk.pack(msgpack.ExtType(_SLICE_ND, _box_bytes(box))))


def _check_tiling(boxes: list[Box], shape: tuple[int, ...], what: str):
  # Disjoint boxes inside the array whose volumes add up to its size tile it exactly.
  for i, a in enumerate(boxes):
    for b in boxes[i + 1:]:
      if all(max(x[0], y[0]) < min(x[1], y[1]) for x, y in zip(a, b)) and a and b:
        raise ValueError(f'{what}: slices {a} and {b} overlap.')
  if sum(math.prod(_extent(b)) for b in boxes) != math.prod(shape):
    raise ValueError(f'{what}: slices {boxes} do not cover the whole array of shape {shape}.')


def save(prefix: str, tree: Any, *, num_shards: int = 1, slices: Mapping | None = None,
         max_chunk_bytes: int = 256 * 2**20) -> None:
  """Writes `tree` as PREFIX.index + PREFIX.data-NNNNN-of-NNNNN (format version 20220622).

  Args:
    prefix: output path prefix; its directory is created if needed.
    tree: nested dict (lists allowed, stored as maps '0', '1', ...) of array-likes.
    num_shards: number of data files; each slice goes to the file holding the fewest bytes
      so far (lowest number on ties), as the reference does; empty files are not written,
      so fewer files appear when there are fewer slices than num_shards.
    slices: optional nested dict (subset of `tree`) mapping a leaf to a list of n-d slices
      (tuples of python slices) that tile it, e.g. `[(slice(e, e + 1),) for e in range(E)]`
      for a `[E, D, H]` expert kernel. Default: one slice per leaf.
    max_chunk_bytes: max bytes of one stored subchunk (1-D piece of a slice).
  Files are written under temporary names in the same directory, then renamed, index last.
  """
  if num_shards < 1 or max_chunk_bytes < 1:
    raise ValueError(f'num_shards={num_shards} and max_chunk_bytes={max_chunk_bytes} must be >= 1.')
  tree = _state_dict(tree)
  leaves = [(p, np.asarray(x)) for p, x in _flatten(tree)]
  if not leaves:
    raise ValueError('save: tree has no array leaves; nothing to write.')
  layout = dict(_flatten(slices or {}))
  if unknown := set(layout) - {p for p, _ in leaves}:
    raise ValueError(f'slices: {sorted(map(_name, unknown))} are not leaves of tree.')
  counts, placed, chunks = [0] * num_shards, {}, {}  # chunks: shard -> leaf id -> [(x, box)].
  for i, (p, x) in enumerate(leaves):
    # The reader rebuilds dtypes from their names and reads native (little-endian) bytes.
    if x.dtype.kind in 'OUS' or x.dtype.fields or not x.dtype.isnative:
      raise ValueError(f'{_name(p)}: dtype {x.dtype} cannot be stored; use a numeric dtype '
                       'in native byte order.')
    what = f'slices[{_name(p)!r}]'
    boxes = sorted({_as_box(s, x.shape, what) for s in layout.get(p, [()])})
    _check_tiling(boxes, x.shape, what)
    shards = []
    for box in boxes:
      s = counts.index(min(counts))
      counts[s] += math.prod(_extent(box)) * x.itemsize
      shards.append(s)
      chunks.setdefault(s, {}).setdefault(i, []).append((x, box))
    placed[p] = _index_info(x, boxes, shards)
  shard_count = len(chunks)  # Least-filled-first only ever leaves the last shards empty.
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  tmp = {}  # final path -> temporary path; data files first, index last.
  try:
    for s in range(shard_count):
      path = f'{prefix}.data-{s:05d}-of-{shard_count:05d}'
      tmp[path] = _write_tmp(path, lambda f: _write_data_file(f, chunks[s], max_chunk_bytes))
    index = {'shard_count': shard_count, 'index': _map_tree(lambda p, _: placed[p], tree),
             'version': VERSION}
    tmp[prefix + '.index'] = _write_tmp(prefix + '.index', lambda f: f.write(_pack(index)))
    # An old index must never describe the new data files: drop it before they land.
    if os.path.exists(prefix + '.index'):
      os.remove(prefix + '.index')
    for path, t in tmp.items():
      os.replace(t, path)
  finally:
    for t in tmp.values():
      if os.path.exists(t):
        os.remove(t)


def _write_tmp(path: str, write) -> str:
  """Calls write(file) on a fresh temporary file next to `path`; returns its name."""
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  try:
    with open(tmp, 'xb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())  # The rename must only ever expose complete files.
  except BaseException:
    os.remove(tmp)
    raise
  return tmp
