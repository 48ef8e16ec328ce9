"""`load_classifier`: a released (or our own) checkpoint as a numpy-in, numpy-out function."""
import os
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from flax import traverse_util

from vmoe.checkpoints import legacy
from vmoe.checkpoints import training
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


def load_params(checkpoint: str) -> dict:
  """Params tree of `checkpoint`: a legacy prefix (PREFIX.index + PREFIX.data-*, as
  released by Google), one of our checkpoints (WORKDIR/checkpoints/<step>) or a
  workdir (its latest checkpoint)."""
  if os.path.exists(checkpoint + '.index'):
    return legacy.restore(checkpoint)
  if os.path.isdir(os.path.join(checkpoint, 'state')):
    return training.load_step_params(checkpoint)
  if os.path.isdir(os.path.join(checkpoint, 'checkpoints')):
    return training.load_latest_params(checkpoint)[1]
  raise ValueError(f'No checkpoint at {checkpoint!r}: expected a legacy prefix with '
                   f'{checkpoint}.index next to its {checkpoint}.data-NNNNN-of-NNNNN files, '
                   'a checkpoint directory WORKDIR/checkpoints/<step>, or a WORKDIR.')


def load_classifier(checkpoint: str, model_config: Any,
                    overrides: Optional[Mapping[str, Any]] = None
                    ) -> Callable[[np.ndarray], np.ndarray]:
  """Returns f(images float32 [B, H, W, 3]) -> logits float32 [B, classes], eval mode.

  model_config: dict or ConfigDict in the reference's schema (`model_kwargs`).
  overrides: dotted keys to change at test time, e.g.
    {'encoder.moe.router.dispatcher.capacity_factor': 0.5}.
  The function is jitted (one compilation per input shape).
  """
  config = models.apply_overrides(config=model_config, overrides=overrides or {})
  model = models.build_model(config)
  params = jax.device_put(load_params(checkpoint))
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[0])
  checked = set()

  def classify(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B, H, W, 3], got shape {images.shape}.')
    if images.shape not in checked:
      models.check_input(config, images.shape[0], images.shape[1:3])
      spec = jax.ShapeDtypeStruct(images.shape, np.float32)
      expected = jax.eval_shape(
          lambda x: model.init(jax.random.PRNGKey(0), x, train=False), spec)['params']
      check_params(params, expected, checkpoint)
      checked.add(images.shape)
    return np.asarray(apply(params, images))

  return classify
