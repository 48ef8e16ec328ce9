"""Start a run from another checkpoint: config.initialization, through ordered rules.

Contract (the trainer calls this once, before compiling the train step):

  params, report = initialize(target, init_params, cfg)

  target: the model's params tree, leaves jax.ShapeDtypeStruct (optionally with a sharding)
    or arrays, e.g. `jax.eval_shape(lambda: model.init(...))['params']`.
  init_params: the freshly initialised params (same tree), kept for every param the
    checkpoint does not provide.
  cfg: config.initialization (dict or ConfigDict):
    source: 'legacy' (released V-MoE prefix: PREFIX.index + PREFIX.data-*), 'npz' (ViT
      .npz of vision_transformer / big_vision, keys '/'-joined like 'Transformer/...') or
      'orbax' (a vmoe WORKDIR/checkpoints/STEP directory, or a WORKDIR for its latest).
    path: where it is.
    rules: ordered list of tuples (kind, regex, *args), see RULES; each is applied to the
      names ('/'-joined paths) the previous rules produced, regexes use `re.search`.
    allow_unused, allow_missing, allow_mismatched: False/None (default), True, or a regex
      of names: checkpoint tensors that may match no target param (dropped); target params
      the checkpoint may lack (fresh init); checkpoint tensors whose shape may differ from
      the target's (dropped, fresh init).
    freeze: optional regex of target params the trainer must not update (report.frozen;
      `frozen_mask` turns it into a tree of bools for optax).
  Returns params (same tree: loaded leaves are numpy arrays in the target's dtype, or
  jax.Arrays placed on the target leaf's sharding when it has one; the other leaves are
  init_params' own) and a Report (`format_report` for the log; it is logged at INFO).
  Raises one ValueError listing every problem (unused tensor, missing param, shape
  mismatch with the rule that would fix it), and one for a bad cfg value (unknown key,
  source or rule kind, bad regex, wrong rule arguments, a rule matching nothing), before
  any array is read (orbax reads its params whole at the start).
  Call it for a new run only: a run resuming from its own checkpoint must not.

Only the checkpoint arrays that end up in the model are read (legacy: `wanted`; npz: per
key). Sparse upcycling of a dense ViT into a V-MoE with experts in blocks 1 and 3:
  rules=[('rename', r'^(Encoder/encoderblock_[13])/Mlp/', r'\\1/Moe/Mlp/'),
         ('expand_tile', r'/Moe/Mlp/', E)], allow_missing='/Moe/Router/'.
"""
import dataclasses
import difflib
import inspect
import math
import os
import re
import zipfile
from typing import Any, Callable, Mapping, NamedTuple

from absl import logging
from flax import traverse_util
import jax
import numpy as np

from vmoe import inference
from vmoe.checkpoints import legacy

CONFIG_KEYS = ('source', 'path', 'rules', 'allow_unused', 'allow_missing',
               'allow_mismatched', 'freeze')


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
  """What the rules may look at (target shapes, fresh init) and what they record."""
  target: Mapping[str, Any]
  init: Mapping[str, Any]
  dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # source -> why.
  reinit: list[str] = dataclasses.field(default_factory=list)  # regexes.


@dataclasses.dataclass
class Report:
  source: str
  loaded: dict[str, str]  # target param -> 'checkpoint name(s) | rule | rule'.
  initialized: dict[str, str]  # target param -> why it kept its fresh init.
  dropped: dict[str, str]  # checkpoint name -> why it is not used.
  frozen: list[str]


# ----------------------------------------------------------------------------- rules
def _matching(tensors, pattern):
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
  for n in _matching(tensors, pattern):
    ctx.dropped.update(dict.fromkeys(tensors.pop(n).sources, f'drop {pattern!r}'))
  return tensors


def _reinit(tensors, ctx, pattern: str):
  ctx.reinit.append(pattern)
  for n in _matching(tensors, pattern):
    ctx.dropped.update(dict.fromkeys(tensors.pop(n).sources, f'reinit {pattern!r}'))
  return tensors


def _reshape(tensors, ctx, pattern: str, shape):
  shape = tuple(int(d) for d in shape)
  for n in _matching(tensors, pattern):
    t = tensors[n]
    new = np.empty(t.shape, bool).reshape(-1)  # Only to resolve -1 the way numpy does.
    try:
      new = new.reshape(shape).shape
    except ValueError:
      raise ValueError(f'reshape {pattern!r}: {n} of shape {t.shape} cannot become '
                       f'{shape}.') from None
    tensors[n] = t.then(new, lambda x, s=new: x.reshape(s), f'reshape{new}')
  return tensors


