"""A segmenter's predictions on the first examples of an eval set, for a look.

predictions.png: one column per example; rows: the image, its true mask and the predicted
mask, classes in a fixed palette (ignored pixels black). predictions.json: per example
its index in the split and its own pixel accuracy and mIoU (over the classes in its truth
or prediction; vmoe.train.segmentation.metrics of its confusion matrix), None for an
example whose pixels are all ignored.
"""
import colorsys
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from vmoe.train import segmentation
from vmoe.utils import files

IGNORE_COLOUR = (0, 0, 0)


def palette(num_classes: int) -> np.ndarray:
  """uint8 [num_classes, 3]: class c's RGB colour, the same in every run, none black:
  matplotlib's 20 'tab20' colours (its 10 dark ones first, so that classes 0-9 have
  distinct hues), then hues a golden angle apart."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  tab = np.asarray(colormaps['tab20'].colors)
  tab = np.concatenate([tab[0::2], tab[1::2]])[:num_classes]
  more = [colorsys.hsv_to_rgb((0.618034 * c) % 1.0, 0.75, 0.95 if c % 2 else 0.7)
          for c in range(len(tab), num_classes)]
  return np.round(255 * np.concatenate([tab, np.reshape(more, (-1, 3))])).astype(np.uint8)


def colour(mask: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
  """mask int [H, W] -> uint8 [H, W, 3]; ignore_label (and any id outside the classes)
  black."""
  known = (mask >= 0) & (mask < num_classes) & (mask != ignore_label)
  out = np.empty(mask.shape + (3,), np.uint8)
  out[...] = IGNORE_COLOUR
  out[known] = palette(num_classes)[mask[known]]
  return out


def image_metrics(predicted: np.ndarray, labels: np.ndarray, num_classes: int,
                  ignore_label: int) -> dict[str, Optional[float]]:
  """One image's {'pixel_accuracy', 'miou'} (None each if all its pixels are ignored).
  predicted, labels: int [H, W]."""
  matrix = np.asarray(segmentation.confusion(
      predicted[None], labels[None], np.ones(1, bool), num_classes, ignore_label))
  if not matrix.sum():
    return {'pixel_accuracy': None, 'miou': None}
  m = segmentation.metrics(matrix)
  return {'pixel_accuracy': m['pixel_accuracy'], 'miou': m['miou']}


def first_examples(predict: Callable[..., Any], params, iterable: Iterable[Mapping[str, Any]],
                   num: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The first `num` real examples of `iterable` (eval batches, '__valid__' [B]) ->
  images [N, H, W, 3], labels [N, H, W] and logits [N, H, W, C]; N = min(num, examples).

  predict: predict(params, images) -> logits or (logits, ...) (evaluator.Forward), or
  with params None predict(images) -> logits (vmoe.load_segmenter's function).
  """
  images, labels, logits, n = [], [], [], 0
  for batch in iterable:
    if n >= num:
      break
    out = predict(batch['image']) if params is None else predict(params, batch['image'])
    out = np.asarray(out[0] if isinstance(out, tuple) else out)
    valid = np.flatnonzero(np.asarray(batch['__valid__']))[:num - n]
    images.append(np.asarray(batch['image'])[valid])
    labels.append(np.asarray(batch['labels'])[valid])
    logits.append(out[valid])
    n += len(valid)
  if not n:
    raise ValueError('The eval set yielded no example to predict; check its split.')
  return tuple(np.concatenate(x) for x in (images, labels, logits))


def write(predict: Callable[..., Any], params, iterable: Iterable[Mapping[str, Any]],
          out_dir: str, num: int, *, ignore_label: int = 255,
          class_names: Optional[Sequence[str]] = None,
          value_range: tuple[float, float] = (-1.0, 1.0), title: str = ''
          ) -> dict[str, Any]:
  """predictions.png and predictions.json (atomically) in out_dir for the first `num`
  examples of `iterable` (see first_examples for `predict` and `params`) -> {'png',
  'json': their paths, 'examples': what predictions.json holds}.

  value_range: the range the preprocessing mapped the images to (value_range(-1, 1)),
  undone for display. class_names: the legend's names of the classes (default: ids).
  """
  if num < 1:
    raise ValueError(f'predictions: num={num} must be at least 1 (examples to show).')
  images, labels, logits = first_examples(predict, params, iterable, num)
  num_classes = logits.shape[-1]
  predicted = logits.argmax(-1)
  examples = [{'index': i, **image_metrics(p, t, num_classes, ignore_label)}
              for i, (p, t) in enumerate(zip(predicted, labels))]
  paths = {k: os.path.join(out_dir, f'predictions.{k}') for k in ('png', 'json')}
  lo, hi = value_range
  shown = np.clip((images - lo) / (hi - lo), 0.0, 1.0)
  _plot(shown, labels, predicted, examples, paths['png'], ignore_label=ignore_label,
        class_names=class_names or [str(c) for c in range(num_classes)], title=title)
  files.write_json(paths['json'], examples)
  return {**paths, 'examples': examples}


def _plot(images, labels, predicted, examples, path, *, ignore_label, class_names, title):
  """images [N, H, W, 3] in [0, 1]; labels, predicted int [N, H, W]."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import patches  # pylint: disable=g-import-not-at-top
  n, c = len(images), len(class_names)
  fig, axes = plt.subplots(3, n, figsize=(1.9 * n + 1.6, 6.2), squeeze=False)
  fmt = lambda v: 'n/a' if v is None else f'{v:.2f}'
  for j, e in enumerate(examples):
    axes[0, j].imshow(images[j])
    axes[0, j].set_title(f'#{e["index"]}\nacc {fmt(e["pixel_accuracy"])}, '
                         f'mIoU {fmt(e["miou"])}', fontsize=7)
    axes[1, j].imshow(colour(labels[j], c, ignore_label), interpolation='nearest')
    axes[2, j].imshow(colour(predicted[j], c, ignore_label), interpolation='nearest')
  for row, name in enumerate(('image', 'truth', 'prediction')):
    axes[row, 0].set_ylabel(name, fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  shown = sorted(set(np.unique(labels)) | set(np.unique(predicted)))
  colours = palette(c) / 255.0
  handles = [patches.Patch(color=colours[k], label=class_names[k]) for k in shown if 0 <= k < c]
  if (labels == ignore_label).any():
    handles.append(patches.Patch(color=np.array(IGNORE_COLOUR) / 255.0, label='ignored'))
  fig.legend(handles=handles, loc='center right', fontsize=7, frameon=False)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 1))
  files.save_figure(fig, path)
