"""`load_classifier`: a released (or our own) checkpoint as a numpy-in, numpy-out function."""
from typing import Any, Callable, Mapping, Optional

from flax import traverse_util
import jax
import numpy as np

from vmoe.checkpoints import sources
from vmoe.nn import models


def check_params(params: Mapping[str, Any], expected: Mapping[str, Any], source: str):
  """Raises one ValueError listing missing, unexpected and mis-shaped parameters."""
  got = traverse_util.flatten_dict(params, sep='/')
  want = traverse_util.flatten_dict(expected, sep='/')
  problems = [f'missing {k} {tuple(want[k].shape)}' for k in sorted(set(want) - set(got))]
  problems += [f'unexpected {k} {tuple(np.shape(got[k]))}' for k in sorted(set(got) - set(want))]
  problems += [f'{k} has shape {tuple(np.shape(got[k]))}, the model needs {tuple(want[k].shape)}'
               for k in sorted(set(got) & set(want))
               if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if problems:
    raise ValueError(f'The parameters in {source} do not fit the model config: '
                     + '; '.join(problems[:20])
                     + (f'; and {len(problems) - 20} more' if len(problems) > 20 else '')
                     + '. Check model_config (sizes, moe.layers, num_experts, classifier).')


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
      model = models.build(spec)
      shapes = jax.ShapeDtypeStruct(images.shape, np.float32)
      expected = jax.eval_shape(
          lambda x: model.init(jax.random.PRNGKey(0), x, train=False), shapes)['params']
      check_params(params, expected, where)
      applies[size] = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[0])
    return np.asarray(applies[size](params, images))

  return classify
