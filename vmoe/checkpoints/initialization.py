"""Start a run from another checkpoint: config.initialization, through ordered rules.

Contract (the trainer calls `plan` among its checks, before anything compiles, then
`initialize` once the fresh state exists; a run resuming from its own checkpoint calls
neither):

  plan(target, cfg) -> Plan         # names and shapes only: no array is read
  initialize(target, init_params, cfg) -> (params, report)

  target: the model's params tree, leaves jax.ShapeDtypeStruct (optionally with a sharding)
    or arrays, e.g. `jax.eval_shape(lambda: model.init(...))['params']`.
  init_params: the freshly initialised params (same tree), kept for every param the
    checkpoint does not provide.
  cfg: config.initialization (dict or ConfigDict):
    source: 'legacy' (released V-MoE prefix: PREFIX.index + PREFIX.data-*), 'npz' (ViT
      .npz of vision_transformer / big_vision, keys '/'-joined like 'Transformer/...') or
      'orbax' (a vmoe WORKDIR/checkpoints/STEP directory, or a WORKDIR for its latest).
    path: where it is (a local path).
    rules: ordered list of tuples (kind, regex, *args), see vmoe.checkpoints.rules; each
      is applied to the names ('/'-joined paths) the previous rules produced, regexes use
      `re.search`.
    allow_unused, allow_missing, allow_mismatched: False/None (default), True, or a regex
      of names: checkpoint tensors that may match no target param (dropped); target params
      the checkpoint may lack (fresh init); checkpoint tensors whose shape may differ from
      the target's (dropped, fresh init).
    freeze: optional regex (or list of regexes) of target params the optimizer never
      updates: the trainer adds it to config.optimizer.frozen_pattern (the one mechanism
      that freezes params), for the whole run, resumed or not.
  Returns params (same tree: loaded leaves are numpy arrays in the target's dtype, or
  jax.Arrays on the target leaf's sharding when it has one; the other leaves are
  init_params' own) and a Report (`format_report`; logged at INFO): which target params
  came from the checkpoint (and through which rules), which kept their fresh init and why,
  which checkpoint tensors went unused, which params are frozen.
  Raises one ValueError listing every problem (unused tensor, missing param, shape
  mismatch with the rule that would fix it), and one for a bad cfg value (unknown key,
  source or rule kind, bad regex, wrong rule arguments, a rule matching nothing).

What is read: only the checkpoint arrays that end up in the model. A tensor that reaches
its param unchanged (renames only) on a sharded target is read for the bounding box of
the shards this process's devices hold: from a legacy checkpoint, only the data files
holding chunks of that box are opened (e.g. a process holding experts 0-3 of 32 reads
only their slices); npz and orbax sources read whole arrays and slice them. A tensor a
rule transforms (expand_tile, reshape, stack, unstack, resize_posemb) is read whole.

Scanned models (model.encoder.scan, vmoe/nn/scan.py) and checkpoints of them convert
automatically: rules, allow_* regexes and the report's 'init'/'unused' lines speak the
reference's unscanned names (Encoder/encoderblock_{i}/...), whatever the layout of either
side; a scanned target's params are stacked from them at the end ('stack(r)' in the
report; a layer the checkpoint lacks keeps its fresh init). `freeze` matches the model's
own (possibly scanned) names. Bias balancing's per-expert biases
(vmoe.nn.moe.BALANCE_PARAMS) a checkpoint lacks start at zero without allow_missing.

Sparse upcycling of a dense ViT into a V-MoE with experts in blocks 1 and 3:
  rules=[('rename', r'^(Encoder/encoderblock_[13])/Mlp/', r'\\1/Moe/Mlp/'),
         ('expand_tile', r'/Moe/Mlp/', E)], allow_missing='/Moe/Router/'.
"""
import dataclasses
import difflib
import math
import re
import zipfile
from typing import Any, Callable, Mapping, NamedTuple

