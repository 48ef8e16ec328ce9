"""Super-classes for super-class-guided per-image routing (Mobile V-MoE, arXiv 2309.04354).

Classes a trained dense model confuses with each other should share an expert. From its
confusion matrix on held-out data we build a graph (edge weight = how often two classes are
mistaken for one another, both directions) and split it into E groups by spectral
clustering, one group per expert.

`confusion_matrix` and `cluster_classes` compute the table, `write_superclasses` writes the
JSON that `encoder.moe.router.superclasses` takes ({'superclass_of_class': [...], ...}) and
`plot_grouped_confusion` the PNG of the confusion matrix with classes grouped by
super-class.
"""
import json
import os

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """[num_classes, num_classes] counts, rows = true class, columns = predicted class."""
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (labels, predictions), 1)
  return m


def cluster_classes(confusion: np.ndarray, num_groups: int, seed: int = 0) -> np.ndarray:
  """Class -> group [C] from a confusion matrix, by spectral clustering of its graph."""
  from sklearn.cluster import SpectralClustering  # pylint: disable=g-import-not-at-top
  c = confusion.shape[0]
  if not 1 <= num_groups <= c:
    raise ValueError(f'Cannot split {c} classes into num_experts={num_groups} super-classes; '
                     f'use between 1 and {c} experts.')
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
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def write_superclasses(path: str, groups: np.ndarray, confusion: np.ndarray, **info):
  """Writes the JSON read by PerImageRouter (atomically)."""
  obj = {'superclass_of_class': [int(g) for g in groups], 'num_experts': int(groups.max() + 1),
         'confusion': confusion.tolist(), **info}
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