def _expand_tile(tensors, ctx, pattern: str, num_experts: int):
  """x: [...] -> [E, ...], E copies (sparse upcycling of a dense MLP into experts)."""
  e = int(num_experts)
  if e < 1:
    raise ValueError(f'expand_tile {pattern!r}: num_experts={num_experts} must be >= 1.')
  for n in _matching(tensors, pattern):
    t = tensors[n]
    tensors[n] = t.then((e,) + t.shape, lambda x: np.broadcast_to(x[None], (e,) + x.shape),
                        f'expand_tile({e})')
  return tensors


def _unstack(tensors, ctx, pattern: str, replacement: str, axis: int = 0):
  """[.., L, ..] under a scanned name -> L tensors; '{i}' in replacement is the index."""
  out = {n: t for n, t in tensors.items() if not re.search(pattern, n)}
  for n in _matching(tensors, pattern):
    t = tensors[n]
    if not -len(t.shape) <= axis < len(t.shape):
      raise ValueError(f'unstack {pattern!r}: {n} of shape {t.shape} has no axis {axis}.')
    shape = t.shape[:axis % len(t.shape)] + t.shape[axis % len(t.shape) + 1:]
    for i in range(t.shape[axis]):
      new = re.sub(pattern, replacement.replace('{i}', str(i)), n)
      if new in out or new == n:
        raise ValueError(f'unstack {pattern!r} -> {replacement!r}: {n} slice {i} becomes '
                         f'{new!r}, a name already taken; put "{{i}}" in the replacement.')
      out[new] = t.then(shape, lambda x, i=i: np.take(x, i, axis), f'unstack[{i}]')
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
    makes = [t.make for t in ts]
    shape = list(ts[0].shape)
    shape.insert(axis % (len(shape) + 1), len(ts))
    out[new] = Tensor(tuple(shape), ts[0].dtype, sum((t.sources for t in ts), ()),
                      lambda a, makes=makes: np.stack([m(a) for m in makes], axis),
                      ts[0].how + (f'stack({len(ts)})',))
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
  for n in _matching(tensors, pattern):
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
    head = np.asarray(ctx.init[n])[:, :c2] if c2 > c else None

    def fn(x, c=c, c2=c2, head=head, hw=(h, w), hw2=(h2, w2)):
      g = resize_grid(x[0, c:].reshape(*hw, -1).astype(np.float64), hw2)
      token = head if head is not None else x[:, :c2]
      return np.concatenate([token, g.reshape(1, -1, x.shape[-1]).astype(x.dtype)], 1)

    tensors[n] = t.then(new, fn, f'resize_posemb({h}x{w}->{h2}x{w2})')
  return tensors


RULES = {'rename': _rename, 'drop': _drop, 'reinit': _reinit, 'reshape': _reshape,
         'expand_tile': _expand_tile, 'stack': _stack, 'unstack': _unstack,
         'resize_posemb': _resize_posemb}


def _check_rules(rules) -> list[tuple]:
  out = []
  for i, rule in enumerate(rules or ()):
    if not isinstance(rule, (list, tuple)) or not rule or rule[0] not in RULES:
      raise ValueError(f'initialization.rules[{i}]={rule!r}: expected (kind, regex, ...) '
                       f'with kind in {sorted(RULES)}.')
    kind, *args = rule
    params = list(inspect.signature(RULES[kind]).parameters)[2:]
    try:
      inspect.signature(RULES[kind]).bind(None, None, *args)
      re.compile(args[0])
    except TypeError:
      raise ValueError(f'initialization.rules[{i}]={rule!r}: {kind!r} takes '
                       f'({", ".join(params)}).') from None
    except re.error as e:
      raise ValueError(f'initialization.rules[{i}]: invalid regex {args[0]!r}: {e}.') from None
    out.append(tuple(rule))
  return out


def _allowed(value, key: str) -> Callable[[str], bool]:
  if value in (None, False, True):
    return lambda _: bool(value)
  try:
    pattern = re.compile(value)
  except (re.error, TypeError) as e:
    raise ValueError(f'initialization.{key}={value!r} must be a bool or a regex: {e}.') from None
  return lambda n: bool(pattern.search(n))


