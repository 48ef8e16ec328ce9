r"""Forward+backward time and peak memory of one MoE layer against the dense MLP floor.

One V-MoE layer (NoisyTopExpertsPerItemRouter in training mode, gating noise on) on
32 x 196 tokens, D 768, H 3072, E 8, K 2, capacity factor 1.05, per dispatch path and
precision policy, next to a dense ViT MLP on the same tokens at the same precision. The MoE
does K dense MLPs' worth of expert FLOPs (times the capacity factor), so K x dense is the
floor it is compared with.

  python benchmarks/moe_layer.py [--json] [--group-sizes 392,1568,6272] \
      [--dtypes float32,bfloat16] [--repeats 5] \
      [--paths dense,einsum-bf16,einsum,indices,ragged] [--ragged-everywhere] [--no-rss]

Paths: 'einsum-bf16' is the reference's default (one-hot dispatch in bfloat16), 'einsum'
the same with float32 dispatch, 'indices' gathers, 'ragged' jax.lax.ragged_dot on rows
sorted by expert. On CPU 'ragged' runs at the smallest group size only (XLA:CPU computes
ragged_dot as a loop over experts, ~7x slower; its cost does not depend on the group
size); --ragged-everywhere runs it at every size. Dtypes are the precision policy
(model.encoder.compute_dtype): params and activations float32, matmuls float32 or
bfloat16 with float32 accumulation.

Time: median over --repeats calls of jax.jit(value_and_grad) w.r.t. params and inputs of
sum(out * fixed random cotangent), after one warm-up call; all configurations live in one
process and are timed round-robin, so load from other processes hits them alike. Ratios are
taken within a round, then the median: to the floor (K x dense of that round, same dtype),
and for bfloat16 the speed-up over the same path in float32.
Memory: `peak_bytes` is XLA's memory_analysis of the compiled step (arguments + outputs +
temporaries - aliased); unless --no-rss, every configuration also runs once in a fresh
subprocess that reports its peak RSS (VmHWM: imports, compiler and run) and that peak
minus the RSS just before compiling, and on GPU/TPU the device allocator's peak.
bfloat16 rows also give `out_rel_err`: ||y_bf16 - y_f32|| / ||y_f32|| of the layer output,
same params, same tokens (the router runs in float32, so the routing is the same).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from vmoe.nn import mlp as mlp_lib
from vmoe.nn import models
from vmoe.nn import moe as moe_lib

B, T, D, H, E, K, CF = 32, 196, 768, 3072, 8, 2, 1.05
# path -> dispatcher options; 'dense' is the ViT MLP block.
PATHS = {
    'dense': None,
    'einsum-bf16': {'name': 'einsum', 'bfloat16': True},
    'einsum': {'name': 'einsum'},
    'indices': {'name': 'indices'},
    'ragged': {'name': 'ragged'},
}
DTYPES = ('float32', 'bfloat16')


def build(path: str, group_size: int, dtype: str):
  """(module for the [B, T, D] tokens, module with the same params for one image)."""
  if path == 'dense':
    return (mlp_lib.MlpBlock(mlp_dim=H, compute_dtype=dtype),) * 2
  # Training-time gating noise: N(0, (noise_std / E)^2) on the router logits.
  router = {'name': 'NoisyTopExpertsPerItemRouter', 'num_selected_experts': K,
            'noise_std': 1.0, 'dispatcher': dict(PATHS[path], capacity_factor=CF)}
  layer = lambda s: moe_lib.MoeLayer(
      models.resolve_moe(dict(layers=(0,), num_experts=E, group_size=s, split_rngs=True,
                              router=router), tokens_per_image=T),
      mlp_dim=H, compute_dtype=dtype)
  return layer(group_size), layer(T)


def make_step(path: str, group_size: int, dtype: str):
  """(jitted fwd+bwd step, jitted forward, the step's arguments).

  Params come from init on one image (cheap) and are float32 whatever the policy.
  """
  model, small = build(path, group_size, dtype)
  kx, kc, kp, kg = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (B, T, D))
  cot = jax.random.normal(kc, (B, T, D))
  params = jax.jit(lambda k: small.init({'params': k}, x[:1], train=False))(kp)['params']

  def forward(params, x, key):
    out = model.apply({'params': params}, x, train=True,
                      rngs={'gating': key, 'dropout': key})
    return out[0] if isinstance(out, tuple) else out  # MoeLayer also returns metrics.

  loss = lambda params, x, cot, key: jnp.sum(forward(params, x, key) * cot)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return step, jax.jit(forward), (params, x, cot, kg)


def _rss(field: str) -> int:
  """VmRSS (now) or VmHWM (peak) of this process in bytes.

  Not ru_maxrss: Linux carries it over from the parent through fork and exec, so a
  subprocess of a big parent would report the parent's peak.
  """
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))


def xla_peak(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def measure_rss(path: str, group_size: int, dtype: str) -> dict:
  """Run in a fresh process: compile and run the step once, report memory."""
  step, _, args = make_step(path, group_size, dtype)
  jax.block_until_ready(args)
  before = _rss('VmRSS')
  compiled = step.lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  peak = _rss('VmHWM')
  out = {'peak_rss_bytes': peak, 'peak_rss_delta_bytes': peak - before}
  stats = jax.devices()[0].memory_stats()  # None on CPU; on GPU/TPU the allocator's peak.
  if stats and 'peak_bytes_in_use' in stats:
    out['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  return out


def rss_in_subprocess(path: str, group_size: int, dtype: str) -> dict:
  spec = json.dumps([path, group_size, dtype])
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--memory-probe', spec],
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f'Memory run of {spec} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def time_all(configs, repeats: int):
  """(config -> per-round (wall s, CPU s) of one call, config -> XLA peak, outputs).

  Configs are timed round-robin after a warm-up call each (order reversed every other
  round), so that load from other processes hits all of them alike. CPU seconds (all
  threads) are less sensitive to other processes than wall time.
  """
  steps, peaks, outputs = {}, {}, {}
  for c in configs:
    step, forward, args = make_step(*c)
    steps[c] = (step.lower(*args).compile(), args)
    peaks[c] = xla_peak(steps[c][0])
    outputs[c] = forward(args[0], args[1], args[3])
    jax.block_until_ready(steps[c][0](*args))
  times = {c: [] for c in configs}
  for r in range(repeats):
    for c in (configs if r % 2 == 0 else configs[::-1]):
      step, args = steps[c]
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(step(*args))
      times[c].append((time.perf_counter() - t0, time.process_time() - c0))
  return times, peaks, outputs


def _csv(type_):
  return lambda s: [type_(v) for v in s.split(',') if v]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--json', action='store_true', help='one JSON object per line')
  p.add_argument('--group-sizes', type=_csv(int), default=[392, 1568, 6272])
  p.add_argument('--dtypes', type=_csv(str), default=list(DTYPES))
  p.add_argument('--paths', type=_csv(str), default=list(PATHS))
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--ragged-everywhere', action='store_true',
                 help='on CPU, run ragged at every group size (default: the smallest)')
  p.add_argument('--rss', action=argparse.BooleanOptionalAction, default=True,
                 help='measure peak RSS in a subprocess per configuration')
  p.add_argument('--memory-probe', help=argparse.SUPPRESS)  # Internal: measure_rss.
  args = p.parse_args(argv)
  for s in args.group_sizes:
    if s <= 0 or (B * T) % s or s % T:
      raise ValueError(f'--group-sizes: {s} must be a whole number of images ({T} tokens '
                       f'each) dividing {B * T}, e.g. 392, 1568 or 6272.')
  for dt in args.dtypes:
    if dt not in DTYPES:
      raise ValueError(f'--dtypes: {dt!r} is not a precision policy; use {",".join(DTYPES)}.')
  for path in args.paths:
    if path not in PATHS:
      raise ValueError(f'--paths: unknown path {path!r}; valid: {",".join(PATHS)}.')
  if 'dense' not in args.paths:
    raise ValueError('--paths must include dense: it is the floor the MoE is compared to.')
  if args.repeats < 1:
    raise ValueError(f'--repeats={args.repeats} must be >= 1.')
  return args


def configs_of(args):
  """(path, group_size, dtype) to run. Dense does not group tokens: one per dtype, listed
  under the first group size."""
  cpu = jax.default_backend() == 'cpu'
  s0 = args.group_sizes[0]
  skip = lambda p, s: s != min(args.group_sizes) and (
      p == 'dense' or (p == 'ragged' and cpu and not args.ragged_everywhere))
  return [(p, s, dt) for dt in args.dtypes for s in args.group_sizes for p in args.paths
          if not skip(p, s) and (p != 'dense' or s == s0)]


def rows_of(configs, times, peaks, outputs, rss):
  dense_of = {dt: next(c for c in configs if c[0] == 'dense' and c[2] == dt)
              for _, _, dt in configs}
  median = statistics.median
  rows = []
  for c in configs:
    path, s, dt = c
    per_round = lambda ref, i: median(a[i] / b[i] for a, b in zip(times[ref], times[c]))
    dense = times[dense_of[dt]]
    row = dict(path=path, group_size=s if path != 'dense' else None, dtype=dt,
               seconds=median(t[0] for t in times[c]),
               ratio_to_floor=median(t[0] / (K * d[0]) for t, d in zip(times[c], dense)),
               cpu_seconds=median(t[1] for t in times[c]),
               cpu_ratio_to_floor=median(t[1] / (K * d[1]) for t, d in zip(times[c], dense)),
               peak_bytes=peaks[c], **rss.get(c, {}))
    f32 = (path, s, 'float32')
    if dt == 'bfloat16' and f32 in times:
      row['speedup_vs_float32'] = per_round(f32, 0)
      y, y32 = outputs[c], outputs[f32]
      row['out_rel_err'] = float(jnp.linalg.norm(y - y32) / jnp.linalg.norm(y32))
    rows.append(row)
  return rows


def print_table(rows, repeats):
  gib = lambda b: f'{b / 2**30:.2f} GiB' if b is not None else '-'
  opt = lambda v, f: f.format(v) if v is not None else '-'
  print(f'{jax.devices()[0].device_kind}: {B}x{T} tokens, D {D}, H {H}, E {E}, K {K}, '
        f'cf {CF}, fwd+bwd, median of {repeats}')
  print('| path | group | dtype | time | / (K x dense) | CPU time | / (K x dense) '
        '| bf16 speed-up | XLA peak | peak RSS | out rel. err |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['path']} | {r['group_size'] or '-'} | {r['dtype']} | {r['seconds']:.2f} s "
          f"| {r['ratio_to_floor']:.2f}x | {r['cpu_seconds']:.2f} s "
          f"| {r['cpu_ratio_to_floor']:.2f}x | {opt(r.get('speedup_vs_float32'), '{:.2f}x')} "
          f"| {gib(r['peak_bytes'])} | {gib(r.get('peak_rss_bytes'))} "
          f"| {opt(r.get('out_rel_err'), '{:.1e}')} |")
  # Best MoE path per dtype (by median time), and bf16's best against float32's best.
  best = {}
  for r in rows:
    if r['path'] != 'dense' and (r['dtype'] not in best or
                                 r['seconds'] < best[r['dtype']]['seconds']):
      best[r['dtype']] = r
  for dt, r in best.items():
    print(f"best {dt}: {r['path']} at {r['group_size']}, {r['seconds']:.2f} s, "
          f"{r['ratio_to_floor']:.2f}x the floor")
  if len(best) == 2:
    print(f"best bfloat16 vs best float32: "
          f"{best['float32']['seconds'] / best['bfloat16']['seconds']:.2f}x faster")


def main(argv):
  args = parse_args(argv)
  if args.memory_probe:
    print(json.dumps(measure_rss(*json.loads(args.memory_probe))))
    return
  configs = configs_of(args)
  # Subprocesses first, before this process grows.
  rss = {c: rss_in_subprocess(*c) for c in configs} if args.rss else {}
  times, peaks, outputs = time_all(configs, args.repeats)
  rows = rows_of(configs, times, peaks, outputs, rss)
  if args.json:
    for r in rows:
      print(json.dumps(r))
  else:
    print_table(rows, args.repeats)


if __name__ == '__main__':
  main(sys.argv[1:])
