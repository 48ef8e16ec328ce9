r"""Images/s of a V-MoE S/32-like train step against a dense ViT of equal active FLOPs.

  python benchmarks/train_step.py [--json] [--batch-sizes 32,64,128] \
      [--dtypes float32,bfloat16] [--dispatch indices] [--group-images 8] [--repeats 5] \
      [--profile]

V-MoE: ViT-S/32 on 224 x 224 images (50 tokens with the class token, width 384, 6 heads,
8 blocks, MLP 1536) with every other block (1, 3, 5, 7) a MoE of E 8 experts, K 2,
capacity factor 1.05, groups of --group-images images. Dense: the same ViT with MLP 2304
in every block. Each token of the V-MoE goes through 4 MLPs of 1536 and 4 x K = 8 of them
in the MoE blocks, 12 x 1536 = 8 x 2304 MLP units in all: per token, both models do the
same attention and the same MLP FLOPs (the V-MoE adds its router, and computes the 5% of
capacity padding), so equal speed means the MoE layers run at the dense floor.

A step is jax.jit of forward, backward (softmax cross-entropy + the auxiliary loss) and an
Adam update, params and optimizer state donated. Time: median over --repeats steps after
one warm-up step, all configurations compiled in one process and stepped round-robin;
`ratio_to_dense` is the median over rounds of (dense step time / V-MoE step time) at the
same dtype and batch size, i.e. V-MoE images/s over dense images/s. `gflops_per_image` is
XLA's cost_analysis of the whole step divided by the batch size; `params` counts all
parameters (the V-MoE has E/K = 4x the active expert weights, and its Adam update and
bfloat16 weight casts cost per parameter per step, whatever the batch size).

--profile adds where the time goes: jax.profiler traces of 3 more steps of each
configuration, the time of each XLA op summed over threads (ms per step; XLA:CPU, whose
trace names each HLO op: on GPU/TPU use TensorBoard's profiler instead), split by the
model part its op_name names (MoE blocks, dense MLPs, attention, patch embedding, the
rest: head, LayerNorms, loss, Adam) and into matmuls (dots and the XLA:CPU library calls
that run them) and everything else.

Batch sizes are per device: the V-MoE papers train with 4096 images over 32-64 accelerator
chips, 64-128 per device; 32 is the cheap check.
"""
import argparse
import collections
import glob
import json
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from vmoe.configs import common
from vmoe.nn import models

IMAGE, PATCH, WIDTH, HEADS, LAYERS, MLP, E, K, CF = 224, 32, 384, 6, 8, 1536, 8, 2, 1.05
MOE_LAYERS = common.every_n(2, LAYERS)  # (1, 3, 5, 7)
# Dense MLP width with the V-MoE's active MLP FLOPs per token, spread over every block.
DENSE_MLP = MLP * (LAYERS - len(MOE_LAYERS) + K * len(MOE_LAYERS)) // LAYERS  # 2304
TOKENS = (IMAGE // PATCH) ** 2 + 1
NUM_CLASSES = 1000


def model_config(model: str, dtype: str, dispatch: str, group_images: int) -> dict:
  encoder = dict(num_layers=LAYERS, num_heads=HEADS, mlp_dim=MLP, compute_dtype=dtype)
  if model == 'vmoe':
    encoder['moe'] = dict(
        layers=MOE_LAYERS, num_experts=E, group_size=group_images * TOKENS, split_rngs=True,
        router=dict(name='NoisyTopExpertsPerItemRouter', num_selected_experts=K,
                    noise_std=1.0, importance_loss_weight=0.005, load_loss_weight=0.005,
                    dispatcher=dict(name=dispatch, capacity_factor=CF)))
  else:
    encoder['mlp_dim'] = DENSE_MLP
  return dict(name='VisionTransformerMoe' if model == 'vmoe' else 'VisionTransformer',
              num_classes=NUM_CLASSES, patch_size=(PATCH, PATCH), hidden_size=WIDTH,
              classifier='token', representation_size=None, encoder=encoder)


def make_step(model: str, dtype: str, dispatch: str, group_images: int, batch_size: int):
  """(compiled train step, its first arguments)."""
  net = models.build(models.resolve(model_config(model, dtype, dispatch, group_images),
                                    image_size=(IMAGE, IMAGE)))
  kp, ki, kl, kr = jax.random.split(jax.random.key(0), 4)
  images = jax.random.normal(ki, (batch_size, IMAGE, IMAGE, 3))
  labels = jax.random.randint(kl, (batch_size,), 0, NUM_CLASSES)
  # Init on one group of images (the MoE layers need whole groups): cheap.
  params = jax.jit(lambda k: net.init({'params': k}, images[:group_images], train=False))(
      kp)['params']
  tx = optax.adam(1e-3)

  def step(params, opt_state, images, labels, key):
    def loss_fn(params):
      logits, metrics = net.apply({'params': params}, images, train=True,
                                  rngs={'dropout': key, 'gating': key})
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.mean(ce) + jnp.mean(metrics['auxiliary_loss'])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  args = (params, tx.init(params), images, labels, kr)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
  return compiled, args


def _csv(s):
  return [v for v in s.split(',') if v]


def _csv_int(s):
  return [int(v) for v in _csv(s)]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--json', action='store_true', help='one JSON object per line')
  p.add_argument('--batch-sizes', type=_csv_int, default=[32, 64, 128])
  p.add_argument('--group-images', type=int, default=8)
  p.add_argument('--dtypes', type=_csv, default=['float32', 'bfloat16'])
  p.add_argument('--dispatch', default='indices')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--profile', action='store_true', help='time per model part and op kind')
  args = p.parse_args(argv)
  for b in args.batch_sizes:
    if args.group_images < 1 or b % args.group_images:
      raise ValueError(f'--group-images={args.group_images} must divide every batch size; '
                       f'it does not divide {b} (--batch-sizes).')
  for dt in args.dtypes:
    if dt not in ('float32', 'bfloat16'):
      raise ValueError(f'--dtypes: {dt!r} is not a precision policy; use float32,bfloat16.')
  if args.repeats < 1:
    raise ValueError(f'--repeats={args.repeats} must be >= 1.')
  return args


PARTS = (('/Moe/', 'moe'), ('/Mlp/', 'mlp'), ('SelfAttention', 'attention'),
         ('embedding', 'embedding'))


def profile(compiled, args, steps: int = 3) -> dict[str, float]:
  """'part/matmul' or 'part/other' -> ms per step of the ops (summed over threads)."""
  hlo = compiled.as_text()
  part = {m.group(1): next((n for key, n in PARTS if key in m.group(2)), 'rest')
          for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo,
                               re.M)}
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(steps):
        p, opt_state, loss = compiled(*args)
        jax.block_until_ready(loss)
        args = (p, opt_state) + tuple(args[2:])  # The old ones were donated.
    data = jax.profiler.ProfileData.from_file(glob.glob(f'{d}/**/*.xplane.pb',
                                                        recursive=True)[0])
    out = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        for ev in line.events:
          if ev.name in part:  # XLA ops only (not runtime or Python events).
            kind = 'matmul' if re.match(r'(ynn_fusion|dot|cublas|.*gemm)', ev.name) else 'other'
            out[f'{part[ev.name]}/{kind}'] += ev.duration_ns / steps / 1e6
  return dict(sorted(out.items()))


