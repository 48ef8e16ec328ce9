"""Test-time sweeps: the same params evaluated under every combination of config values.

Each variant is the config with some keys changed (sweep_spec.parse), e.g. a lower
capacity factor, fewer experts per token or batch prioritized routing. Every variant is
validated before the first one compiles; each compiles once and is evaluated on one
eval set. Per variant: accuracy, loss, the fraction of tokens each MoE layer dropped,
forward GFLOPs per image at the variant's actual capacity, images/s and compile time.
"""
import csv
import json
import os
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from vmoe.data import pipeline
from vmoe.evaluate import flops
from vmoe.evaluate import sweep_spec
from vmoe.nn import models
from vmoe.train import config_checks
from vmoe.train import evaluator
from vmoe.train import losses
from vmoe.parallel import mesh as mesh_lib

P = jax.sharding.PartitionSpec


def variant_config(config: ml_collections.ConfigDict,
                   variant: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the variant's dotted keys set."""
  c = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in variant.items():
    parent, _, leaf = dotted.rpartition('.')
    node = c
    for part in filter(None, parent.split('.')):
      node = node[part]
    node[leaf] = value
  return c


def check_variants(config, variants: Sequence[Mapping[str, Any]], eval_set: str,
                   image_size: Optional[Sequence[int]] = None) -> list[dict]:
  """Model configs of all variants; one ValueError naming the variant if any is bad.
  With image_size, also checks each against the input (patches, groups per device)."""
  out = []
  for v in variants:
    try:
      c = variant_config(config, v)
      model_config = models.validate(config_checks.eval_model_config(c.to_dict()))
      if image_size is not None:
        models.check_input(model_config,
                           c.dataset[eval_set].batch_size // jax.device_count(), image_size)
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f'Sweep variant {describe(v)} is not a valid config: {e}') from e
    out.append(model_config)
  return out


def describe(variant: Mapping[str, Any]) -> str:
  return ', '.join(f'{sweep_spec.short_name(k)}={v}' for k, v in variant.items())


def run(config, params, variants: Sequence[Mapping[str, Any]], *,
        eval_set: str) -> list[dict]:
  """Evaluates `params` under every variant -> one row (a flat dict) per variant.

  Prints a line per variant with the time left (from the mean time per variant)."""
  if eval_set not in config.dataset or eval_set == 'train':
    raise ValueError(f'--eval_set={eval_set!r} is not an eval set of the config; valid: '
                     f'{[k for k in config.dataset if k != "train"]}.')
  iterable = pipeline.make_eval_iterable(config.dataset[eval_set])
  first = next(iter(iterable))
  image_size = first['image'].shape[1:3]
  model_configs = check_variants(config, variants, eval_set, image_size)
  mesh = mesh_lib.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, P())
  batch_sharding = jax.sharding.NamedSharding(mesh, P('data'))
  params = jax.device_put(params, replicated)
  loss_fn = losses.LOSSES[config.loss.name]
  rows, start = [], time.perf_counter()
  for i, (variant, model_config) in enumerate(zip(variants, model_configs)):
    step = evaluator.make_eval_step(
        models.build_model(model_config), loss_fn, params_sharding=replicated,
        batch_sharding=batch_sharding, routing_stats=True)
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      jax.block_until_ready(step(params, mesh_lib.global_batch(first, batch_sharding)))
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      result = evaluator.evaluate(
          step, params, (mesh_lib.global_batch(b, batch_sharding) for b in iterable),
          num_examples=iterable.num_examples)
      seconds = time.perf_counter() - t0
    dropped = {k: v for k, v in result.items() if k.startswith('dropped/')}
    row = {**{sweep_spec.short_name(k): v for k, v in variant.items()},
           'accuracy': result['prec@1'], 'loss': result['loss'],
           'dropped_mean': float(np.mean(list(dropped.values()))) if dropped else 0.0,
           **dropped,
           'gflops_per_image': flops.flops_per_image(model_config, image_size) / 1e9,
           'images_per_s': result['num_examples'] / seconds,
           'compile_s': compile_s}
    rows.append(row)
    logging.info('Sweep %d/%d %s: %s', i + 1, len(variants), describe(variant), row)
    eta = (time.perf_counter() - start) / (i + 1) * (len(variants) - i - 1)
    print(f'[{i + 1}/{len(variants)}] {describe(variant)}: accuracy {row["accuracy"]:.4f}, '
          f'dropped {row["dropped_mean"]:.3f}, {row["gflops_per_image"]:.4g} GFLOPs/image, '
          f'{row["images_per_s"]:.0f} images/s; ETA {eta:.0f} s', flush=True)
  return rows


def write(rows: Sequence[dict], out_dir: str, *, title: str = '') -> dict[str, str]:
  """sweep.csv, sweep.json and sweep.png in out_dir (each written atomically)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f'sweep.{k}') for k in ('csv', 'json', 'png')}
  columns = list(dict.fromkeys(k for r in rows for k in r))
  tmp = paths['csv'] + '.tmp'
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, columns)
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, paths['csv'])
  tmp = paths['json'] + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(rows, f, indent=1)
  os.replace(tmp, paths['json'])
  plot(rows, paths['png'], title=title)
  return paths


def _metric_keys(rows):
  return {'accuracy', 'loss', 'dropped_mean', 'gflops_per_image', 'images_per_s',
          'compile_s'} | {k for r in rows for k in r if k.startswith('dropped/')}


def plot(rows: Sequence[dict], path: str, *, title: str = ''):
  """Accuracy against the first swept key (capacity_factor if swept) and against
  GFLOPs per image; one line per setting of the other swept keys."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  swept = [k for k in rows[0] if k not in _metric_keys(rows)]
  x_key = 'capacity_factor' if 'capacity_factor' in swept else swept[0]
  others = [k for k in swept if k != x_key]
  lines = {}
  for r in rows:
    lines.setdefault(tuple((k, r[k]) for k in others), []).append(r)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for label, rs in lines.items():
    name = ', '.join(f'{k}={v}' for k, v in label) or 'accuracy'
    numeric = all(isinstance(r[x_key], (int, float)) for r in rs)
    rs = sorted(rs, key=lambda r: r[x_key]) if numeric else rs
    xs = [r[x_key] if numeric else str(r[x_key]) for r in rs]
    axes[0].plot(xs, [100 * r['accuracy'] for r in rs], 'o-', label=name)
    axes[1].plot([r['gflops_per_image'] for r in rs], [100 * r['accuracy'] for r in rs],
                 'o-', label=name)
  axes[0].set_xlabel(x_key)
  axes[1].set_xlabel('forward GFLOPs per image (at the actual capacity)')
  for ax in axes:
    ax.set_ylabel('accuracy (%)')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def table(rows: Sequence[dict]) -> str:
  """Markdown table of the rows (the swept keys, then the metrics)."""
  keys = list(rows[0])
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  lines += ['| ' + ' | '.join(fmt(r.get(k, '')) for k in keys) + ' |' for r in rows]
  return '\n'.join(lines)
