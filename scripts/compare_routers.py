r"""Train every digits router variant with several seeds; write docs/routers.md + PNG.

  python scripts/compare_routers.py --out_dir=/tmp/vmoe_routers [--seeds=0,1,2]
      [--train_steps=500] [--variants=dense,top_k,...] [--capacity_factor=F]
      [--section=results]

--capacity_factor: configs/digits.py's capacity_factor (default: its 1.05); --section:
the marker of docs/routers.md whose table is replaced ('<!-- results -->' by default; the
balancing study is `--section=balancing --capacity_factor=4 --variants=top_k,
top_k_zloss,top_k_bias,top_k_unbalanced`: with room for every choice, the experts' loads
are the router's own, not capped by the capacity; the Mobile V-MoE study is
`--section=per_image --variants=dense,top_k,per_image,per_image_superclass,
per_image_layer,per_image_layer_superclass`; the E3 study `--section=e3
--variants=dense,top_1,top_k,e3`).

Each run is `python -m vmoe.main --config=configs/digits.py:router=NAME` in its own
workdir (kept, so a killed comparison resumes where it stopped). The `*_superclass`
variants use super-classes derived by `python -m vmoe.tools.superclasses` from the test-set
confusion of the dense run of the same seed: which classes get confused is test
information, a mild leak accepted because digits has no validation split. Results:
docs/routers.md (mean and std of test accuracy, negative log-likelihood and expected
calibration error (15 bins), step time, parameters, active forward
GFLOPs per image, the busiest expert's load over the last report window of training as a
multiple of the mean load 1/E) and docs/routers{,_SECTION}.png.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vmoe.configs import common  # noqa: E402  # pylint: disable=wrong-import-position
from vmoe.evaluate import flops  # noqa: E402  # pylint: disable=wrong-import-position
from vmoe.nn import models  # noqa: E402  # pylint: disable=wrong-import-position
from vmoe.utils import files  # noqa: E402  # pylint: disable=wrong-import-position

VARIANTS = ('dense', 'top_k', 'top_k_bpr', 'top_k_zloss', 'top_k_bias', 'top_k_unbalanced',
            'expert_choice', 'soft', 'sinkhorn_tc', 'sinkhorn_ec', 'sparse_ec', 'ksparse_ec',
            'ksparse_tc', 'per_image', 'per_image_superclass', 'per_image_layer',
            'per_image_layer_superclass', 'shared_expert', 'top_1', 'e3')
NUM_EXPERTS = 8  # configs/digits.py's default: one super-class per expert.


def run(cmd):
  print('+', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def train(name, seed, steps, out_dir, arg=''):
  workdir = os.path.join(out_dir, f'{name}{arg.replace(",", "_").replace("=", "")}_seed{seed}'
                         if 'capacity_factor' in arg else f'{name}_seed{seed}')
  cmd = [sys.executable, '-m', 'vmoe.main', f'--config=configs/digits.py:router={name}{arg}',
         f'--workdir={workdir}', f'--config.seed={seed}', f'--config.train_steps={steps}']
  if not os.path.exists(os.path.join(workdir, 'final_metrics.json')):
    run(cmd)
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    return workdir, json.load(f)


def superclasses_of(seed, steps, out_dir):
  """',superclasses=PATH' from the dense run of the same seed (trained if needed)."""
  dense_dir, _ = train('dense', seed, steps, out_dir)
  path = os.path.join(dense_dir, 'superclasses.json')
  if not os.path.exists(path):
    run([sys.executable, '-m', 'vmoe.tools.superclasses',
         '--config=configs/digits.py:router=dense', f'--workdir={dense_dir}',
         f'--num_experts={NUM_EXPERTS}', '--dataset=test'])
  return f',superclasses={path}'


def describe(name, arg=''):
  config = common.load_config(f'{ROOT}/configs/digits.py:router={name}{arg}')
  return flops.flops_per_image(models.resolve(config.model, image_size=(8, 8))) / 1e9


def busiest_load(metrics):
  """The busiest expert's share of the routed tokens x E (1: perfectly balanced), the
  largest over MoE layers, from the train metrics of the last report window; None for a
  model without MoE."""
  loads = [v for k, v in metrics.get('train', {}).items() if k.endswith('/expert_load_max')]
  return NUM_EXPERTS * max(loads) if loads else None


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--train_steps', type=int, default=500)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--doc', default=os.path.join(ROOT, 'docs', 'routers.md'))
  parser.add_argument('--capacity_factor', type=float, default=None)
  parser.add_argument('--section', default='results')
  args = parser.parse_args()
  cf = f',capacity_factor={args.capacity_factor}' if args.capacity_factor else ''
  seeds = [int(s) for s in args.seeds.split(',')]
  variants = args.variants.split(',')
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise SystemExit(f'Unknown variants {unknown}; valid: {VARIANTS}.')
  rows = {}
  for name in variants:
    accs, nlls, eces, step_s, params, loads = [], [], [], [], None, []
    for seed in seeds:
      arg = (superclasses_of(seed, args.train_steps, args.out_dir)
             if name.endswith('_superclass') else '')
      _, m = train(name, seed, args.train_steps, args.out_dir, arg + cf)
      accs.append(m['test']['prec@1'])
      nlls.append(m['test']['loss'])
      eces.append(m['test']['ece'])
      step_s.append(m.get('train_seconds_per_step', float('nan')))
      params = m.get('num_params', params)
      loads.append(busiest_load(m))
    rows[name] = dict(mean=float(np.mean(accs)), std=float(np.std(accs)), accs=accs,
                      nll=float(np.mean(nlls)), nll_std=float(np.std(nlls)),
                      ece=float(np.mean(eces)), ece_std=float(np.std(eces)),
                      step_ms=1e3 * float(np.nanmedian(step_s)), params=params,
                      gflops=describe(name, cf), loads=loads)
  write_doc(rows, seeds, args)


def write_doc(rows, seeds, args):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(rows)
  fig, ax = plt.subplots(figsize=(9, 4))
  ax.bar(names, [100 * rows[n]['mean'] for n in names],
         yerr=[100 * rows[n]['std'] for n in names], capsize=3, color='tab:blue')
  lo = min(100 * (rows[n]['mean'] - rows[n]['std']) for n in names)
  ax.set_ylim(max(0, lo - 2), 100)
  ax.set_ylabel('test prec@1 (%)')
  ax.set_title(f'digits, {len(seeds)} seeds, {args.train_steps} steps')
  plt.setp(ax.get_xticklabels(), rotation=30, ha='right')
  fig.tight_layout()
  suffix = '' if args.section == 'results' else f'_{args.section}'
  png = os.path.splitext(args.doc)[0] + suffix + '.png'
  files.save_figure(fig, png)
  lines = ['| variant | test prec@1 (mean ± std) | per seed | test NLL | test ECE | '
           'step time (ms) | params | GFLOPs / image | busiest expert (x 1/E), per seed |',
           '|---|---|---|---|---|---|---|---|---|']
  for n in names:
    r = rows[n]
    loads = ('-' if None in r['loads']
             else ', '.join(f'{v:.2f}' for v in r['loads']))
    lines.append(f'| {n} | {100 * r["mean"]:.2f} ± {100 * r["std"]:.2f} | '
                 + ', '.join(f'{100 * a:.1f}' for a in r['accs'])
                 + f' | {r["nll"]:.4f} ± {r["nll_std"]:.4f}'
                 + f' | {r["ece"]:.4f} ± {r["ece_std"]:.4f}'
                 + f' | {r["step_ms"]:.1f} | {r["params"]} | {r["gflops"]:.5f} | {loads} |')
  table = '\n'.join(lines)
  print(table)
  files.write_json(os.path.splitext(args.doc)[0] + suffix + '.json', rows)
  replace_section(args, seeds, table, os.path.basename(png))


def replace_section(args, seeds, table, png):
  """docs/routers.md with the text between <!-- SECTION --> and the next marker (or the
  end) replaced by the command, the table and the plot."""
  marker, end = f'<!-- {args.section} -->', '<!-- end -->'
  text = open(args.doc).read() if os.path.exists(args.doc) else '# Routers\n'
  if marker not in text:
    text += f'\n{marker}\n{end}\n'
  head, rest = text.split(marker, 1)
  tail = rest.split(end, 1)[1] if end in rest else ''
  extra = (f' --capacity_factor={args.capacity_factor}' if args.capacity_factor else '')
  variants = '' if args.variants == ','.join(VARIANTS) else f' --variants={args.variants}'
  section = '' if args.section == 'results' else f' --section={args.section}'
  files.write_text(args.doc, f'{head}{marker}\n\nCommand: `python scripts/compare_routers.py '
                   f'--seeds={",".join(map(str, seeds))} --train_steps={args.train_steps}'
                   f'{extra}{variants}{section}`\n\n{table}\n\n![routers]({png})\n\n'
                   f'{end}{tail}')


if __name__ == '__main__':
  main()