def time_batch(args, batch_size: int) -> list[dict]:
  """Rows of every (model, dtype) at one batch size, stepped round-robin."""
  configs = [(m, dt) for dt in args.dtypes for m in ('vmoe', 'dense')]
  state, flops, params = {}, {}, {}
  for c in configs:
    compiled, state[c] = make_step(*c, args.dispatch, args.group_images, batch_size)
    flops[c] = compiled.cost_analysis().get('flops', float('nan'))
    params[c] = sum(x.size for x in jax.tree.leaves(state[c][0]))
    state[c] = (compiled, state[c])
  times = {c: [] for c in configs}
  for r in range(args.repeats + 1):  # Round 0 warms up.
    for c in (configs if r % 2 == 0 else configs[::-1]):
      compiled, (p, opt_state, images, labels, key) = state[c]
      t0 = time.perf_counter()
      p, opt_state, loss = compiled(p, opt_state, images, labels, key)
      jax.block_until_ready(loss)
      if r:
        times[c].append(time.perf_counter() - t0)
      state[c] = (compiled, (p, opt_state, images, labels, key))
  profiles = {}
  if args.profile:
    for c in configs:
      profiles[c] = profile(*state[c])
  rows = []
  for m, dt in configs:
    t, dense = times[(m, dt)], times[('dense', dt)]
    rows.append(dict(model=m, dtype=dt, batch_size=batch_size,
                     dispatch=args.dispatch if m == 'vmoe' else None,
                     params=params[(m, dt)], seconds=statistics.median(t),
                     images_per_s=batch_size / statistics.median(t),
                     ratio_to_dense=statistics.median(d / v for d, v in zip(dense, t)),
                     gflops_per_image=flops[(m, dt)] / batch_size / 1e9,
                     **({'profile_ms': profiles[(m, dt)]} if profiles else {})))
  return rows


def main(argv):
  args = parse_args(argv)
  if not args.json:
    print(f'{jax.devices()[0].device_kind}: train step (fwd+bwd+Adam), {IMAGE}px /{PATCH} '
          f'({TOKENS} tokens), width {WIDTH}, {LAYERS} blocks; V-MoE: MoE in {MOE_LAYERS}, '
          f'E {E}, K {K}, cf {CF}, groups of {args.group_images} images, {args.dispatch}; '
          f'dense: MLP {DENSE_MLP}; median of {args.repeats}')
    print('| model | dtype | batch | params | step | images/s | / dense images/s '
          '| GFLOPs/image (XLA) |')
    print('|---|---|---|---|---|---|---|---|')
  profiled = []
  for b in args.batch_sizes:
    for r in time_batch(args, b):
      if args.json:
        print(json.dumps(r), flush=True)
        continue
      print(f"| {r['model']} | {r['dtype']} | {b} | {r['params'] / 1e6:.1f}M "
            f"| {r['seconds']:.2f} s | {r['images_per_s']:.1f} | {r['ratio_to_dense']:.2f}x "
            f"| {r['gflops_per_image']:.2f} |", flush=True)
      profiled += [r] if 'profile_ms' in r else []
  if profiled:
    cols = sorted({k for r in profiled for k in r['profile_ms']})
    print('\nOp time per step (ms, summed over threads), by model part / op kind:\n')
    print('| model | dtype | batch | ' + ' | '.join(cols) + ' | all ops |')
    print('|---' * (len(cols) + 4) + '|')
    for r in profiled:
      ms = r['profile_ms']
      print(f"| {r['model']} | {r['dtype']} | {r['batch_size']} | "
            + ' | '.join(f'{ms.get(k, 0):.0f}' for k in cols) + f' | {sum(ms.values()):.0f} |')


if __name__ == '__main__':
  main(sys.argv[1:])
