"""Test-time sweeps: the same params evaluated under every combination of config values.

Each variant is the config with some keys changed (sweep_spec.parse), e.g. a lower
capacity factor, fewer experts per token or batch prioritized routing. Every variant is
validated before the first one compiles; each compiles once and is evaluated on one
eval set. Per variant: a classifier's accuracy, loss and ECE, or a segmenter's mIoU, pixel
accuracy, mean (per-class) accuracy and loss; the fraction of tokens each MoE layer
dropped, forward GFLOPs per image at the variant's actual capacity, images/s and compile
time.
"""
import contextlib
import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from vmoe.data import pipeline
from vmoe.evaluate import flops
from vmoe.evaluate import sweep_spec
from vmoe.nn import models
from vmoe.parallel import mesh as mesh_lib
from vmoe.train import config as config_lib
from vmoe.train import evaluator
from vmoe.train import losses
from vmoe.utils import console
from vmoe.utils import dotted
from vmoe.utils import files

P = jax.sharding.PartitionSpec


@dataclasses.dataclass(frozen=True)
class Variant:
  """One variant of a sweep: its changed keys and its eval set, resolved (the model for
  its images) with the iterable to evaluate it on and the run's loss."""
  values: Mapping[str, Any]
  data: config_lib.Data
  iterable: Any  # pipeline.EvalIterable; variants with the same eval config share one.
  loss: losses.AnyLoss


def resolve(config, values: Sequence[Mapping[str, Any]], *, eval_set: str,
            train_shapes: Mapping[str, tuple[int, ...]]) -> list[Variant]:
  """Every variant, resolved and checked against its eval set's images before the first
  one compiles; one ValueError naming the variant if any is bad."""
  iterables, out = {}, []
  name = f'dataset.{eval_set}'
  for v in values:
    try:
      run = config_lib.resolve(dotted.with_values(config, v),
                               num_devices=jax.device_count(),
                               num_processes=jax.process_count())
      cfg = run.entry(name).config
      if cfg not in iterables:
        iterables[cfg] = pipeline.make_eval_iterable(cfg)
      run = config_lib.with_inputs(run, {'dataset.train': train_shapes,
                                         name: iterables[cfg].shapes()})
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f'Sweep variant {describe(v)} is not a valid config: {e}') from e
    out.append(Variant(v, run.entry(name), iterables[cfg], run.loss))
  return out


def describe(variant: Mapping[str, Any]) -> str:
  return ', '.join(f'{sweep_spec.short_name(k)}={v}' for k, v in variant.items())


def run(config, params, variants: Sequence[Variant]) -> list[dict]:
  """Evaluates `params` under every variant -> one row (a flat dict) per variant, with a
  progress line (variants done, time left)."""
  mesh = mesh_lib.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, P())
  batch_sharding = jax.sharding.NamedSharding(mesh, P('data'))
  params = jax.device_put(params, replicated)
  rows, progress = [], console.Progress(len(variants), desc='sweep', unit='variant')
  for v in variants:
    step = evaluator.make_eval_step(
        models.build(v.data.model), v.loss, params_sharding=replicated,
        batch_sharding=batch_sharding, routing_stats=True)
    # One pass over the whole eval set (a cached one is filled, not cut short); the
    # compilation it triggers is timed apart.
    with jax.set_mesh(mesh), _compile_seconds() as compile_s:
      t0 = time.perf_counter()
      result = evaluator.evaluate(
          step, params, (mesh_lib.global_batch(b, batch_sharding) for b in v.iterable),
          num_examples=v.iterable.num_examples)
      seconds = time.perf_counter() - t0
    rows.append(_row(v, result, compile_s[0], seconds - compile_s[0]))
    logging.info('Sweep %s: %s', describe(v.values), rows[-1])
    progress.advance()
    name, value = evaluator.headline(result)
    console.say(f'{describe(v.values)}: {name} {value:.4f}, dropped '
                f'{rows[-1]["dropped_mean"]:.3f}, {rows[-1]["gflops_per_image"]:.4g} '
                f'GFLOPs/image, {rows[-1]["images_per_s"]:.0f} images/s')
    progress.report(**{name: value})
  progress.close()
  return rows


