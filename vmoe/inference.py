"""`load_classifier` and `load_segmenter`: a released (or our own) checkpoint as a
numpy-in, numpy-out function."""
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from vmoe.checkpoints import sources
from vmoe.nn import ensemble
from vmoe.nn import models


def load_classifier(checkpoint: str, model_config: Any,
                    overrides: Optional[Mapping[str, Any]] = None, *, members: bool = False
                    ) -> Callable[[np.ndarray], np.ndarray]:
  """Returns f(images float32 [B, H, W, 3]) -> logits float32 [B, classes], eval mode.

  An E3 model (name 'VisionTransformerMoeEnsemble', M = encoder.moe.ensemble_size) gives
  the ensemble prediction, log of the members' mean softmax probability [B, classes]
  (the reference's ensemble evaluation); with members=True each member's logits
  [B, M, classes] instead. members=True on another model is an error, and so is a
  segmenter's config (one with a decoder: load_segmenter).

  checkpoint: a released legacy prefix (PREFIX.index + PREFIX.data-*), one of our
    checkpoint directories (WORKDIR/checkpoints/<step>) or a WORKDIR (its latest).
  model_config: dict or ConfigDict in the reference's schema (`model_kwargs`).
  overrides: dotted keys to change at test time, e.g.
    {'encoder.moe.router.dispatcher.capacity_factor': 0.5}.
  The function is jitted (one compilation per input shape).
  """
  spec = models.resolve(model_config, overrides=overrides)  # Fails before any read.
  if spec.segmenter:
    raise ValueError(f'load_classifier: the model config has a decoder '
                     f'({spec.decoder.name!r}), so it is a segmenter; use '
                     'vmoe.load_segmenter(checkpoint, model_config) for its per-pixel '
                     'logits.')
  m = spec.ensemble_size
  if members and spec.name != models.ENSEMBLE:
    raise ValueError(f'load_classifier(members=True) needs an E3 model (name '
                     f"'{models.ENSEMBLE}'); {spec.name!r} has no ensemble members.")

  def head(logits):
    if members:
      return ensemble.members(logits, m)
    return ensemble.log_mean(jax.nn.log_softmax(ensemble.members(logits, m))
                             ) if m > 1 else logits

  return _load(checkpoint, model_config, overrides, head)


def load_segmenter(checkpoint: str, model_config: Any,
                   overrides: Optional[Mapping[str, Any]] = None
                   ) -> Callable[[np.ndarray], np.ndarray]:
  """Returns f(images float32 [B, H, W, 3]) -> logits float32 [B, H, W, classes] (per
  pixel, at the input size), eval mode: a segmenter, a model config with a decoder
  (model_config['decoder'], e.g. {'name': 'linear'}); a classifier's config is an error
  (load_classifier).

  checkpoint, model_config, overrides: as for load_classifier. Images preprocessed as in
  training (e.g. value_range(-1, 1)); the function is jitted (one compilation per input
  shape).
  """
  spec = models.resolve(model_config, overrides=overrides)  # Fails before any read.
  if not spec.segmenter:
    raise ValueError("load_segmenter: the model config has no decoder (model_config"
                     "['decoder'], e.g. {'name': 'linear'}), so it is a classifier; use "
                     'vmoe.load_classifier(checkpoint, model_config) for its logits.')
  return _load(checkpoint, model_config, overrides, lambda logits: logits)


def _load(checkpoint: str, model_config: Any, overrides: Optional[Mapping[str, Any]],
          head: Callable[[jax.Array], jax.Array]) -> Callable[[np.ndarray], np.ndarray]:
  """The params of `checkpoint` -> f(images [B, H, W, 3]) -> head(the model's logits),
  jitted per image size; the params are checked against the model of each size."""
  where, params = sources.load_params(checkpoint)
  params = jax.device_put(params)
  applies = {}  # Image size -> the jitted model for it.

  def predict(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B, H, W, 3], got shape {images.shape}.')
    size = images.shape[1:3]
    spec = models.resolve(model_config, image_size=size, overrides=overrides)
    spec.groups(images.shape[0])
    if size not in applies:
      models.check_params(params, spec, where)
      model = models.build(spec)
      applies[size] = jax.jit(
          lambda p, x: head(model.apply({'params': p}, x, train=False)[0]))
    return np.asarray(applies[size](params, images))

  return predict