from absl import logging
from flax import traverse_util
import jax
import numpy as np

from vmoe.checkpoints import legacy
from vmoe.checkpoints import rules as rules_lib
from vmoe.checkpoints import sources
from vmoe.checkpoints import training
from vmoe.nn import models
from vmoe.nn import moe as moe_lib
from vmoe.nn import scan as scan_lib
from vmoe.utils import checks
from vmoe.utils import paths

CONFIG_KEYS = ('source', 'path', 'rules', 'allow_unused', 'allow_missing',
               'allow_mismatched', 'freeze')


@dataclasses.dataclass
class Report:
  source: str
  loaded: dict[str, str]  # target param -> 'checkpoint name(s) | rule | rule'.
  initialized: dict[str, str]  # target param -> why it kept its fresh init.
  dropped: dict[str, str]  # checkpoint name -> why it is not used.
  frozen: list[str]


def _allowed(value, key: str) -> Callable[[str], bool]:
  if value in (None, False, True):
    return lambda _: bool(value)
  try:
    pattern = re.compile(value)
  except (re.error, TypeError) as e:
    raise ValueError(f'config.initialization.{key}={value!r} must be a bool or a regex: '
                     f'{e}.') from None
  return lambda n: bool(pattern.search(n))


def check_config(cfg: Mapping[str, Any]) -> dict:
  """config.initialization on its own: keys, source, path given, rule syntax, regexes.
  The checkpoint is not looked at: a resumed run must not need it. Returns a dict."""
  cfg = checks.to_dict(cfg)
  checks.check_keys(cfg, CONFIG_KEYS, 'config.initialization')
  source, path = cfg.get('source'), cfg.get('path')
  checks.one_of(source, sorted(SOURCES), 'config.initialization.source')
  if not path or not isinstance(path, str):
    raise ValueError('config.initialization.path is required (the checkpoint to start '
                     'from), e.g. --config.initialization.path=/path/to/checkpoint.')
  rules_lib.check_rules(cfg.get('rules'))
  for key in ('allow_unused', 'allow_missing', 'allow_mismatched'):
    _allowed(cfg.get(key), key)
  paths.patterns(cfg.get('freeze'), what='config.initialization.freeze')
  return cfg


# ----------------------------------------------------------------------------- sources
# open(path) -> (specs {name: (shape, dtype)} from headers or an index, read), where
# read({name: region}) -> {name: np.ndarray of that region}; region: a tuple of slices,
# or None for the whole array.
def _open_npz(path: str):
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
    raise ValueError(f'No .npz file at config.initialization.path={path!r}.') from None
  except zipfile.BadZipFile:
    raise ValueError(f'{path} is not a valid .npz file (truncated or corrupt).') from None

  def read(wanted):
    with np.load(path, allow_pickle=False) as z:
      return {n: z[n][r or ()] for n, r in wanted.items()}

  return specs, read


def _open_legacy(prefix: str):
  flat = traverse_util.flatten_dict(legacy.read_tree_structure(prefix), sep='/')
  specs = {n: (x.shape, x.dtype) for n, x in flat.items()}

  def read(wanted):
    tree = traverse_util.unflatten_dict(wanted, sep='/')
    return traverse_util.flatten_dict(legacy.restore(prefix, wanted=tree), sep='/')

  return specs, read


def _open_orbax(path: str):
  kind, directory = sources.locate(path)
  if kind != 'orbax':
    raise ValueError(f'config.initialization.path={path!r} is a legacy checkpoint; set '
                     "config.initialization.source='legacy'.")
  specs = {n: (x.shape, x.dtype) for n, x in training.params_metadata(directory).items()}

  def read(wanted):
    flat = traverse_util.flatten_dict(
        training.load_step_params(directory, sorted(wanted)), sep='/')
    return {n: np.asarray(flat[n])[r or ()] for n, r in wanted.items()}

  return specs, read


SOURCES = {'legacy': _open_legacy, 'npz': _open_npz, 'orbax': _open_orbax}


