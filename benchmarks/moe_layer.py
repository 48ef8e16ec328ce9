r"""Forward+backward time and peak memory of one MoE layer against the dense MLP floor.

One V-MoE layer (NoisyTopExpertsPerItemRouter in training mode, gating noise on) on
32 x 196 tokens, D 768, H 3072, E 8, K 2, capacity factor 1.05, per dispatch path, next
to a dense ViT MLP on the same tokens. The MoE does K dense MLPs' worth of expert FLOPs
(times the capacity factor), so K x dense is the floor it is compared with.

  python benchmarks/moe_layer.py [--json] [--group-sizes 392,1568,6272] \
      [--dtypes float32,bfloat16] [--repeats 7] [--paths dense,einsum-bf16,einsum,indices]

Time: median over --repeats calls of jax.jit(value_and_grad) w.r.t. params and inputs of
sum(out * fixed random cotangent), after one warm-up call; all configurations live in one
process and are timed round-robin, so load from other processes hits them alike. The
ratio to the floor is the median over rounds of (time / (K x dense time of that round)).
Memory: every configuration is also compiled and run once in a fresh subprocess that
reports (a) XLA's memory_analysis of the compiled step (arguments + outputs + temporaries
- aliased; `peak_bytes`), (b) the process's peak RSS (VmHWM: imports, compiler and run),
(c) that peak minus the RSS just before compiling and, on GPU/TPU, (d) the device
allocator's peak (`device_peak_bytes`).
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

from vmoe.nn import moe as moe_lib
from vmoe.nn import mlp as mlp_lib

B, T, D, H, E, K, CF = 32, 196, 768, 3072, 8, 2, 1.05
# path -> dispatcher options; 'dense' is the ViT MLP block.
PATHS = {
    'dense': None,
    'einsum-bf16': {'name': 'einsum', 'bfloat16': True},
    'einsum': {'name': 'einsum', 'bfloat16': False},
    'indices': {'name': 'indices'},
}


def build(path: str, group_size: int):
  """(module for the [B, T, D] tokens, module with the same params for one image)."""
  if path == 'dense':
    return mlp_lib.MlpBlock(mlp_dim=H), mlp_lib.MlpBlock(mlp_dim=H)
  # Training-time gating noise: N(0, (noise_std / E)^2) on the router logits.
  router = {'name': 'NoisyTopExpertsPerItemRouter', 'num_selected_experts': K,
            'noise_std': 1.0, 'dispatcher': dict(PATHS[path], capacity_factor=CF)}
  layer = lambda s: moe_lib.MoeLayer(mlp_dim=H, num_experts=E, group_size=s, router=router,
                                     split_rngs=True)
  return layer(group_size), layer(T)


def make_step(path: str, group_size: int, dtype: str):
  """(jitted fwd+bwd step, its arguments). Params come from init on one image (cheap)."""
  model, small = build(path, group_size)
  kx, kc, kp, kg = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (B, T, D), dtype)
  cot = jax.random.normal(kc, (B, T, D), dtype)
  params = jax.jit(lambda k: small.init({'params': k}, x[:1], train=False))(kp)['params']
  params = jax.tree.map(lambda p: p.astype(dtype), params)

  def loss(params, x, cot, key):
    out = model.apply({'params': params}, x, train=True,
                      rngs={'gating': key, 'dropout': key})
    out = out[0] if isinstance(out, tuple) else out  # MoeLayer also returns metrics.
    return jnp.sum((out * cot).astype(jnp.float32))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return step, (params, x, cot, kg)


def _rss(field: str) -> int:
  """VmRSS (now) or VmHWM (peak) of this process in bytes.

  Not ru_maxrss: Linux carries it over from the parent through fork and exec, so a
  subprocess of a big parent would report the parent's peak.
  """
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ':'))


def measure_memory(path: str, group_size: int, dtype: str) -> dict:
  """Run in a fresh process: compile and run the step once, report memory."""
  step, args = make_step(path, group_size, dtype)
  jax.block_until_ready(args)
  before = _rss('VmRSS')
  compiled = step.lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  peak = _rss('VmHWM')
  m = compiled.memory_analysis()
  xla = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
         - m.alias_size_in_bytes)
  out = {'peak_bytes': int(xla), 'temp_bytes': int(m.temp_size_in_bytes),
         'peak_rss_bytes': peak, 'peak_rss_delta_bytes': peak - before}
  stats = jax.devices()[0].memory_stats()  # None on CPU; on GPU/TPU the allocator's peak.
  if stats and 'peak_bytes_in_use' in stats:
    out['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  return out


def memory_in_subprocess(path: str, group_size: int, dtype: str) -> dict:
  spec = json.dumps([path, group_size, dtype])
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--_memory', spec],
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f'Memory run of {spec} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def time_all(configs, repeats: int) -> dict:
  """Config -> per-round (wall seconds, CPU seconds of this process) of one call.

  Configs are timed round-robin after a warm-up call each (order reversed every other
  round), so that load from other processes hits all of them alike. CPU seconds (all
  threads) are less sensitive to other processes than wall time.
  """
  steps = {c: make_step(*c) for c in configs}
  for step, args in steps.values():
    jax.block_until_ready(step(*args))
  times = {c: [] for c in configs}
  for r in range(repeats):
    for c in (configs if r % 2 == 0 else configs[::-1]):
      step, args = steps[c]
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(step(*args))
      times[c].append((time.perf_counter() - t0, time.process_time() - c0))
  return times


def _csv(type_):
  return lambda s: [type_(v) for v in s.split(',') if v]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--json', action='store_true', help='one JSON object per line')
  p.add_argument('--group-sizes', type=_csv(int), default=[1568])
  p.add_argument('--dtypes', type=_csv(str), default=['float32'])
  p.add_argument('--paths', type=_csv(str), default=list(PATHS))
  p.add_argument('--repeats', type=int, default=7)
  p.add_argument('--_memory', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for s in args.group_sizes:
    if s <= 0 or (B * T) % s or s % T:
      raise ValueError(f'--group-sizes: {s} must be a whole number of images ({T} tokens '
                       f'each) dividing {B * T}, e.g. 392, 1568 or 6272.')
  for dt in args.dtypes:
    if dt not in ('float32', 'bfloat16'):
      raise ValueError(f'--dtypes: {dt!r} is not supported; use float32 and/or bfloat16.')
  for path in args.paths:
    if path not in PATHS:
      raise ValueError(f'--paths: unknown path {path!r}; valid: {",".join(PATHS)}.')
  if 'dense' not in args.paths:
    raise ValueError('--paths must include dense: it is the floor the MoE is compared to.')
  if args.repeats < 1:
    raise ValueError(f'--repeats={args.repeats} must be >= 1.')
  return args


def main(argv):
  args = parse_args(argv)
  if args._memory:
    print(json.dumps(measure_memory(*json.loads(args._memory))))
    return
  # Dense does not group tokens: one config per dtype, listed with the first group size.
  configs = [(p, s, dt) for dt in args.dtypes for s in args.group_sizes for p in args.paths
             if p != 'dense' or s == args.group_sizes[0]]
  memory = {c: memory_in_subprocess(*c) for c in configs}  # Before this process grows.
  times = time_all(configs, args.repeats)
  rows = []
  for c in configs:
    path, s, dt = c
    dense = times[('dense', args.group_sizes[0], dt)]
    # Ratios are taken within a round (dense ran seconds before or after), then the median.
    ratio = lambda i: statistics.median(
        t[i] / (K * d[i]) for t, d in zip(times[c], dense))
    median = lambda i: statistics.median(t[i] for t in times[c])
    rows.append(dict(path=path, group_size=s if path != 'dense' else None, dtype=dt,
                     seconds=median(0), ratio_to_floor=ratio(0), cpu_seconds=median(1),
                     cpu_ratio_to_floor=ratio(1), **memory[c]))
  if args.json:
    for r in rows:
      print(json.dumps(r))
    return
  gib = lambda b: f'{b / 2**30:.2f} GiB'
  print(f'{jax.devices()[0].device_kind}: {B}x{T} tokens, D {D}, H {H}, E {E}, K {K}, '
        f'cf {CF}, fwd+bwd, median of {args.repeats}')
  print('| path | group | dtype | time | / (K x dense) | CPU time | / (K x dense) '
        '| XLA peak | peak RSS | RSS delta |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['path']} | {r['group_size'] or '-'} | {r['dtype']} | {r['seconds']:.2f} s "
          f"| {r['ratio_to_floor']:.2f}x | {r['cpu_seconds']:.2f} s "
          f"| {r['cpu_ratio_to_floor']:.2f}x | {gib(r['peak_bytes'])} "
          f"| {gib(r['peak_rss_bytes'])} | {gib(r['peak_rss_delta_bytes'])} |")


if __name__ == '__main__':
  main(sys.argv[1:])
