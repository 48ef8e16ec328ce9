"""What the tools that evaluate a trained model share: its params, and forward passes
over an eval split on all devices (batches sharded over a 1-D 'data' mesh, params
replicated, as in training)."""
from typing import Any, Iterator, Mapping, Optional

import jax
import numpy as np

from vmoe import inference
from vmoe.checkpoints import training as checkpoints
from vmoe.parallel import mesh as mesh_lib

P = jax.sharding.PartitionSpec


def restore_params(workdir: str, checkpoint: Optional[str] = None) -> tuple[str, Any]:
  """(where they came from, params): `checkpoint` if given (see inference.load_params),
  else the latest checkpoint of WORKDIR."""
  if checkpoint:
    return checkpoint, inference.load_params(checkpoint)
  step, params = checkpoints.load_latest_params(workdir)
  return f'{workdir}/checkpoints/{step}', params


def check_single_process(tool: str):
  if jax.process_count() > 1:
    raise ValueError(f'{tool} gathers per-example outputs on one host; run it as one '
                     f'process (it uses all local devices), not {jax.process_count()}.')


OUTPUTS = ('logits', 'pre_logits', 'intermediates')


class Forward:
  """jit(params, images) -> (outputs, intermediates) on a data mesh.

  outputs='logits': (logits [B, C], {}); 'pre_logits': (the representation the head
  reads [B, D], {}); 'intermediates': (logits, everything the model sows: per MoE layer
  `buffer_slot` [G, S, E] (-1: not routed), `combine_weight` [G, S, E], the router's
  `logits`, and the `representation`). Compiled once per batch shape, reused for any params.
  """

  def __init__(self, model, *, outputs: str = 'logits'):
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
        return inter['representation'][0], {}
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


def moe_intermediates(inter: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """Sown tree -> {'encoderblock_i': {'buffer_slot', 'combine_weight', 'logits'}}."""
  out = {}
  for name, block in (inter.get('Encoder') or {}).items():
    moe = block.get('Moe') if isinstance(block, Mapping) else None
    if not moe:
      continue
    layer = {k: v[0] for k, v in moe.items() if isinstance(v, tuple)}
    if 'logits' in (moe.get('Router') or {}):
      layer['logits'] = moe['Router']['logits'][0]
    out[name] = layer
  return dict(sorted(out.items(), key=lambda kv: int(kv[0].rsplit('_', 1)[-1])))


def labels_of(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """Class ids [B] from one-hot (or soft) 'labels' [B, C]."""
  return np.argmax(batch['labels'], axis=-1)