# ----------------------------------------------------------------------------- main
class Plan(NamedTuple):
  """What `initialize` will do: `used` {target param: Tensor}; `read` reads sources."""
  used: dict[str, rules_lib.Tensor]
  report: Report
  read: Callable[[Mapping[str, Any]], dict[str, np.ndarray]]
  ctx: rules_lib.Context


def _suggest(name: str, src: tuple, tgt: tuple) -> str:
  regex = '^' + re.escape(name) + '$'
  if name.endswith('pos_embedding'):
    return f"('resize_posemb', {regex!r})"
  if tgt[1:] == src:
    return f"('expand_tile', {regex!r}, {tgt[0]}) to copy it into {tgt[0]} experts"
  if math.prod(src) == math.prod(tgt):
    return f"('reshape', {regex!r}, {tgt})"
  return f"('reinit', {regex!r}) to keep the fresh init (e.g. '^head/' for new classes)"


def plan(target: Any, cfg: Mapping[str, Any]) -> Plan:
  """Checks cfg and applies its rules to the checkpoint's names and shapes (its index or
  headers; no array is read); raises one ValueError listing every problem."""
  cfg = check_config(cfg)
  target_flat = traverse_util.flatten_dict(target, sep='/')
  # Rules see the reference's names: a scanned model's or checkpoint's blocks are unscanned
  # first (and the model's stacked back at the end).
  segments = scan_lib.segments_of(target_flat)
  want = scan_lib.unscan(target_flat, lambda x, k: jax.ShapeDtypeStruct(
      tuple(x.shape)[1:], x.dtype))
  specs, read = SOURCES[cfg['source']](cfg['path'])
  tensors = scan_lib.unscan({
      n: rules_lib.Tensor(tuple(s), np.dtype(d), (n,), lambda a, n=n: a[n])
      for n, (s, d) in specs.items()}, rules_lib.take)
  ctx = rules_lib.Context(want)
  rules = rules_lib.check_rules(cfg.get('rules'))
  for i, (kind, *args) in enumerate(rules):
    # A rule that matches nothing is almost always a typo; reinit may also name params
    # the checkpoint lacks (e.g. a new head).
    if not (rules_lib.matching(tensors, args[0])
            or kind == 'reinit' and rules_lib.matching(want, args[0])):
      what, label, names = (
          ('neither a checkpoint tensor nor a model param', 'model params', want)
          if kind == 'reinit' else ('no checkpoint tensor', 'names there', tensors))
      raise ValueError(f'config.initialization.rules[{i}]={rules[i]!r} matches {what} '
                       f'({label}: {sorted(names)[:8]}...); fix or remove it.')
    tensors = rules_lib.RULES[kind](dict(tensors), ctx, *args)
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
    elif moe_lib.is_balance_param(n):  # Bias balancing's state: it starts at zero.
      fresh[n] = 'not in the checkpoint (a balance bias, starts at 0)'
    else:
      problems.append(f'model param {n} {tuple(want[n].shape)} gets no checkpoint tensor: '
                      'map one to it with a rule, or let it keep its fresh init with '
                      f"allow_missing or ('reinit', {'^' + re.escape(n) + '$'!r})")
  if problems:
    hint = models.router_layout_hint(set(want) - set(used) - set(fresh), set(tensors) - set(want))
    raise ValueError(f'config.initialization from {cfg["source"]} checkpoint '
                     f'{cfg["path"]}: {len(problems)} problem(s):\n  '
                     + '\n  '.join(problems) + (f'\n {hint}' if hint else ''))
  if segments:
    used, fresh = _scanned(used, fresh, segments, ctx)
  freeze = paths.patterns(cfg.get('freeze'))
  report = Report(
      source=f'{cfg["source"]}:{cfg["path"]}',
      loaded={n: ', '.join(t.sources) + ''.join(f' | {h}' for h in t.how)
              for n, t in used.items()},
      initialized=dict(sorted(fresh.items())), dropped=dict(sorted(ctx.dropped.items())),
      frozen=[n for n in sorted(target_flat) if any(re.search(p, n) for p in freeze)])
  return Plan(used, report, read, ctx)


