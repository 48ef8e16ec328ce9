"""Evaluation on the eval splits: prec@1 and loss over the valid examples only.

Eval batches are padded to a fixed size (one compiled step for all of them);
'__valid__': [B] marks the real examples, and only those are counted.
"""
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from vmoe.train import losses

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def make_eval_step(model: nn.Module, loss_fn: LossFn, *, params_sharding,
                   batch_sharding):
  """Returns jit(params, batch) -> sums {'loss', 'correct', 'count'}: [] each."""
  def eval_step(params, batch):
    logits, _ = model.apply({'params': params}, batch['image'], train=False)
    valid = batch['__valid__']
    # where, not a product: a padding example's loss may be inf or NaN.
    loss = jnp.where(valid, loss_fn(logits, batch['labels']), 0.0)
    correct = jnp.where(valid, losses.precision_at_1(logits, batch['labels']), 0.0)
    return {'loss': jnp.sum(loss), 'correct': jnp.sum(correct),
            'count': jnp.sum(valid.astype(jnp.float32))}
  return jax.jit(eval_step, in_shardings=(params_sharding, batch_sharding))


def evaluate(eval_step, params, batches: Iterable[Mapping[str, Any]], *,
             num_examples: int) -> dict[str, float]:
  """Runs one pass over `batches` (global jax arrays) -> {'prec@1', 'loss'}."""
  sums = None
  for batch in batches:
    out = eval_step(params, batch)
    # Summed on the device, so that the loop never waits for a batch's result.
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    raise ValueError('The eval split yielded no batches; check its split name.')
  sums = jax.tree.map(lambda x: float(np.asarray(x, np.float64)), sums)
  count = int(round(sums['count']))
  if count != num_examples:
    raise RuntimeError(f'Evaluated {count} examples but the split has '
                       f'{num_examples}: the eval pipeline dropped or repeated '
                       f'examples.')
  return {'prec@1': sums['correct'] / count, 'loss': sums['loss'] / count,
          'num_examples': count}
