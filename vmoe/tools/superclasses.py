"""Super-classes for super-class-guided per-image routing (Mobile V-MoE, arXiv 2309.04354).

Classes a trained dense model confuses with each other should share an expert. From its
confusion matrix on held-out data we build a graph (edge weight = how often two classes are
mistaken for one another, both directions) and split it into E groups by spectral
clustering, one group per expert.

`confusion_matrix` and `cluster_classes` compute the table, `write_superclasses` writes the
JSON that `encoder.moe.router.superclasses` takes ({'superclass_of_class': [...], ...}) and
`plot_grouped_confusion` the PNG of the confusion matrix with classes grouped by
super-class.

  python -m vmoe.tools.superclasses --config=configs/digits.py:router=dense \
      --workdir=/tmp/digits_dense --num_experts=8 [--dataset=test] [--split=SPLIT]

reads the latest checkpoint of WORKDIR (or --checkpoint=PATH), predicts the eval set
`--dataset` of the config (its TFDS split, or --split) and writes
WORKDIR/superclasses.json and WORKDIR/superclasses.png (or --output=PATH.json). Use
held-out data: on the train split a good model confuses almost nothing.
"""
import os

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
from vmoe import cli
from vmoe.utils import console
from vmoe.utils import files


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """[num_classes, num_classes] counts, rows = true class, columns = predicted class."""
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (labels, predictions), 1)
  return m


def check_num_groups(num_classes: int, num_groups: int):
  if not 1 <= num_groups <= num_classes:
    raise ValueError(f'Cannot split {num_classes} classes into num_experts={num_groups} '
                     f'super-classes; use between 1 and {num_classes} experts.')


def cluster_classes(confusion: np.ndarray, num_groups: int, seed: int = 0) -> np.ndarray:
  """Class -> group [C] from a confusion matrix, by spectral clustering of its graph."""
  from sklearn.cluster import SpectralClustering  # pylint: disable=g-import-not-at-top
  c = confusion.shape[0]
  check_num_groups(c, num_groups)
  if num_groups == 1:
    return np.zeros(c, np.int64)
  rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  affinity = (rates + rates.T) / 2
  np.fill_diagonal(affinity, 0)
  # A small floor keeps the graph connected when a class is never confused (a perfect
  # classifier), so every class still lands in some group.
  affinity += 1e-3 / c
  np.fill_diagonal(affinity, 1)
  groups = SpectralClustering(num_groups, affinity='precomputed', random_state=seed,
                              assign_labels='cluster_qr').fit_predict(affinity)
  # Number groups by their smallest class id, so the mapping is stable and readable.
  order = {g: i for i, g in enumerate(dict.fromkeys(groups))}
  return np.asarray([order[g] for g in groups], np.int64)


