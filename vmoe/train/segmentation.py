"""Segmentation metrics from one confusion matrix summed over a whole eval split.

`confusion` counts a batch's pixels on the devices (int32, so that sums over batches,
devices and processes are exact); the evaluator adds the batches' matrices up and
`metrics` turns the split's matrix into mIoU, per-class IoU and pixel accuracies once, so
every pixel of every example weighs the same whatever batch it came in.
"""
import jax
import jax.numpy as jnp
import numpy as np


def confusion(predictions: jax.Array, labels: jax.Array, valid: jax.Array,
              num_classes: int, ignore_label: int) -> jax.Array:
  """int32 [C, C] pixel counts, row: true class, column: predicted class.

  predictions, labels: int [B, H, W]; valid: bool [B] (False: a padding example). Pixels
  of padding examples, of ignore_label and of labels outside [0, C) are not counted.
  A segment sum (scatter-add) rather than a one-hot matmul, whose [B*H*W, C] operands
  would not fit for large images; it runs under jit on batches sharded over devices.
  """
  c = num_classes
  counted = (valid[:, None, None] & (labels != ignore_label) & (labels >= 0)
             & (labels < c))
  cell = jnp.where(counted, labels * c + predictions, 0)
  counts = jax.ops.segment_sum(counted.astype(jnp.int32).ravel(), cell.ravel(),
                               num_segments=c * c)
  return counts.reshape(c, c)


def metrics(matrix: np.ndarray) -> dict[str, float]:
  """A split's confusion matrix [C, C] (rows truth, columns prediction) -> {'miou',
  'pixel_accuracy', 'mean_accuracy', 'num_pixels', 'iou/{c}'}, computed in float64.

  IoU of class c: TP / (TP + FP + FN). A class absent from both the truth and the
  predictions has no IoU (0 / 0): it is left out of 'iou/{c}' and of the mean, 'miou',
  so that a split without some class is scored on the classes it has (mmseg and
  Segmenter leave such NaNs out of the mean too). A class predicted but absent from the
  truth has IoU 0. mean_accuracy: the mean over the classes present in the truth of the
  fraction of their pixels predicted right; pixel_accuracy: over all counted pixels.
  """
  m = np.asarray(matrix, np.float64)
  total = m.sum()
  if total == 0:
    raise ValueError('The confusion matrix counts no pixel: every pixel of the split is '
                     'padding or ignore_label; check the eval masks (seg_labels) and '
                     'config.loss.ignore_label.')
  tp, truth, predicted = np.diag(m), m.sum(axis=1), m.sum(axis=0)
  union = truth + predicted - tp
  present = np.flatnonzero(union > 0)
  iou = tp[present] / union[present]
  in_truth = truth > 0
  return {'miou': float(iou.mean()),
          'pixel_accuracy': float(tp.sum() / total),
          'mean_accuracy': float(np.mean(tp[in_truth] / truth[in_truth])),
          'num_pixels': int(total),
          **{f'iou/{c}': float(v) for c, v in zip(present, iou)}}
