r"""Inference latency of Mobile V-MoE (per-image routing) against the dense ViT-Tiny.

ViT-Tiny/16 at 224 px (12 blocks, width 192, 3 heads, MLP 768, 197 tokens); the MoE
models replace the MLPs of the last 2 blocks with E=10 experts, K=1, as the paper's
ViT-Tiny Mobile V-MoE (configs/mobile_vmoe_ti16_ilsvrc2012.py):

  dense        the ViT-Tiny.
  mobile_vmoe  one per-image router for the MoE part; path 'chosen': each image through
               its K experts' gathered weights (dispatcher.chosen_experts=True), path
               'buffers': capacity buffers of all E experts ('indices' dispatch,
               capacity factor 1.0, the batch as one group), as for training.
  token_vmoe   V-MoE's token routing (NoisyTopExpertsPerItemRouter), same E, K, blocks,
               dispatch and capacity.

  python benchmarks/per_image_latency.py [--json] [--batch-sizes 1,8,64]
      [--dtypes float32,bfloat16] [--repeats 30] [--inner 3]

Time: median and 90th percentile over --repeats rounds (fewer at larger batches, at
least 5) of the jitted forward pass (train=False), after a warm-up call. Configurations
are timed round-robin, so that load from other processes hits them alike; within a round
each is called --inner times in a row and the median kept, as a server calls one model
over and over (a single call after another model's runs on caches full of that model's
weights, which penalises the larger MoE models: see docs/performance.md). ratio_to_dense is
the median over rounds of the ratio to the dense model of the same round, batch size and
dtype. Dtypes are the precision policy (model.encoder.compute_dtype). peak_bytes: XLA's
memory_analysis of the compiled forward (arguments + outputs + temporaries - aliased).
expert_weight_bytes: bytes of MLP weights of the MoE blocks read per image: K experts per
layer on the chosen path, all E per batch (E / B per image) with buffers, the blocks' 2
MLPs for dense.
"""
import argparse
import json
import time

import jax
import numpy as np

from vmoe.nn import models

T, D, H, E, K, MOE_LAYERS = 197, 192, 768, 10, 1, (10, 11)
# (model, path) -> how the model config differs from the dense ViT-Tiny.
MODELS = {
    ('dense', '-'): None,
    ('mobile_vmoe', 'chosen'): ('PerImageRouter', {'chosen_experts': True}),
    ('mobile_vmoe', 'buffers'): ('PerImageRouter', {'chosen_experts': False}),
    ('token_vmoe', 'buffers'): ('NoisyTopExpertsPerItemRouter', {}),
}


def model_config(model, path: str, dtype: str, batch_size: int) -> dict:
  encoder = dict(num_layers=12, mlp_dim=H, num_heads=3, compute_dtype=dtype)
  moe = MODELS[model, path]
  if moe is not None:
    router, disp = moe
    encoder['moe'] = dict(
        layers=MOE_LAYERS, num_experts=E, group_size=batch_size * T,
        router=dict(name=router, num_selected_experts=K, dispatcher=dict(
            name='indices', capacity_factor=1.0, **disp)))
  return dict(name='VisionTransformerMoe', num_classes=1000, patch_size=(16, 16),
              hidden_size=D, classifier='token', representation_size=None, encoder=encoder)


def expert_weight_bytes(model: str, path: str, batch_size: int) -> float:
  per_mlp = 4 * (2 * D * H + D + H) * len(MOE_LAYERS)  # float32 params, both MoE blocks.
  if model == 'dense':
    return per_mlp
  return per_mlp * (K if path == 'chosen' else E / batch_size)


def make_forward(model, path, dtype, batch_size):
  config = model_config(model, path, dtype, batch_size)
  module = models.build_model(config, 224)
  x = jax.random.normal(jax.random.key(0), (batch_size, 224, 224, 3))
  # Init on the batch: the MoE group size is the batch's tokens.
  params = jax.jit(module.init)(jax.random.key(1), x)['params']
  forward = jax.jit(lambda p, x: module.apply({'params': p}, x, train=False)[0])
  compiled = forward.lower(params, x).compile()
  m = compiled.memory_analysis()
  peak = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
  return compiled, (params, x), peak


def time_all(configs, repeats, inner):
  """config -> list of per-round seconds (the median of `inner` calls in a row), config ->
  peak bytes."""
  compiled, peaks = {}, {}
  for c in configs:
    fn, args, peaks[c] = make_forward(*c)
    jax.block_until_ready(fn(*args))
    compiled[c] = fn, args
  times = {c: [] for c in configs}
  for r in range(repeats):
    for c in (configs if r % 2 == 0 else configs[::-1]):
      fn, args = compiled[c]
      calls = []
      for _ in range(inner):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        calls.append(time.perf_counter() - t0)
      times[c].append(float(np.median(calls)))
  return times, peaks


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--json', action='store_true', help='One JSON row per line.')
  parser.add_argument('--batch-sizes', default='1,8,64')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--repeats', type=int, default=30)
  parser.add_argument('--inner', type=int, default=3)
  args = parser.parse_args()
  rows = []
  for b in [int(v) for v in args.batch_sizes.split(',')]:
    for dtype in args.dtypes.split(','):
      configs = [(m, p, dtype, b) for m, p in MODELS]
      repeats = max(5, args.repeats // b)
      times, peaks = time_all(configs, repeats, args.inner)
      dense = np.asarray(times[configs[0]])
      buffers = np.asarray(times['mobile_vmoe', 'buffers', dtype, b])
      for c in configs:
        model, path, _, _ = c
        ts = np.asarray(times[c])
        rows.append(dict(
            model=model, path=path, batch_size=b, dtype=dtype,
            seconds=float(np.median(ts)), p90_seconds=float(np.percentile(ts, 90)),
            ratio_to_dense=float(np.median(ts / dense)),
            # Of Mobile V-MoE's buffer path over this one (same round).
            speedup_over_buffers=float(np.median(buffers / ts)),
            peak_bytes=peaks[c], expert_weight_bytes=expert_weight_bytes(model, path, b),
            repeats=repeats, backend=jax.default_backend()))
      if args.json:
        for r in rows[-len(configs):]:
          print(json.dumps(r), flush=True)
  if not args.json:
    print_table(rows)


def print_table(rows):
  print(f'backend: {jax.default_backend()}, {jax.device_count()} device(s), '
        f'jax {jax.__version__}')
  print('| model | path | batch | dtype | median ms | p90 ms | x dense | '
        'buffers / this | peak MiB | expert weights MiB / image |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["model"]} | {r["path"]} | {r["batch_size"]} | {r["dtype"]} | '
          f'{1e3 * r["seconds"]:.1f} | {1e3 * r["p90_seconds"]:.1f} | '
          f'{r["ratio_to_dense"]:.2f} | {r["speedup_over_buffers"]:.2f} | '
          f'{r["peak_bytes"] / 2**20:.0f} | {r["expert_weight_bytes"] / 2**20:.2f} |')


if __name__ == '__main__':
  main()