def plot_grouped_confusion(confusion: np.ndarray, groups: np.ndarray, path: str,
                           class_names=None):
  """Writes a PNG of the row-normalised confusion matrix, classes sorted by group."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  order = np.argsort(groups, kind='stable')
  rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  rates = rates[order][:, order]
  names = [str(class_names[i] if class_names else i) for i in order]
  fig, ax = plt.subplots(figsize=(1 + 0.35 * len(order), 1 + 0.35 * len(order)))
  im = ax.imshow(np.log10(rates + 1e-3), cmap='viridis')
  bounds = np.flatnonzero(np.diff(groups[order])) + 0.5
  for b in bounds:
    ax.axhline(b, color='w', lw=1.5)
    ax.axvline(b, color='w', lw=1.5)
  ax.set_xticks(range(len(order)), names, rotation=90, fontsize=7)
  ax.set_yticks(range(len(order)), names, fontsize=7)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(f'Confusion (log10 rate), {groups.max() + 1} super-classes')
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=120)


def write_superclasses(path: str, groups: np.ndarray, confusion: np.ndarray, **info):
  """Writes the JSON read by PerImageRouter (atomically)."""
  files.write_json(path, {'superclass_of_class': [int(g) for g in groups],
                          'num_experts': int(groups.max() + 1),
                          'confusion': confusion.tolist(), **info})


def derive(config, workdir: str, num_experts: int, *, dataset: str | None = None,
           split: str | None = None, checkpoint: str | None = None,
           output: str | None = None, seed: int = 0) -> str:
  """Predicts an eval set with the trained model, clusters, writes JSON + PNG -> JSON path."""
  # Imported here: the clustering functions above need no JAX or TensorFlow.
  # pylint: disable=g-import-not-at-top
  from vmoe.checkpoints import sources
  from vmoe.data import pipeline
  from vmoe.nn import models
  from vmoe.train import config as config_lib
  from vmoe.train import evaluator
  # pylint: enable=g-import-not-at-top
  cli.check_single_process('vmoe.tools.superclasses')
  evals = [k for k in config.dataset if k != 'train']
  dataset = dataset or (evals[0] if evals else None)
  if dataset not in evals:
    raise ValueError(f'--dataset={dataset!r} is not an eval set of the config; valid: '
                     f'{evals}.')
  run = config_lib.resolve(config)
  num_classes = run.model.num_classes
  check_num_groups(num_classes, num_experts)
  cfg = config.dataset[dataset].copy_and_resolve_references()
  if split:
    cfg.split = split
  source, params = sources.load_params(checkpoint or workdir)
  iterable = pipeline.make_eval_iterable(cfg)
  spec = models.resolve(config.model, image_size=iterable.shapes()['image'][1:3])
  models.check_params(params, spec, source)
  forward = evaluator.Forward(models.build(spec))
  labels, predictions = [], []
  for batch, logits, _ in forward.batches(params, iterable):
    valid = batch['__valid__'].astype(bool)
    labels.append(evaluator.labels_of(batch)[valid])
    predictions.append(np.argmax(logits, -1)[valid])
  labels, predictions = np.concatenate(labels), np.concatenate(predictions)
  confusion = confusion_matrix(labels, predictions, num_classes)
  groups = cluster_classes(confusion, num_experts, seed)
  output = output or os.path.join(workdir, 'superclasses.json')
  write_superclasses(output, groups, confusion, checkpoint=source, dataset=cfg.name,
                     split=cfg.split, accuracy=float(np.mean(labels == predictions)))
  plot_grouped_confusion(confusion, groups, os.path.splitext(output)[0] + '.png')
  console.say(f'Super-classes of {cfg.name}:{cfg.split} (accuracy '
              f'{np.mean(labels == predictions):.4f}, {len(labels)} examples): '
              f'{groups.tolist()} -> {output}')
  return output


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  console.say(f'Full logs: {cli.log_to_file("superclasses", f.workdir)}')
  derive(f.config, f.workdir, f.num_experts, dataset=f.dataset, split=f.split,
         checkpoint=f.checkpoint, output=f.output, seed=f.seed)


def define_flags():
  """Only when run as a program: the library must not claim --config or --workdir."""
  config_flags.DEFINE_config_file('config', None, 'Config file of the trained model.')
  flags.DEFINE_string('workdir', None, 'Workdir of the trained model.')
  flags.DEFINE_string('checkpoint', None, 'Checkpoint (default: latest of workdir).')
  flags.DEFINE_integer('num_experts', None, 'Super-classes to make, one per expert.')
  flags.DEFINE_string('dataset', None, 'Eval set of config.dataset (default: the first).')
  flags.DEFINE_string('split', None, 'TFDS split to use instead of that eval set\'s.')
  flags.DEFINE_string('output', None, 'JSON path (default WORKDIR/superclasses.json).')
  flags.DEFINE_integer('seed', 0, 'Seed of the clustering.')


if __name__ == '__main__':
  define_flags()
  cli.run(main, required=('config', 'workdir', 'num_experts'))
