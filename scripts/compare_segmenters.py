r"""Train digit_scenes segmenters (dense ViT, V-MoE, shared-expert, ...) with several seeds;
analyse their routing; write docs/segmentation.md's results, .json and .png.

  python scripts/compare_segmenters.py --out_dir=/tmp/vmoe_seg_study [--seeds=0,1,2]
      [--train_steps=N] [--variants=dense,top_k,shared_expert] [--moe_layers=odd|last]
      [--doc=docs/segmentation.md] [--extra='--config.KEY=VALUE ...']

Each run is `python -m vmoe.main --config=configs/digits_seg.py:router=VARIANT,
moe_layers=M[,steps=N] --config.seed=S EXTRA` in OUT_DIR/{VARIANT}_{M}_seed{S}, kept:
a run with a final_metrics.json is not run again, so a killed study resumes where it
stopped. --train_steps: default the config's; --extra: more --config.KEY=VALUE flags for
vmoe.main and vmoe.evaluate alike (e.g. a tiny model for a test), except that a variant
without MoE layers (dense) is given none of its --config.model.encoder.moe.layers. The
seed-0 run of every variant with routed MoE layers (neither dense nor Soft MoE) gets
`python -m vmoe.evaluate --analyze` (skipped once its eval/routing.json exists), the first
of them also `--predictions=8`.

Writes, beside --doc (its directory D and name without extension P): the section between
`<!-- results -->` and `<!-- end -->` of --doc (the command, the tables and the plots;
the file is created if missing, the rest is kept), P.json (every number: per variant and
seed the test metrics, step time and size; the routing reports), P.png (test mIoU, mean
and std over seeds, per variant), D/img/segmentation_routing_{top_k,shared_expert}.png
(their routing.png) and D/img/segmentation_predictions.png.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vmoe.configs import common  # noqa: E402  # pylint: disable=wrong-import-position
from vmoe.evaluate import flops  # noqa: E402  # pylint: disable=wrong-import-position
from vmoe.nn import models  # noqa: E402  # pylint: disable=wrong-import-position
from vmoe.utils import files  # noqa: E402  # pylint: disable=wrong-import-position

CONFIG = 'configs/digits_seg.py'
IMAGE_SIZE = (32, 32)  # digit_scenes canvases.
VARIANTS = ('dense', 'top_k', 'shared_expert')
PICTURED = ('top_k', 'shared_expert')  # Variants whose routing.png the doc shows.
NUM_PREDICTIONS = 8
MOE_LAYERS_FLAG = '--config.model.encoder.moe.layers='
MARKER, END = '<!-- results -->', '<!-- end -->'
TITLE = '# Semantic segmentation\n'
METRICS = ('miou', 'pixel_accuracy', 'mean_accuracy', 'loss')


def run(cmd):
  print('+', shlex.join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def config_flags(name, args):
  """The config flags of variant `name`, the same for training and evaluation. Loading
  its config here checks the variant and --moe_layers before anything trains."""
  arg = f'router={name},moe_layers={args.moe_layers}'
  if args.train_steps:
    arg += f',steps={args.train_steps}'
  extra = shlex.split(args.extra)
  config = common.load_config(os.path.join(ROOT, f'{CONFIG}:{arg}'))
  if not config.model.encoder.moe.layers:
    # A tiny model's --extra places MoE layers for the routed variants; the dense
    # baseline would become one of them.
    extra = [f for f in extra if not f.startswith(MOE_LAYERS_FLAG)]
  return [f'--config={CONFIG}:{arg}', *extra]


def train(name, seed, flags, out_dir, moe_layers):
  """-> its final_metrics.json, trained first unless it exists."""
  workdir = os.path.join(out_dir, f'{name}_{moe_layers}_seed{seed}')
  path = os.path.join(workdir, 'final_metrics.json')
  if not os.path.exists(path):
    run([sys.executable, '-m', 'vmoe.main', *flags, f'--workdir={workdir}',
         f'--config.seed={seed}'])
  with open(path) as f:
    return {'seed': seed, 'workdir': workdir, **json.load(f)}


def model_of(workdir):
  """The ModelSpec a run trained (its config.json: --extra included), on 32x32 images."""
  with open(os.path.join(workdir, 'config.json')) as f:
    return models.resolve(json.load(f)['model'], image_size=IMAGE_SIZE)


def routed(spec):
  """Whether the model sends tokens to experts (what vmoe.evaluate --analyze counts)."""
  return bool(spec.encoder.moe_layers) and spec.encoder.moe.slots != 'soft'


def analyze(workdir, flags, predictions):
  """-> eval/routing.json (and predictions.png if asked), run first where missing."""
  out = os.path.join(workdir, 'eval')
  report = os.path.join(out, 'routing.json')
  todo = [] if os.path.exists(report) else ['--analyze']
  show = predictions and not os.path.exists(os.path.join(out, 'predictions.png'))
  if todo or show:
    # No test-time sweep: it is not part of this study and costs far more.
    run([sys.executable, '-m', 'vmoe.evaluate', *flags, f'--workdir={workdir}', '--sweep=',
         *todo, f'--predictions={NUM_PREDICTIONS if show else 0}'])
  with open(report) as f:
    return json.load(f)


def copy(src, dst):
  with files.atomic_path(dst) as tmp:
    shutil.copyfile(src, tmp)


def summarise(runs, spec):
  """Per metric the mean, std and per-seed values over the runs of one variant."""
  row = {}
  for key in METRICS:
    values = [r['test'][key] for r in runs]
    row[key] = {'mean': float(np.mean(values)), 'std': float(np.std(values)),
                'per_seed': values}
  return {**row,
          'train_seconds_per_step': float(np.nanmedian(
              [r.get('train_seconds_per_step', np.nan) for r in runs])),
          'num_params': runs[0]['num_params'],
          'gflops_per_image': flops.flops_per_image(spec) / 1e9,
          'runs': runs}


def study(args, seeds, variants):
  """Trains and analyses every variant -> {variant: summarise(...) [+ 'routing']}."""
  flags = {name: config_flags(name, args) for name in variants}
  img = os.path.join(os.path.dirname(args.doc), 'img')
  rows, predicted = {}, False
  for name in variants:
    runs = [train(name, s, flags[name], args.out_dir, args.moe_layers) for s in seeds]
    spec = model_of(runs[0]['workdir'])
    rows[name] = summarise(runs, spec)
    first = next((r['workdir'] for r in runs if r['seed'] == 0), None)
    if first is None or not routed(spec):
      continue
    rows[name]['routing'] = analyze(first, flags[name], not predicted)
    eval_dir = os.path.join(first, 'eval')
    if name in PICTURED:
      copy(os.path.join(eval_dir, 'routing.png'),
           os.path.join(img, f'segmentation_routing_{name}.png'))
    if not predicted:
      copy(os.path.join(eval_dir, 'predictions.png'),
           os.path.join(img, 'segmentation_predictions.png'))
      predicted = True
  return rows


def percent(stat):
  return f'{100 * stat["mean"]:.2f} ± {100 * stat["std"]:.2f}'


def results_table(rows):
  lines = ['| variant | test mIoU (%, mean ± std) | per seed | pixel accuracy (%) | '
           'mean accuracy (%) | train s/step | params | GFLOPs / image |',
           '|---|---|---|---|---|---|---|---|']
  for name, r in rows.items():
    seeds = ', '.join(f'{100 * v:.1f}' for v in r['miou']['per_seed'])
    lines.append(f'| {name} | {percent(r["miou"])} | {seeds} | '
                 f'{percent(r["pixel_accuracy"])} | {percent(r["mean_accuracy"])} | '
                 f'{r["train_seconds_per_step"]:.3g} | {r["num_params"]:,} | '
                 f'{r["gflops_per_image"]:.4f} |')
  return '\n'.join(lines)


def routing_table(rows):
  """One line per analysed variant and MoE layer, from its routing.json."""
  lines = ['| variant | layer | specialisation | mutual information (nats) | '
           'load entropy | dropped (%) | recommendation |',
           '|---|---|---|---|---|---|---|']
  for name, r in rows.items():
    report = r.get('routing')
    if report is None:
      continue
    keep = report['recommendation']['keep_moe']
    for layer, s in report['layers'].items():
      lines.append(f'| {name} | {layer} | {s["specialisation"]:.3f} | '
                   f'{s["mutual_information"]:.3f} | {s["load_entropy"]:.3f} | '
                   f'{100 * s["dropped_fraction"]:.1f} | '
                   f'{"keep MoE" if layer in keep else "make dense"} |')
  return '\n'.join(lines)


def plot(rows, title, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(rows)
  fig, ax = plt.subplots(figsize=(1.5 * len(names) + 2, 3.5))
  bars = ax.bar(names, [100 * rows[n]['miou']['mean'] for n in names],
                yerr=[100 * rows[n]['miou']['std'] for n in names], capsize=4,
                color='tab:green')
  ax.bar_label(bars, fmt='%.1f', label_type='center', color='white', fontsize=8)
  ax.set_ylabel('test mIoU (%)')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  files.save_figure(fig, path)


def steps_of(rows):
  """The runs' train steps: one number unless a resumed study mixed runs of others."""
  return ', '.join(map(str, sorted({r['step'] for v in rows.values() for r in v['runs']})))