# ----------------------------------------------------------------------------- sources
def _open_npz(path: str):
  """Names, shapes and dtypes from the .npy headers only; arrays are read on demand."""
  specs = {}
  try:
    with zipfile.ZipFile(path) as z:
      for info in z.infolist():
        with z.open(info) as f:
          major, _ = np.lib.format.read_magic(f)
          read = (np.lib.format.read_array_header_1_0 if major == 1
                  else np.lib.format.read_array_header_2_0)
          shape, _, dtype = read(f)
        if dtype.hasobject:
          raise ValueError(f'{path}: array {info.filename} holds Python objects, which '
                           'would need pickle; only numeric arrays can be loaded.')
        specs[info.filename.removesuffix('.npy')] = (shape, dtype)
  except (FileNotFoundError, IsADirectoryError):
    raise ValueError(f'No .npz file at initialization.path={path!r}.') from None
  except zipfile.BadZipFile:
    raise ValueError(f'{path} is not a valid .npz file (truncated or corrupt).') from None

  def read(names):
    with np.load(path, allow_pickle=False) as z:
      return {n: z[n] for n in names}

  return specs, read


def _open_legacy(prefix: str):
  flat = traverse_util.flatten_dict(legacy.read_tree_structure(prefix), sep='/')
  specs = {n: (x.shape, x.dtype) for n, x in flat.items()}

  def read(names):
    wanted = traverse_util.unflatten_dict(dict.fromkeys(names), sep='/')
    return traverse_util.flatten_dict(legacy.restore(prefix, wanted=wanted), sep='/')

  return specs, read


def _open_orbax(path: str):
  if not os.path.isdir(path):
    raise ValueError(f'initialization.path={path!r} is not a directory; source "orbax" '
                     'needs WORKDIR/checkpoints/STEP or a WORKDIR.')
  flat = {n: np.asarray(x) for n, x in
          traverse_util.flatten_dict(inference.load_params(path), sep='/').items()}
  return {n: (x.shape, x.dtype) for n, x in flat.items()}, lambda names: flat


SOURCES = {'legacy': _open_legacy, 'npz': _open_npz, 'orbax': _open_orbax}


# ----------------------------------------------------------------------------- main
def _suggest(name: str, src: tuple, tgt: tuple) -> str:
  regex = '^' + re.escape(name) + '$'
  if name.endswith('pos_embedding'):
    return f"('resize_posemb', {regex!r})"
  if tgt[1:] == src:
    return f"('expand_tile', {regex!r}, {tgt[0]}) to copy it into {tgt[0]} experts"
  if math.prod(src) == math.prod(tgt):
    return f"('reshape', {regex!r}, {tgt})"
  return f"('reinit', {regex!r}) to keep the fresh init (e.g. '^head/' for new classes)"


def _plan(cfg: Mapping[str, Any], target: Mapping[str, Any], init: Mapping[str, Any]):
  """Checks cfg, applies the rules to the checkpoint's names and shapes: (tensors, ctx)."""
  unknown = sorted(set(cfg) - set(CONFIG_KEYS))
  if unknown:
    raise ValueError(f'Unknown key(s) {unknown} in initialization; valid: {CONFIG_KEYS}.')
  if cfg.get('source') not in SOURCES:
    raise ValueError(f'initialization.source={cfg.get("source")!r} is unknown; valid: '
                     f'{sorted(SOURCES)}.')
  if not cfg.get('path'):
    raise ValueError('initialization.path is required (the checkpoint to start from).')
  rules = _check_rules(cfg.get('rules'))
  for key in ('allow_unused', 'allow_missing', 'allow_mismatched', 'freeze'):
    _allowed(cfg.get(key), key)
  specs, read = SOURCES[cfg['source']](cfg['path'])
  tensors = {n: Tensor(tuple(s), np.dtype(d), (n,), lambda a, n=n: a[n])
             for n, (s, d) in specs.items()}
  ctx = Context(target, init)
  for i, (kind, *args) in enumerate(rules):
    # A rule that matches nothing is almost always a typo (reinit may target fresh
    # params only, e.g. a head the checkpoint lacks).
    if kind != 'reinit' and not _matching(tensors, args[0]):
      raise ValueError(f'initialization.rules[{i}]={rules[i]!r} matches no checkpoint '
                       f'tensor (names there: {sorted(tensors)[:8]}...); fix or remove it.')
    tensors = RULES[kind](dict(tensors), ctx, *args)
  return tensors, ctx, read


