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


def dropped_per_layer(intermediates, valid: jax.Array) -> dict[str, jax.Array]:
  """{'dropped/encoderblock_i': []}: tokens of valid images that no expert took (summed
  over images of the per-image fraction), from each sparse MoE layer's buffer_slot."""
  out = {}
  for name, block in (intermediates.get('Encoder') or {}).items():
    slot = (block.get('Moe') or {}).get('buffer_slot')
    if slot is None:
      continue  # Soft MoE: every token reaches every slot; nothing is dropped.
    # Groups hold whole images in order: [G, S, E] -> [B, T, E].
    per_image = jnp.all(slot[0] < 0, axis=-1).reshape(valid.shape[0], -1)  # [B, T]
    out[f'dropped/{name}'] = jnp.sum(jnp.where(valid, jnp.mean(per_image, axis=1), 0.0))
  return out


def make_eval_step(model: nn.Module, loss_fn: LossFn, *, params_sharding,
                   batch_sharding, routing_stats: bool = False):
  """Returns jit(params, batch) -> sums {'loss', 'correct', 'count'}: [] each, and with
  routing_stats the dropped tokens of every MoE layer ('dropped/encoderblock_i')."""
  def eval_step(params, batch):
    if routing_stats:
      (logits, _), state = model.apply({'params': params}, batch['image'], train=False,
                                       mutable=['intermediates'])
    else:
      logits, _ = model.apply({'params': params}, batch['image'], train=False)
    valid = batch['__valid__']
    # where, not a product: a padding example's loss may be inf or NaN.
    loss = jnp.where(valid, loss_fn(logits, batch['labels']), 0.0)
    correct = jnp.where(valid, losses.precision_at_1(logits, batch['labels']), 0.0)
    sums = {'loss': jnp.sum(loss), 'correct': jnp.sum(correct),
            'count': jnp.sum(valid.astype(jnp.float32))}
    if routing_stats:
      sums.update(dropped_per_layer(state.get('intermediates', {}), valid))
    return sums
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
          'num_examples': count,
          **{k: v / count for k, v in sums.items() if k.startswith('dropped/')}}