# The quality columns of a row, by the evaluator's headline metric: {row column: key of
# the evaluator's metrics}. The first column is the one plotted.
QUALITY = {'prec@1': {'accuracy': 'prec@1', 'loss': 'loss', 'ece': 'ece'},
           'miou': {'miou': 'miou', 'pixel_accuracy': 'pixel_accuracy',
                    'mean_accuracy': 'mean_accuracy', 'loss': 'loss'}}


def _row(v: Variant, result: Mapping[str, float], compile_s: float, seconds: float) -> dict:
  dropped = {k: r for k, r in result.items() if k.startswith('dropped/')}
  quality = QUALITY[evaluator.headline(result)[0]]
  return {**{sweep_spec.short_name(k): x for k, x in v.values.items()},
          **{column: result[key] for column, key in quality.items()},
          'dropped_mean': float(np.mean(list(dropped.values()))) if dropped else 0.0,
          **dropped,
          'gflops_per_image': flops.flops_per_image(v.data.model) / 1e9,
          'images_per_s': result['num_examples'] / seconds,
          'compile_s': compile_s}


@contextlib.contextmanager
def _compile_seconds():
  """Yields [seconds]: the time JAX spends tracing, lowering and compiling in the block
  (its '/jax/core/compile/' duration events)."""
  total = [0.0]
  listener = lambda name, secs, **_: (
      total.__setitem__(0, total[0] + secs) if name.startswith('/jax/core/compile/')
      else None)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield total
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def write(rows: Sequence[dict], out_dir: str, *, title: str = '') -> dict[str, str]:
  """sweep.csv, sweep.json and sweep.png in out_dir (each written atomically)."""
  paths = {k: os.path.join(out_dir, f'sweep.{k}') for k in ('csv', 'json', 'png')}
  files.write_csv(paths['csv'], rows)
  files.write_json(paths['json'], rows)
  plot(rows, paths['png'], title=title)
  return paths


def _metric_keys(rows):
  return ({'dropped_mean', 'gflops_per_image', 'images_per_s', 'compile_s'}
          | {k for quality in QUALITY.values() for k in quality}
          | {k for r in rows for k in r if k.startswith('dropped/')})


def _quality_key(rows) -> str:
  """The row column plotted, the first of QUALITY's: accuracy or mIoU."""
  firsts = [next(iter(quality)) for quality in QUALITY.values()]
  return next(k for k in firsts if k in rows[0])


def plot(rows: Sequence[dict], path: str, *, title: str = ''):
  """The quality (a classifier's accuracy, a segmenter's mIoU) against the first swept
  key (capacity_factor if swept) and against GFLOPs per image; one line per setting of
  the other swept keys."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  y_key = _quality_key(rows)
  swept = [k for k in rows[0] if k not in _metric_keys(rows)]
  x_key = 'capacity_factor' if 'capacity_factor' in swept else swept[0]
  others = [k for k in swept if k != x_key]
  lines = {}
  for r in rows:
    lines.setdefault(tuple((k, r[k]) for k in others), []).append(r)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for label, rs in lines.items():
    name = ', '.join(f'{k}={v}' for k, v in label) or y_key
    numeric = all(isinstance(r[x_key], (int, float)) for r in rs)
    rs = sorted(rs, key=lambda r: r[x_key]) if numeric else rs
    xs = [r[x_key] if numeric else str(r[x_key]) for r in rs]
    ys = [100 * r[y_key] for r in rs]
    axes[0].plot(xs, ys, 'o-', label=name)
    axes[1].plot([r['gflops_per_image'] for r in rs], ys, 'o-', label=name)
  axes[0].set_xlabel(x_key)
  axes[1].set_xlabel('forward GFLOPs per image (at the actual capacity)')
  for ax in axes:
    ax.set_ylabel(f'{"mIoU" if y_key == "miou" else y_key} (%)')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  files.save_figure(fig, path)


def table(rows: Sequence[dict]) -> str:
  """Markdown table of the rows (the swept keys, then the metrics)."""
  keys = list(rows[0])
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  lines += ['| ' + ' | '.join(fmt(r.get(k, '')) for k in keys) + ' |' for r in rows]
  return '\n'.join(lines)
