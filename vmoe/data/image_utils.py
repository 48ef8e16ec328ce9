"""Size parsing and dtype-keeping resizing, shared by the image and the
segmentation pp ops (pp_ops.py, seg_ops.py)."""
import tensorflow as tf


def hw(h, w=None) -> tuple[int, int]:
  """(h) -> (h, h); (h, w) or ([h, w]) -> (h, w)."""
  if isinstance(h, (list, tuple)):
    if w is not None or len(h) != 2:
      raise ValueError(f'Expected a size H, (H, W) or H, W; got {h!r}, {w!r}.')
    h, w = h
  return int(h), int(h if w is None else w)


def _to_dtype(x: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
  """Casts float results back to the input dtype, rounding for integers."""
  if dtype.is_integer:
    x = tf.round(x)
  return tf.saturate_cast(x, dtype)


def resize(image: tf.Tensor, size, method: str) -> tf.Tensor:
  """image: [H, W, C] -> [size[0], size[1], C] of the same dtype (uint8 rounded)."""
  return _to_dtype(tf.image.resize(image, size, method=method), image.dtype)
