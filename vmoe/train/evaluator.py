"""Evaluation on the eval splits, and forward passes over them, on all devices.

Eval batches are padded to a fixed size (one compiled step for all of them);
'__valid__': [B] marks the real examples, and only those are counted.
"""
from typing import Any, Iterable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from vmoe.parallel import mesh as mesh_lib
from vmoe.train import calibration
from vmoe.train import losses

P = jax.sharding.PartitionSpec


def dropped_per_layer(intermediates, valid: jax.Array) -> dict[str, jax.Array]:
  """{'dropped/encoderblock_i': []}: tokens of valid images that no expert took (summed
  over images of the per-image fraction), from each sparse MoE layer's buffer_slot."""
  out = {}
  for name, block in (intermediates.get('Encoder') or {}).items():
    slot = (block.get('Moe') or {}).get('buffer_slot')
    if slot is None:
      continue  # Soft MoE: every token reaches every slot; nothing is dropped.
    # Groups hold whole images in order: [G, S, E] -> [B, T, E] (E3: [B, T*M, E]).
    per_image = jnp.all(slot[0] < 0, axis=-1).reshape(valid.shape[0], -1)  # [B, T]
    out[f'dropped/{name}'] = jnp.sum(jnp.where(valid, jnp.mean(per_image, axis=1), 0.0))
  return out


def make_eval_step(model: nn.Module, loss: losses.Loss, *, params_sharding,
                   batch_sharding, routing_stats: bool = False):
  """Returns jit(params, batch) -> sums over the batch's valid examples: 'loss',
  'correct', 'count' ([] each), 'ece_bins' [3, calibration.NUM_BINS]; for an E3 model
  (loss.ensemble_size M > 1) also each member's 'member_loss', 'member_correct' [M] and
  'member_ece_bins' [M, 3, NUM_BINS]; with routing_stats the dropped tokens of every MoE
  layer ('dropped/encoderblock_i')."""
  def eval_step(params, batch):
    if routing_stats:
      (logits, _), state = model.apply({'params': params}, batch['image'], train=False,
                                       mutable=['intermediates'])
    else:
      logits, _ = model.apply({'params': params}, batch['image'], train=False)
    valid, labels = batch['__valid__'], batch['labels']
    # where, not a product: a padding example's loss may be inf or NaN.
    masked = lambda v: jnp.where(valid, v, 0.0)
    correct = losses.precision_at_1(loss.scores(logits), labels)
    sums = {'loss': jnp.sum(masked(loss.evaluate(logits, labels))),
            'correct': jnp.sum(masked(correct)),
            'count': jnp.sum(valid.astype(jnp.float32)),
            'ece_bins': calibration.bin_sums(loss.log_probs(logits), correct, valid)}
    if loss.ensemble_size > 1:
      members = jnp.swapaxes(loss.members(logits), 0, 1)  # [M, B, C]
      plain = losses.Loss(loss.name.removeprefix('ensemble_'))
      right = jax.vmap(losses.precision_at_1, in_axes=(0, None))(members, labels)
      sums.update(
          member_loss=jnp.sum(masked(jax.vmap(plain.evaluate, in_axes=(0, None))(
              members, labels)), axis=1),
          member_correct=jnp.sum(masked(right), axis=1),
          member_ece_bins=calibration.bin_sums(jax.vmap(plain.log_probs)(members), right,
                                               valid))
    if routing_stats:
      sums.update(dropped_per_layer(state.get('intermediates', {}), valid))
    return sums
  return jax.jit(eval_step, in_shardings=(params_sharding, batch_sharding))


def evaluate(eval_step, params, batches: Iterable[Mapping[str, Any]], *,
             num_examples: int) -> dict[str, float]:
  """Runs one pass over `batches` (global jax arrays) -> {'prec@1', 'loss' (the
  negative log-likelihood), 'ece', 'num_examples'}, for E3 each member's
  'member_{m}/prec@1', '.../loss' and '.../ece', and the dropped tokens if counted."""
  sums = None
  for batch in batches:
    out = eval_step(params, batch)
    # Summed on the device, so that the loop never waits for a batch's result.
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    raise ValueError('The eval split yielded no batches; check its split name.')
  sums = jax.tree.map(lambda x: np.asarray(x, np.float64), sums)
  count = int(round(float(sums['count'])))
  if count != num_examples:
    raise RuntimeError(f'Evaluated {count} examples but the split has '
                       f'{num_examples}: the eval pipeline dropped or repeated '
                       f'examples.')
  out = {'prec@1': float(sums['correct']) / count, 'loss': float(sums['loss']) / count,
         'ece': float(calibration.ece(sums['ece_bins'])), 'num_examples': count}
  if 'member_correct' in sums:
    member_ece = calibration.ece(sums['member_ece_bins'])
    for m, (right, nll, e) in enumerate(zip(sums['member_correct'], sums['member_loss'],
                                            member_ece)):
      out.update({f'member_{m}/prec@1': float(right) / count,
                  f'member_{m}/loss': float(nll) / count, f'member_{m}/ece': float(e)})
  out.update({k: float(v) / count for k, v in sums.items() if k.startswith('dropped/')})
  return out


OUTPUTS = ('logits', 'pre_logits', 'intermediates')


class Forward:
  """jit(params, images) -> (outputs, intermediates) on a 1-D 'data' mesh over all
  devices (batches split, params replicated).

  outputs='logits': (logits [B, C] (E3: [B*M, C]), {}); 'pre_logits': (the
  representation the head reads [B, D], E3: the mean of the members', {});
  'intermediates': (logits, everything the model sows: per MoE layer `buffer_slot`
  [G, S, E] (-1: not routed), `combine_weight` [G, S, E], the router's `logits`, and the
  `representation`). Compiled once per batch shape, reused for any params.
  """

  def __init__(self, model: nn.Module, *, outputs: str = 'logits'):
    if outputs not in OUTPUTS:
      raise ValueError(f'outputs={outputs!r} is not one of {OUTPUTS}.')
    self.mesh = mesh_lib.make_mesh()
    self.replicated = jax.sharding.NamedSharding(self.mesh, P())
    self.batch_sharding = jax.sharding.NamedSharding(self.mesh, P('data'))

    def apply(p, images):
      if outputs == 'logits':
        return model.apply({'params': p}, images, train=False)[0], {}
      (logits, _), state = model.apply({'params': p}, images, train=False,
                                       mutable=['intermediates'])
      inter = state.get('intermediates', {})
      if outputs == 'pre_logits':
        rep = inter['representation'][0]
        m = model.spec.ensemble_size
        return rep.reshape(-1, m, rep.shape[-1]).mean(axis=1) if m > 1 else rep, {}
      return logits, inter

    self._apply = jax.jit(apply, in_shardings=(self.replicated, self.batch_sharding))

  def __call__(self, params, images: np.ndarray):
    with jax.set_mesh(self.mesh):
      return self._apply(params, mesh_lib.global_batch({'image': images},
                                                      self.batch_sharding)['image'])

  def batches(self, params, iterable
              ) -> Iterator[tuple[Mapping[str, np.ndarray], np.ndarray, Any]]:
    """(batch, outputs, intermediates) as numpy, for every (padded) batch of `iterable`."""
    params = jax.device_put(params, self.replicated)
    for batch in iterable:
      out, inter = self(params, batch['image'])
      yield batch, np.asarray(out), jax.tree.map(np.asarray, inter)


def labels_of(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """Class ids [B] from one-hot (or soft) 'labels' [B, C]."""
  return np.argmax(batch['labels'], axis=-1)
