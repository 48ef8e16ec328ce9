"""`load_classifier`: a released (or our own) checkpoint as a numpy-in, numpy-out function."""
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from vmoe.checkpoints import sources
from vmoe.nn import models


def load_classifier(checkpoint: str, model_config: Any,
                    overrides: Optional[Mapping[str, Any]] = None
                    ) -> Callable[[np.ndarray], np.ndarray]:
  """Returns f(images float32 [B, H, W, 3]) -> logits float32 [B, classes], eval mode.

  checkpoint: a released legacy prefix (PREFIX.index + PREFIX.data-*), one of our
    checkpoint directories (WORKDIR/checkpoints/<step>) or a WORKDIR (its latest).
  model_config: dict or ConfigDict in the reference's schema (`model_kwargs`).
  overrides: dotted keys to change at test time, e.g.
    {'encoder.moe.router.dispatcher.capacity_factor': 0.5}.
  The function is jitted (one compilation per input shape).
  """
  models.resolve(model_config, overrides=overrides)  # A bad config fails before any read.
  where, params = sources.load_params(checkpoint)
  params = jax.device_put(params)
  applies = {}  # Image size -> the jitted model for it.

  def classify(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B, H, W, 3], got shape {images.shape}.')
    size = images.shape[1:3]
    spec = models.resolve(model_config, image_size=size, overrides=overrides)
    spec.groups(images.shape[0])
    if size not in applies:
      models.check_params(params, spec, where)
      model = models.build(spec)
      applies[size] = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[0])
    return np.asarray(applies[size](params, images))

  return classify
