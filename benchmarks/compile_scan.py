r"""Compile time of a V-MoE train step at 12 and 48 blocks, with and without scan.

MoE in every other block (the paper's 'every 2'), train mode (routing noise, dropout),
forward + backward: jax.jit(jax.grad(loss)).lower(abstract params, abstract images)
.compile(), so nothing is allocated and the model's width hardly matters; the structure
(blocks, MoE layers, routing) is the real one.

  python benchmarks/compile_scan.py [--layers 12,48] [--repeats 3] [--scan true,false]
      [--remat none] [--json]

After a warm-up compile (one-time set-up costs), each configuration is lowered and
compiled --repeats times (caches cleared in between), round-robin so that load from other
processes hits all alike; the table gives the median wall time and CPU time (all threads)
of lower + compile, and their ratios to the first row (12 blocks, scanned). On a shared
machine CPU time is the steadier measure: wall time also counts the waits for a core.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from vmoe.configs import common
from vmoe.nn import models


def model_config(num_layers: int, scan: bool, remat: str) -> dict:
  return dict(num_classes=10, patch_size=(8, 8), hidden_size=64, encoder=dict(
      num_layers=num_layers, mlp_dim=128, num_heads=4, dropout_rate=0.1, scan=scan,
      remat=remat, moe=dict(
          layers=common.every_n(2, num_layers), num_experts=8, group_size=17 * 4,
          router=dict(num_selected_experts=2, noise_std=1.0,
                      dispatcher=dict(name='indices', capacity_factor=1.05)))))


def compile_seconds(num_layers: int, scan: bool, remat: str) -> tuple[float, float]:
  """(wall, CPU) seconds to lower and compile the train step's gradient."""
  model = models.build(models.resolve(model_config(num_layers, scan, remat),
                                      image_size=(32, 32)))
  images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x)['params'], images)

  def loss(p, x):
    logits, metrics = model.apply({'params': p}, x, train=True, rngs={
        'dropout': jax.random.PRNGKey(0), 'gating': jax.random.PRNGKey(1)})
    return jnp.mean(logits ** 2) + jnp.mean(metrics['auxiliary_loss'])

  jax.clear_caches()
  wall, cpu = time.perf_counter(), time.process_time()
  jax.jit(jax.grad(loss)).lower(params, images).compile()
  return time.perf_counter() - wall, time.process_time() - cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', default='12,48')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--remat', default='none')
  parser.add_argument('--scan', default='true,false', help='which of scan=true/false to time')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  modes = [m.strip().lower() == 'true' for m in args.scan.split(',')]
  configs = [(n, s) for n in map(int, args.layers.split(',')) for s in modes]
  times = {c: [] for c in configs}
  compile_seconds(2, False, args.remat)  # Warm-up: JAX's and XLA's one-time set-up costs.
  for r in range(args.repeats):
    for c in (configs if r % 2 == 0 else configs[::-1]):
      times[c].append(compile_seconds(*c, args.remat))
  med = {c: tuple(statistics.median(t[i] for t in ts) for i in (0, 1))
         for c, ts in times.items()}
  base = med[configs[0]]  # Ratios are to the first row: by default 12 blocks, scanned.
  if not args.json:
    print(f'{"blocks":>6} {"scan":>5} {"wall s":>8} {"CPU s":>8} {"wall / row 1":>13} '
          f'{"CPU / row 1":>12}')
  for (n, s), (w, c) in med.items():
    row = dict(blocks=n, scan=s, remat=args.remat, wall_seconds=w, cpu_seconds=c,
               wall_ratio=w / base[0], cpu_ratio=c / base[1])
    print(json.dumps(row) if args.json else
          f'{n:>6} {str(s):>5} {w:>8.2f} {c:>8.2f} {w / base[0]:>13.2f} {c / base[1]:>12.2f}',
          flush=True)


if __name__ == '__main__':
  main()
