"""Evaluation on the eval splits, and forward passes over them, on all devices.

Eval batches are padded to a fixed size (one compiled step for all of them);
'__valid__': [B] marks the real examples, and only those are counted. Each batch's sums
are global arrays (summed over the devices and processes by the jitted step) and the
batches' sums add up on the devices, so every example of the split counts exactly once
wherever it was read; a segmenter's metrics come from one confusion matrix of the whole
split.
"""
import math
from typing import Any, Iterable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from vmoe.parallel import mesh as mesh_lib
from vmoe.train import calibration
from vmoe.train import losses
from vmoe.train import segmentation

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


def make_eval_step(model: nn.Module, loss: losses.AnyLoss, *, params_sharding,
                   batch_sharding, routing_stats: bool = False):
  """Returns jit(params, batch) -> sums over the batch's valid examples ('count' [] of
  them), with routing_stats also the dropped tokens of every MoE layer
  ('dropped/encoderblock_i').

  A classifier's: 'loss', 'correct' [], 'ece_bins' [3, calibration.NUM_BINS]; for an E3
  model (loss.ensemble_size M > 1) also each member's 'member_loss', 'member_correct' [M]
  and 'member_ece_bins' [M, 3, NUM_BINS]. A segmenter's: 'loss' [] (summed over the
  counted pixels, see _segmentation_sums), 'confusion' int32 [C, C] and 'unknown_pixels'
  int32 [].
  """
  sums_of = _segmentation_sums if loss.segmenter else _classification_sums

  def eval_step(params, batch):
    if routing_stats:
      (logits, _), state = model.apply({'params': params}, batch['image'], train=False,
                                       mutable=['intermediates'])
    else:
      logits, _ = model.apply({'params': params}, batch['image'], train=False)
    sums = sums_of(loss, logits, batch)
    if routing_stats:
      sums.update(dropped_per_layer(state.get('intermediates', {}), batch['__valid__']))
    return sums
  return jax.jit(eval_step, in_shardings=(params_sharding, batch_sharding))


def _classification_sums(loss: losses.Loss, logits: jax.Array, batch
                         ) -> dict[str, jax.Array]:
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
  return sums


def _segmentation_sums(loss: losses.PixelLoss, logits: jax.Array, batch
                       ) -> dict[str, jax.Array]:
  """logits [B, H, W, C], labels int [B, H, W]. 'loss' sums the losses of the counted
  pixels (of valid examples, not ignore_label), so that the split's loss is their mean
  per pixel, like the train loss; 'unknown_pixels' counts the pixels whose label is
  neither a class id nor ignore_label (evaluate refuses a split with any)."""
  valid, labels = batch['__valid__'], batch['labels']
  num_classes = logits.shape[-1]
  counted = valid[:, None, None] & loss.counted(labels)
  known = (labels >= 0) & (labels < num_classes)
  # where, not a product: a padding example's or an unknown label's loss may be NaN.
  pixel_losses = jnp.where(counted & known, loss.pixel_losses(logits, labels), 0.0)
  return {'loss': jnp.sum(pixel_losses),
          'count': jnp.sum(valid.astype(jnp.float32)),
          'confusion': segmentation.confusion(jnp.argmax(logits, axis=-1), labels, valid,
                                              num_classes, loss.ignore_label),
          'unknown_pixels': jnp.sum(counted & ~known, dtype=jnp.int32)}


# Integer sums (pixel counts) stay below this on the devices (int32, as jax has no
# int64 by default); see _sums.
_MAX_DEVICE_COUNT = 2**31 - 1


