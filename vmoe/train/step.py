"""The train step: loss, gradients and the update, as one jitted function of the state
and a batch; a step whose loss, gradient norm or update is not finite is not applied."""
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from vmoe.train import losses
from vmoe.train import mixup as mixup_lib
from vmoe.train import train_state as train_state_lib

TrainState = train_state_lib.TrainState


def summarize_metrics(metrics: Mapping[str, Any], prefix: str = '') -> dict:
  """Nested model metrics -> scalars {'encoderblock_1/importance_loss': ...}.

  A [G] metric (one value per group) gives its mean. A [G, E] one (e.g.
  expert_load) gives the max over experts of its mean over groups
  ('..._max'), since its mean over experts is a constant 1/E.
  """
  out = {}
  for k, v in metrics.items():
    if isinstance(v, Mapping):
      out.update(summarize_metrics(v, f'{prefix}{k}/'))
    elif jnp.ndim(v) > 1:
      out[f'{prefix}{k}_max'] = jnp.max(jnp.mean(v, axis=0))
    else:
      out[f'{prefix}{k}'] = jnp.mean(v)
  return out


def all_finite(tree) -> jax.Array:
  """[] bool: no float leaf of `tree` holds a NaN or Inf."""
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.inexact)] or [True]))


def make_train_step(model, tx: optax.GradientTransformation, schedule,
                    loss: losses.AnyLoss, *, seed: int, rng_names, mixup_config,
                    num_shards: int):
  """Returns train_step(state, batch) -> (state, metrics: {name: []}).

  The main loss is loss.batch_loss (a classifier's mean over images, a segmenter's over
  counted pixels) and the train metrics loss.train_metrics ('prec@1', or
  'pixel_accuracy' for a segmenter).
  """
  def train_step(state: TrainState, batch):
    rngs = train_state_lib.rng_streams(seed, state.step,
                                       tuple(rng_names) + ('mixup',))
    mixup_rng = rngs.pop('mixup')
    images, labels = batch['image'], batch['labels']
    if mixup_config:
      images, labels = mixup_lib.mixup(mixup_rng, images, labels,
                                       num_shards=num_shards, **mixup_config)

    def loss_and_metrics(params):
      # Class ids, for routers that learn from them (super-class guided
      # routing); with mixup, the class of the dominant example; a segmenter's
      # images have none.
      logits, metrics = model.apply({'params': params}, images, train=True,
                                    labels=loss.image_labels(labels), rngs=rngs)
      main_loss = loss.batch_loss(logits, labels)
      auxiliary_loss = jnp.mean(metrics['auxiliary_loss'])
      metrics = summarize_metrics(metrics)
      metrics.update(main_loss=main_loss, auxiliary_loss=auxiliary_loss,
                     loss=main_loss + auxiliary_loss,
                     **loss.train_metrics(logits, labels))
      return main_loss + auxiliary_loss, metrics

    grads, metrics = jax.grad(loss_and_metrics, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    # A step with a NaN/Inf loss or gradient norm, or whose update would make
    # the state non-finite, is not applied: the state stays finite, so no
    # checkpoint can hold NaNs. The step counter (hence the data and random
    # numbers) advances anyway, so that a restart stays deterministic.
    ok = (jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
          & all_finite((params, opt_state)))
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                     (params, opt_state),
                                     (state.params, state.opt_state))
    metrics['grad_norm'] = grad_norm
    metrics['nonfinite_steps'] = 1.0 - ok.astype(jnp.float32)
    metrics['learning_rate'] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params,
                      opt_state=opt_state), metrics
  return train_step


