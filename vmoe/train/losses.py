"""Losses (config.loss): image classification (`Loss`) and per-pixel segmentation
(`PixelLoss`), with their train metrics.

`resolve(config.loss, model_spec)` gives the one that fits the model: a `PixelLoss` for a
segmenter (ModelSpec.segmenter: a model with a decoder), else a `Loss`. The train step
reads both through the same members: `segmenter`, `batch_loss` (the batch's main loss),
`image_labels` (what routers that learn from class ids get) and `train_metrics`.

Classification losses take logits: [B, C] and labels: [B, C] (one-hot, multi-hot or
mixed-up) and return one value per example: [B]. An E3 model (ensemble_size M > 1) gives
logits [B*M, C], row b*M + m member m of image b (vmoe/nn/ensemble.py); `Loss` handles
both:

- training: the mean over members of each member's loss on the image's labels (the
  reference's ensemble_*_xent at train time: the labels repeated M times);
- evaluation and prediction: the ensemble's probabilities, the mean over members of
  theirs; the loss is their negative log-likelihood (log of the mean probability, as the
  reference's ensemble evaluation), prec@1 their top class.

The pixel loss takes logits [B, H, W, C] and labels int [B, H, W] (class ids; pixels of
`ignore_label` count nowhere). The loss of a batch is the mean over its counted pixels
(the sum of their losses over their number, as mmseg's and Segmenter's), so a large
image weighs more than a small one and every pixel the same.
"""
import dataclasses
from typing import Any, ClassVar, Mapping, Union

import jax
import jax.numpy as jnp
import optax

from vmoe.nn import ensemble
from vmoe.nn import spec as spec_lib
from vmoe.utils import checks


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  # Summed over classes (not averaged) so that it is on the scale of the
  # softmax loss and of the auxiliary MoE losses it is added to.
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


# config.loss.name -> (per-member loss, log-probability of each class). The ensemble
# names are the reference's; they need an E3 model, the plain ones a plain model.
LOSSES = {'softmax_xent': (softmax_xent, jax.nn.log_softmax),
          'sigmoid_xent': (sigmoid_xent, jax.nn.log_sigmoid),
          'ensemble_softmax_xent': (softmax_xent, jax.nn.log_softmax),
          'ensemble_sigmoid_xent': (sigmoid_xent, jax.nn.log_sigmoid)}
PIXEL_LOSSES = ('pixel_softmax_xent',)
CLASSIFICATION_KEYS = ('name', 'ensemble_size')
PIXEL_KEYS = ('name', 'ignore_label', 'label_smoothing')
KEYS = tuple(sorted(set(CLASSIFICATION_KEYS + PIXEL_KEYS)))  # Of either kind.