def _sums(eval_step, params, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """The eval step's sums over all `batches`, as numpy (float64; int64 for counts).

  Summed on the device, so that the loop never waits for a batch's result; before an
  integer sum could overflow int32 (a split may hold over 2^31 pixels) the device's
  partial sums move to the host. No batch adds more than labels.size to any count.
  """
  host, device, bound = None, None, 0
  for batch in batches:
    size = math.prod(batch['labels'].shape)
    if device is not None and bound + size > _MAX_DEVICE_COUNT:
      host, device, bound = _add(host, _to_host(device)), None, 0
    out = eval_step(params, batch)
    device = out if device is None else jax.tree.map(jnp.add, device, out)
    bound += size
  if device is None:
    raise ValueError('The eval split yielded no batches; check its split name.')
  return _add(host, _to_host(device))


def _to_host(sums):
  return jax.tree.map(lambda x: np.asarray(
      x, np.int64 if jnp.issubdtype(x.dtype, jnp.integer) else np.float64), sums)


def _add(a, b):
  return b if a is None else jax.tree.map(np.add, a, b)


def evaluate(eval_step, params, batches: Iterable[Mapping[str, Any]], *,
             num_examples: int) -> dict[str, float]:
  """Runs one pass over `batches` (global jax arrays), checking that it counted
  `num_examples` examples.

  A classifier's -> {'prec@1', 'loss' (the negative log-likelihood), 'ece',
  'num_examples'}, for E3 each member's 'member_{m}/prec@1', '.../loss' and '.../ece'.
  A segmenter's -> {'miou', 'pixel_accuracy', 'mean_accuracy', 'iou/{c}', 'num_pixels'
  (segmentation.metrics of the split's confusion matrix), 'loss' (the mean per counted
  pixel), 'num_examples'}. Both with the dropped tokens if counted: 'dropped/...', the
  mean over examples of the fraction of their tokens.
  """
  sums = _sums(eval_step, params, batches)
  count = int(round(float(sums['count'])))
  if count != num_examples:
    raise RuntimeError(f'Evaluated {count} examples but the split has '
                       f'{num_examples}: the eval pipeline dropped or repeated '
                       f'examples.')
  if 'confusion' in sums:
    out = _segmentation_metrics(sums)
  else:
    out = _classification_metrics(sums, count)
  out['num_examples'] = count
  out.update({k: float(v) / count for k, v in sums.items() if k.startswith('dropped/')})
  return out


def _classification_metrics(sums: Mapping[str, np.ndarray], count: int
                            ) -> dict[str, float]:
  out = {'prec@1': float(sums['correct']) / count, 'loss': float(sums['loss']) / count,
         'ece': float(calibration.ece(sums['ece_bins']))}
  if 'member_correct' in sums:
    member_ece = calibration.ece(sums['member_ece_bins'])
    for m, (right, nll, e) in enumerate(zip(sums['member_correct'], sums['member_loss'],
                                            member_ece)):
      out.update({f'member_{m}/prec@1': float(right) / count,
                  f'member_{m}/loss': float(nll) / count, f'member_{m}/ece': float(e)})
  return out


def _segmentation_metrics(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
  unknown, num_classes = int(sums['unknown_pixels']), sums['confusion'].shape[0]
  if unknown:
    raise ValueError(f'{unknown} pixels of the eval split have labels that are neither a '
                     f'class id in [0, {num_classes}) (model.num_classes) nor '
                     'config.loss.ignore_label; remap them in the pp string (before '
                     'seg_labels) or fix model.num_classes.')
  out = segmentation.metrics(sums['confusion'])
  return {**out, 'loss': float(sums['loss']) / out['num_pixels']}


def headline(metrics: Mapping[str, Any]) -> tuple[str, float]:
  """The main metric of an evaluation: ('miou', v) for a segmenter, ('prec@1', v) for a
  classifier."""
  name = 'miou' if 'miou' in metrics else 'prec@1'
  return name, metrics[name]


def summary(metrics: Mapping[str, Any]) -> str:
  """One console line's metrics: 'prec@1=0.9861 loss=0.0613' for a classifier,
  'miou=0.7012 pixel_acc=0.9345 loss=0.2210' for a segmenter."""
  name, value = headline(metrics)
  accuracy = f' pixel_acc={metrics["pixel_accuracy"]:.4f}' if name == 'miou' else ''
  return f'{name}={value:.4f}{accuracy} loss={metrics["loss"]:.4f}'


OUTPUTS = ('logits', 'pre_logits', 'intermediates')


class Forward:
  """jit(params, images) -> (outputs, intermediates) on a 1-D 'data' mesh over all
  devices (batches split, params replicated).

  outputs='logits': (logits [B, C] (E3: [B*M, C]; a segmenter's [B, H, W, C]), {});
  'pre_logits' (classifiers only): (the representation the head reads [B, D], E3: the
  mean of the members', {});
  'intermediates': (logits, everything the model sows: per MoE layer `buffer_slot`
  [G, S, E] (-1: not routed), `combine_weight` [G, S, E], the router's `logits`, and the
  `representation`). Compiled once per batch shape, reused for any params.
  """

  def __init__(self, model: nn.Module, *, outputs: str = 'logits'):
    if outputs not in OUTPUTS:
      raise ValueError(f'outputs={outputs!r} is not one of {OUTPUTS}.')
    if outputs == 'pre_logits' and model.spec.segmenter:
      raise ValueError("outputs='pre_logits' is a classifier's image representation; a "
                       "segmenter (model.decoder) has none: use 'logits' or "
                       "'intermediates'.")
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
