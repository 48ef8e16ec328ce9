r"""Images/s of a V-MoE S/32-like train step against a dense ViT of equal active FLOPs.

  python benchmarks/train_step.py [--json] [--batch-size 32] [--dtypes float32,bfloat16] \
      [--dispatch indices] [--group-images 8] [--repeats 5]

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
same dtype, i.e. V-MoE images/s over dense images/s. `gflops_per_image` is XLA's
cost_analysis of the whole step divided by the batch size.
"""
import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

from vmoe.nn import models

IMAGE, PATCH, WIDTH, HEADS, LAYERS, MLP, E, K, CF = 224, 32, 384, 6, 8, 1536, 8, 2, 1.05
MOE_LAYERS = models.every_n(2, LAYERS)  # (1, 3, 5, 7)
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
  net = models.build_model(model_config(model, dtype, dispatch, group_images))
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


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--json', action='store_true', help='one JSON object per line')
  p.add_argument('--batch-size', type=int, default=32)
  p.add_argument('--group-images', type=int, default=8)
  p.add_argument('--dtypes', type=_csv, default=['float32', 'bfloat16'])
  p.add_argument('--dispatch', default='indices')
  p.add_argument('--repeats', type=int, default=5)
  args = p.parse_args(argv)
  if args.group_images < 1 or args.batch_size % args.group_images:
    raise ValueError(f'--group-images={args.group_images} must divide --batch-size='
                     f'{args.batch_size}.')
  for dt in args.dtypes:
    if dt not in ('float32', 'bfloat16'):
      raise ValueError(f'--dtypes: {dt!r} is not a precision policy; use float32,bfloat16.')
  if args.repeats < 1:
    raise ValueError(f'--repeats={args.repeats} must be >= 1.')
  return args


def main(argv):
  args = parse_args(argv)
  configs = [(m, dt) for dt in args.dtypes for m in ('vmoe', 'dense')]
  state, flops = {}, {}
  for c in configs:
    # Validates the dispatcher name etc. before compiling.
    compiled, state[c] = make_step(*c, args.dispatch, args.group_images, args.batch_size)
    flops[c] = compiled.cost_analysis().get('flops', float('nan'))
    state[c] = (compiled, state[c])
  times = {c: [] for c in configs}
  for r in range(args.repeats + 1):  # Round 0 warms up.
    for c in (configs if r % 2 == 0 else configs[::-1]):
      compiled, (params, opt_state, images, labels, key) = state[c]
      t0 = time.perf_counter()
      params, opt_state, loss = compiled(params, opt_state, images, labels, key)
      jax.block_until_ready(loss)
      if r:
        times[c].append(time.perf_counter() - t0)
      state[c] = (compiled, (params, opt_state, images, labels, key))
  rows = []
  for m, dt in configs:
    t = times[(m, dt)]
    dense = times[('dense', dt)]
    rows.append(dict(model=m, dtype=dt, batch_size=args.batch_size,
                     dispatch=args.dispatch if m == 'vmoe' else None,
                     seconds=statistics.median(t),
                     images_per_s=args.batch_size / statistics.median(t),
                     ratio_to_dense=statistics.median(d / v for d, v in zip(dense, t)),
                     gflops_per_image=flops[(m, dt)] / args.batch_size / 1e9))
  if args.json:
    for r in rows:
      print(json.dumps(r))
    return
  print(f'{jax.devices()[0].device_kind}: train step (fwd+bwd+Adam), batch '
        f'{args.batch_size}, {IMAGE}px /{PATCH} ({TOKENS} tokens), width {WIDTH}, {LAYERS} '
        f'blocks; V-MoE: MoE in {MOE_LAYERS}, E {E}, K {K}, cf {CF}, groups of '
        f'{args.group_images} images, {args.dispatch}; dense: MLP {DENSE_MLP}; median of '
        f'{args.repeats}')
  print('| model | dtype | step | images/s | / dense images/s | GFLOPs/image (XLA) |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['model']} | {r['dtype']} | {r['seconds']:.2f} s | {r['images_per_s']:.1f} "
          f"| {r['ratio_to_dense']:.2f}x | {r['gflops_per_image']:.2f} |")


if __name__ == '__main__':
  main(sys.argv[1:])