@dataclasses.dataclass(frozen=True)
class Loss:
  """config.loss resolved for a model of `ensemble_size` M members (1: not E3)."""
  name: str
  ensemble_size: int = 1
  segmenter: ClassVar[bool] = False

  @property
  def sigmoid(self) -> bool:
    return self.name.endswith('sigmoid_xent')

  def members(self, logits: jax.Array) -> jax.Array:
    """[B*M, C] -> [B, M, C]."""
    return ensemble.members(logits, self.ensemble_size)

  def train(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """[B]: the members' mean loss on the image's labels."""
    loss = LOSSES[self.name][0]
    if self.ensemble_size == 1:
      return loss(logits, labels)
    return jnp.mean(loss(self.members(logits), labels[:, None]), axis=1)

  def log_probs(self, logits: jax.Array) -> jax.Array:
    """[B, C]: log of the members' mean probability of each class (softmax, or
    per-class sigmoid); for M = 1 the model's own log-probabilities."""
    return ensemble.log_mean(LOSSES[self.name][1](self.members(logits)))

  def scores(self, logits: jax.Array) -> jax.Array:
    """[B, C] whose top class is the prediction: the logits, or the ensemble's
    log-probabilities."""
    return logits if self.ensemble_size == 1 else self.log_probs(logits)

  def evaluate(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """[B]: negative log-likelihood of the ensemble prediction (= `train` for M = 1)."""
    if self.ensemble_size == 1:
      return LOSSES[self.name][0](logits, labels)
    log_p = self.log_probs(logits)
    if not self.sigmoid:
      # Where a label is 0 its log-probability may be -inf: 0, not NaN.
      return -jnp.sum(jnp.where(labels > 0, labels * log_p, 0.0), axis=-1)
    log_not_p = ensemble.log_mean(jax.nn.log_sigmoid(-self.members(logits)))
    return -jnp.sum(labels * log_p + (1 - labels) * log_not_p, axis=-1)

  def batch_loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """[]: the mean over the batch of `train`."""
    return jnp.mean(self.train(logits, labels))

  def image_labels(self, labels: jax.Array) -> jax.Array:
    """int [B]: the class ids routers may learn from (super-class guided routing); for
    mixed-up labels the class of the dominant example."""
    return jnp.argmax(labels, axis=-1)

  def train_metrics(self, logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    return {'prec@1': jnp.mean(precision_at_1(self.scores(logits), labels))}


@dataclasses.dataclass(frozen=True)
class PixelLoss:
  """config.loss of a segmenter: softmax cross-entropy per pixel, computed in float32.

  label_smoothing s: the target of a pixel of class c is (1 - s) one_hot(c) + s / C. A
  label that is neither a class id in [0, C) nor ignore_label makes its pixel's loss NaN
  (which the train step's non-finite guard reports) rather than vanish silently.
  """
  name: str = 'pixel_softmax_xent'
  ignore_label: int = 255
  label_smoothing: float = 0.0
  segmenter: ClassVar[bool] = True

  def counted(self, labels: jax.Array) -> jax.Array:
    """bool [B, H, W]: the pixels that are not ignored."""
    return labels != self.ignore_label

  def pixel_losses(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits [B, H, W, C], labels int [B, H, W] -> float32 [B, H, W]: each pixel's loss,
    0 where ignored."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    known = (labels >= 0) & (labels < logits.shape[-1])
    nll = -jnp.take_along_axis(log_p, jnp.where(known, labels, 0)[..., None],
                               axis=-1)[..., 0]
    if self.label_smoothing:
      s = self.label_smoothing
      nll = (1 - s) * nll - s * jnp.mean(log_p, axis=-1)
    return jnp.where(self.counted(labels), jnp.where(known, nll, jnp.nan), 0.0)

  def batch_loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """[]: the mean loss of the batch's counted pixels (0 if it has none)."""
    count = jnp.sum(self.counted(labels), dtype=jnp.float32)
    return jnp.sum(self.pixel_losses(logits, labels)) / jnp.maximum(count, 1.0)

  def image_labels(self, labels: jax.Array) -> None:
    """A segmentation image has no single class for routers to learn from."""
    del labels

  def train_metrics(self, logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """{'pixel_accuracy': []}: the fraction of counted pixels whose top class is right."""
    counted = self.counted(labels)
    right = jnp.sum(counted & (jnp.argmax(logits, axis=-1) == labels), dtype=jnp.float32)
    return {'pixel_accuracy': right / jnp.maximum(jnp.sum(counted, dtype=jnp.float32), 1.0)}


AnyLoss = Union[Loss, PixelLoss]


def resolve(config: Mapping[str, Any], model: spec_lib.ModelSpec) -> AnyLoss:
  """config.loss for `model`: a PixelLoss for a segmenter, else a Loss."""
  name = checks.one_of(config.get('name'), sorted(LOSSES) + list(PIXEL_LOSSES),
                       'config.loss.name')
  pixel = name in PIXEL_LOSSES
  checks.check_keys(config, PIXEL_KEYS if pixel else CLASSIFICATION_KEYS,
                    f'config.loss (name={name!r})')
  if pixel and not model.segmenter:
    raise ValueError(f'config.loss.name={name!r} is a per-pixel loss for segmenters, but '
                     f'the model {model.name!r} is a classifier (no model.decoder); set '
                     "model.decoder (e.g. {'name': 'linear'}) or use 'softmax_xent'.")
  if not pixel and model.segmenter:
    raise ValueError(f'config.loss.name={name!r} is an image-classification loss, but the '
                     f'model is a segmenter (model.decoder.name={model.decoder.name!r}) '
                     "with logits per pixel; use 'pixel_softmax_xent'.")
  if pixel:
    return _pixel_loss(name, config, model.num_classes)
  return _classification_loss(name, config, model)


def _classification_loss(name: str, config: Mapping[str, Any], model: spec_lib.ModelSpec
                         ) -> Loss:
  ensemble_size = model.ensemble_size
  ensemble = name.startswith('ensemble_')
  if ensemble and model.name != 'VisionTransformerMoeEnsemble':
    raise ValueError(f'config.loss.name={name!r} needs an E3 model (model.name='
                     f"'VisionTransformerMoeEnsemble'), not {model.name!r}; use "
                     f'{name.removeprefix("ensemble_")!r}.')
  if not ensemble and model.name == 'VisionTransformerMoeEnsemble':
    raise ValueError(f'config.loss.name={name!r}: the E3 model gives one row of logits '
                     f"per ensemble member; use 'ensemble_{name}'.")
  m = config.get('ensemble_size', ensemble_size)
  if m != ensemble_size:
    raise ValueError(f'config.loss.ensemble_size={m!r} differs from '
                     f'model.encoder.moe.ensemble_size={ensemble_size}; make them equal '
                     '(or drop config.loss.ensemble_size).')
  return Loss(name, ensemble_size)


def _pixel_loss(name: str, config: Mapping[str, Any], num_classes: int) -> PixelLoss:
  ignore = config.get('ignore_label', PixelLoss.ignore_label)
  if not checks.is_int(ignore):
    raise ValueError(f'config.loss.ignore_label={ignore!r} must be an integer (the mask '
                     'value of pixels that count nowhere, e.g. 255).')
  if 0 <= ignore < num_classes:
    raise ValueError(f'config.loss.ignore_label={ignore} is a class id of the model\'s '
                     f'{num_classes} classes (model.num_classes={num_classes}): its pixels '
                     f'would be both ignored and a class; use a label outside [0, '
                     f'{num_classes}), e.g. 255 (the default).')
  smoothing = config.get('label_smoothing', PixelLoss.label_smoothing)
  if not (checks.is_number(smoothing) and 0 <= smoothing < 1):
    raise ValueError(f'config.loss.label_smoothing={smoothing!r} must be a number in '
                     '[0, 1) (0: none).')
  return PixelLoss(name, ignore, float(smoothing))


def precision_at_1(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the top-scoring class is a positive label, else 0.0: [B]. scores: [B, C]
  logits or log-probabilities."""
  top1 = jnp.argmax(scores, axis=-1)
  return (jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
          ).astype(jnp.float32)