def initialize(target: Any, init_params: Any, cfg: Mapping[str, Any]) -> tuple[Any, Report]:
  """See the module docstring."""
  cfg = dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)
  want = traverse_util.flatten_dict(target, sep='/')
  init = traverse_util.flatten_dict(init_params, sep='/')
  if {n: tuple(x.shape) for n, x in want.items()} != {
      n: tuple(np.shape(x)) for n, x in init.items()}:
    raise ValueError('initialize: init_params must have the names and shapes of target.')
  tensors, ctx, read = _plan(cfg, want, init)
  allow = {k: _allowed(cfg.get(k), k) for k in ('allow_unused', 'allow_missing',
                                                 'allow_mismatched')}
  used, fresh, problems = {}, {}, []
  for n, t in sorted(tensors.items()):
    if any(re.search(p, n) for p in ctx.reinit):  # Even if a later rule renamed it here.
      ctx.dropped.update(dict.fromkeys(t.sources, 'reinit rule'))
    elif n not in want:
      if not allow['allow_unused'](n):
        # The likely intended name is one of the params nothing else fills.
        close = difflib.get_close_matches(n, set(want) - set(tensors), 1)
        hint = f' (closest unfilled model param: {close[0]})' if close else ''
        problems.append(f'checkpoint tensor {n} {t.shape} [from {", ".join(t.sources)}] '
                        f'matches no model param{hint}: add a rename or drop rule, or set '
                        'allow_unused')
      ctx.dropped.update(dict.fromkeys(t.sources, 'unused (allow_unused)'))
    elif t.shape != tuple(want[n].shape):
      if not allow['allow_mismatched'](n):
        problems.append(f'{n}: checkpoint shape {t.shape}, model shape '
                        f'{tuple(want[n].shape)}; add the rule '
                        f'{_suggest(n, t.shape, tuple(want[n].shape))}, or set allow_mismatched')
      ctx.dropped.update(dict.fromkeys(t.sources, f'shape {t.shape} != model '
                                       f'{tuple(want[n].shape)} (allow_mismatched)'))
      fresh[n] = f'checkpoint shape {t.shape} mismatched (allow_mismatched)'
    else:
      used[n] = t
  for n in sorted(set(want) - set(used) - set(fresh)):
    if any(re.search(p, n) for p in ctx.reinit):
      fresh[n] = 'reinit rule'
    elif allow['allow_missing'](n):
      fresh[n] = 'not in the checkpoint (allow_missing)'
    else:
      problems.append(f'model param {n} {tuple(want[n].shape)} gets no checkpoint tensor: '
                      'map one to it with a rule, or let it keep its fresh init with '
                      f"allow_missing or ('reinit', {'^' + re.escape(n) + '$'!r})")
  if problems:
    raise ValueError(f'initialization from {cfg["source"]} checkpoint {cfg["path"]}: '
                     f'{len(problems)} problem(s):\n  ' + '\n  '.join(problems))
  arrays = read(sorted({s for t in used.values() for s in t.sources}))
  out = dict(init)
  for n, t in used.items():
    x = np.ascontiguousarray(t.make(arrays), dtype=want[n].dtype)
    sharding = getattr(want[n], 'sharding', None)
    out[n] = x if sharding is None else jax.device_put(x, sharding)
  frozen = _allowed(cfg.get('freeze'), 'freeze')
  report = Report(
      source=f'{cfg["source"]}:{cfg["path"]}',
      loaded={n: ', '.join(t.sources) + ''.join(f' | {h}' for h in t.how)
              for n, t in used.items()},
      initialized=dict(sorted(fresh.items())), dropped=dict(sorted(ctx.dropped.items())),
      frozen=[n for n in sorted(want) if frozen(n)])
  logging.info('%s', format_report(report))
  return traverse_util.unflatten_dict(out, sep='/'), report


def format_report(report: Report) -> str:
  lines = [f'Initialization from {report.source}: {len(report.loaded)} params loaded, '
           f'{len(report.initialized)} freshly initialised, {len(report.dropped)} checkpoint '
           f'tensors not used, {len(report.frozen)} frozen.']
  lines += [f'  loaded  {n}' + ('' if how == n else f' <- {how}')
            for n, how in report.loaded.items()]
  lines += [f'  init    {n}: {why}' for n, why in report.initialized.items()]
  lines += [f'  unused  {n}: {why}' for n, why in report.dropped.items()]
  lines += [f'  frozen  {n}' for n in report.frozen]
  return '\n'.join(lines)


def frozen_mask(params: Any, regex: str | None) -> Any:
  """Tree of bools like params: True where the '/'-joined path matches `regex`."""
  match = _allowed(regex, 'freeze')
  return jax.tree_util.tree_map_with_path(
      lambda path, _: match('/'.join(str(getattr(k, 'key', k)) for k in path)), params)