def section(rows, seeds, args, png):
  """The doc's results: the command, the tables and the images (paths relative to it)."""
  any_run = next(iter(rows.values()))['runs'][0]
  link = lambda path: os.path.relpath(path, os.path.dirname(args.doc))
  text = [f'Command: `python scripts/compare_segmenters.py {shlex.join(sys.argv[1:])}`',
          f'digit_scenes test split ({any_run["test"]["num_examples"]} canvases), seeds '
          f'{", ".join(map(str, seeds))}; {steps_of(rows)} train steps; MoE layers '
          f'`{args.moe_layers}`. Mean ± std over seeds; train s/step: median over seeds; '
          'GFLOPs: forward, active, per 32x32 image (vmoe.evaluate.flops).',
          results_table(rows), f'![test mIoU per variant]({link(png)})']
  analysed = [n for n, r in rows.items() if 'routing' in r]
  if analysed:
    threshold = rows[analysed[0]]['routing']['recommendation']['threshold']
    text += ['Routing of the seed-0 models over the test split (`python -m vmoe.evaluate '
             "--analyze`; a token's class: the majority pixel class of its patch). "
             'Specialisation: mutual information between class and expert over the class '
             'entropy (0: the experts ignore the class, 1: the expert determines it); load '
             'entropy: of the experts\' loads, 1 = balanced; dropped: tokens no expert '
             f'took. Layers below {threshold} x the best layer\'s specialisation of the '
             'variant are recommended dense.', routing_table(rows)]
  img = os.path.join(os.path.dirname(args.doc), 'img')
  pictures = [n for n in PICTURED if n in analysed]
  text += [f'![{n} routing]({link(os.path.join(img, f"segmentation_routing_{n}.png"))})'
           for n in pictures]
  if analysed:
    text.append(f'![predictions of {analysed[0]}, seed 0]'
                f'({link(os.path.join(img, "segmentation_predictions.png"))})')
  return '\n\n'.join(text)