def _scanned(used, fresh, segments, ctx):
  """used {name: Tensor}, fresh {name: why} in the reference's names -> the scanned
  model's. A stacked param some of whose layers the checkpoint lacks (allowed missing)
  takes those layers from its fresh init."""
  def stack(new, members):
    ts = [t for _, t in members if t is not None]
    if not ts:
      return None
    fill = lambda k: rules_lib.Tensor(ts[0].shape, ts[0].dtype, (), lambda a: np.asarray(
        ctx.init[new])[k], ('fresh init',))
    return rules_lib.stack([t or fill(k) for k, (_, t) in enumerate(members)])

  def why(new, members):
    whys = sorted({w for _, w in members if w is not None})
    if not whys:
      return None
    fresh_layers = [n for n, w in members if w is not None]
    return ('; '.join(whys) if len(fresh_layers) == len(members) else
            f'only {", ".join(fresh_layers)}: {"; ".join(whys)}')

  used = {n: t for n, t in scan_lib.scan(used, segments, stack).items() if t is not None}
  fresh = {n: w for n, w in scan_lib.scan(fresh, segments, why).items() if w is not None}
  return used, fresh


def bounding_box(indices, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """The smallest box (a slice per axis) holding every index (tuple of slices)."""
  ranges = [[s.indices(d)[:2] for s, d in zip(tuple(idx) + (slice(None),) * len(shape),
                                               shape)] for idx in indices]
  return tuple(slice(min(r[a][0] for r in ranges), max(r[a][1] for r in ranges))
               for a in range(len(shape)))


def _local_box(leaf) -> tuple[slice, ...] | None:
  """What this process's devices hold of a sharded target leaf (None: no sharding)."""
  sharding = getattr(leaf, 'sharding', None)
  if sharding is None:
    return None
  shape = tuple(leaf.shape)
  return bounding_box(sharding.addressable_devices_indices_map(shape).values(), shape)


def _place(x: np.ndarray, leaf, box: tuple[slice, ...] | None):
  """x: the region `box` (None: all) of the target leaf -> on the leaf's sharding."""
  sharding = getattr(leaf, 'sharding', None)
  if sharding is None:
    return x
  shape = tuple(leaf.shape)
  start = [b.start for b in box] if box else [0] * len(shape)

  def shard(index):
    return x[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(
        (s.indices(d)[:2] for s, d in zip(tuple(index) + (slice(None),) * len(shape),
                                          shape)), start))]

  return jax.make_array_from_callback(shape, sharding, shard)


def initialize(target: Any, init_params: Any, cfg: Mapping[str, Any]) -> tuple[Any, Report]:
  """See the module docstring."""
  want = traverse_util.flatten_dict(target, sep='/')
  init = traverse_util.flatten_dict(init_params, sep='/')
  if {n: tuple(x.shape) for n, x in want.items()} != {
      n: tuple(np.shape(x)) for n, x in init.items()}:
    raise ValueError('initialize: init_params must have the names and shapes of target.')
  p = plan(target, cfg)
  p.ctx.init.update(init)
  # Tensors that reach their param unchanged are read for this process's part only.
  boxes = {n: _local_box(want[n]) if set(t.how) <= {'rename'} else None
           for n, t in p.used.items()}
  wanted = {s: boxes[n] for n, t in p.used.items() for s in t.sources}
  arrays = p.read(wanted)
  out = dict(init)
  for n, t in p.used.items():
    out[n] = _place(np.asarray(t.make(arrays), dtype=want[n].dtype), want[n], boxes[n])
  logging.info('%s', format_report(p.report))
  return traverse_util.unflatten_dict(out, sep='/'), p.report


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
