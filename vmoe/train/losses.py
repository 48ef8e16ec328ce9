"""Classification losses (config.loss.name), predictions and precision@1.

Plain losses take logits: [B, C] and labels: [B, C] (one-hot, multi-hot or mixed-up) and
return one value per example: [B]. An E3 model (ensemble_size M > 1) gives logits
[B*M, C], row b*M + m member m of image b (vmoe/nn/ensemble.py); `Loss` handles both:

- training: the mean over members of each member's loss on the image's labels (the
  reference's ensemble_*_xent at train time: the labels repeated M times);
- evaluation and prediction: the ensemble's probabilities, the mean over members of
  theirs; the loss is their negative log-likelihood (log of the mean probability, as the
  reference's ensemble evaluation), prec@1 their top class.
"""
import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from vmoe.nn import ensemble
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
KEYS = ('name', 'ensemble_size')


@dataclasses.dataclass(frozen=True)
class Loss:
  """config.loss resolved for a model of `ensemble_size` M members (1: not E3)."""
  name: str
  ensemble_size: int = 1

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


def resolve(config: Mapping[str, Any], ensemble_size: int, model_name: str) -> Loss:
  """config.loss for a model named `model_name` of `ensemble_size` members."""
  checks.check_keys(config, KEYS, 'config.loss')
  name = checks.one_of(config.get('name'), sorted(LOSSES), 'config.loss.name')
  ensemble = name.startswith('ensemble_')
  if ensemble and model_name != 'VisionTransformerMoeEnsemble':
    raise ValueError(f'config.loss.name={name!r} needs an E3 model (model.name='
                     f"'VisionTransformerMoeEnsemble'), not {model_name!r}; use "
                     f'{name.removeprefix("ensemble_")!r}.')
  if not ensemble and model_name == 'VisionTransformerMoeEnsemble':
    raise ValueError(f'config.loss.name={name!r}: the E3 model gives one row of logits '
                     f"per ensemble member; use 'ensemble_{name}'.")
  m = config.get('ensemble_size', ensemble_size)
  if m != ensemble_size:
    raise ValueError(f'config.loss.ensemble_size={m!r} differs from '
                     f'model.encoder.moe.ensemble_size={ensemble_size}; make them equal '
                     '(or drop config.loss.ensemble_size).')
  return Loss(name, ensemble_size)


def precision_at_1(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the top-scoring class is a positive label, else 0.0: [B]. scores: [B, C]
  logits or log-probabilities."""
  top1 = jnp.argmax(scores, axis=-1)
  return (jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
          ).astype(jnp.float32)