def read_doc(path):
  """The doc's text (a title only if there is none yet), checked to have room for the
  section: an open marker would leave no end to what is replaced."""
  if not os.path.exists(path):
    return TITLE
  with open(path) as f:
    text = f.read()
  if MARKER in text and END not in text.split(MARKER, 1)[1]:
    raise SystemExit(f'{path} has {MARKER} but no {END} after it; add one where the '
                     'results end.')
  return text


def write(rows, seeds, args):
  stem = os.path.splitext(args.doc)[0]
  title = (f'digit_scenes, {len(seeds)} seeds, {steps_of(rows)} steps, MoE layers '
           f'{args.moe_layers}')
  plot(rows, title, f'{stem}.png')
  files.write_json(f'{stem}.json', rows)
  body = section(rows, seeds, args, f'{stem}.png')
  before, marker, after = read_doc(args.doc).partition(MARKER)
  rest = after.split(END, 1)[1] if marker else '\n'
  if not marker:
    before = before.rstrip('\n') + '\n\n'
  files.write_text(args.doc, f'{before}{MARKER}\n\n{body}\n\n{END}{rest}')
  print(results_table(rows), routing_table(rows), sep='\n\n')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0])
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--train_steps', type=int, default=None,
                      help="Default: the config's.")
  parser.add_argument('--variants', default=','.join(VARIANTS),
                      help='Router short names of vmoe.configs.common.ROUTER_VARIANTS.')
  parser.add_argument('--moe_layers', default='odd', help='odd | last (the config\'s).')
  parser.add_argument('--doc', default=os.path.join(ROOT, 'docs', 'segmentation.md'))
  parser.add_argument('--extra', default='',
                      help='More --config.KEY=VALUE flags, e.g. for a tiny test model.')
  args = parser.parse_args()
  args.doc = os.path.abspath(args.doc)
  seeds = [int(s) for s in args.seeds.split(',')]
  variants = args.variants.split(',')
  unknown = sorted(set(variants) - set(common.ROUTER_VARIANTS))
  if unknown:
    raise SystemExit(f'Unknown variants {unknown}; valid: {sorted(common.ROUTER_VARIANTS)}.')
  read_doc(args.doc)  # A doc that cannot take the section fails now, not after training.
  write(study(args, seeds, variants), seeds, args)


if __name__ == '__main__':
  main()
