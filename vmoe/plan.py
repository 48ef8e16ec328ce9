r"""Dry-run memory planner: parameters and per-device bytes of a config on a mesh.

  python -m vmoe.plan --config=configs/vmoe_15b.py --mesh=data:16,expert:32 [--json]
      [--image_size=224] [--fsdp]

Everything comes from abstract shapes (jax.eval_shape): nothing is allocated, so a 15B
model plans in seconds on a laptop. Per device: params, optimizer state and gradients
sharded by vmoe.parallel.rules (experts over 'expert'; with --fsdp the other params over
'data' too), and an estimate of the activations a train step keeps for the backward pass.

Activation estimate (float32), per token of the per-device batch B/devices and per block:
10 D (layer norms, q/k/v, attention output, residuals) + heads T (attention probabilities)
+ 2 H for a dense MLP, or K cf (2 H + 2 D) for a MoE MLP (its buffers, at the train
capacity factor cf). With model.encoder.remat a block keeps only what its policy saves
and recomputes the rest one block at a time, so the largest block's full estimate is added
once: 'full' keeps D (the block's input); 'dots_no_batch' keeps the input and the
projections without batch dimensions, 6 D + H for a dense block (q, k, v, attention and
MLP outputs) and 5 D + E for a MoE one (router logits; the experts' matmuls batch over
E); 'dots' saves nearly everything counted, so it is counted as no remat. An estimate:
XLA fuses and frees some of these and keeps other temporaries; it is the right order of
magnitude, not a bound.
"""
import json
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vmoe.nn import models
from vmoe.parallel import rules
from vmoe.train import optimizers


def _bytes(tree) -> int:
  return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def activation_bytes(model_config: Mapping[str, Any], batch_per_device: float,
                     image_size: int) -> float:
  """The estimate of the module docstring, in bytes."""
  c = models.validate(model_config)
  enc = c['encoder']
  (ph, pw), d, h = c['patch_size'], c['hidden_size'], enc['mlp_dim']
  t = (image_size // ph) * (image_size // pw) + (c.get('classifier', 'token') == 'token')
  moe = enc.get('moe') or {}
  router = moe.get('router') or {}
  k = router.get('num_selected_experts', 1)
  cf = (router.get('dispatcher') or {}).get('capacity_factor') or router.get(
      'capacity_factor') or 1.0
  moe_layers = set(moe.get('layers') or ())
  full = [10 * d + enc['num_heads'] * t + (k * cf * (2 * h + 2 * d) if i in moe_layers
                                           else 2 * h) for i in range(enc['num_layers'])]
  remat = enc.get('remat', 'none')
  if remat in ('none', 'dots'):
    per_token = sum(full)
  else:
    kept = [d if remat == 'full' else
            (5 * d + moe['num_experts'] if i in moe_layers else 6 * d + h)
            for i in range(enc['num_layers'])]
    per_token = sum(kept) + max(full)
  return 4.0 * batch_per_device * t * per_token


def plan(config, mesh: Mapping[str, int] | str, *, image_size: int = 224,
         fsdp: bool = False) -> dict:
  """{'num_params', 'num_expert_params', 'mesh', 'batch_per_device', 'per_device_bytes':
  {'params', 'optimizer', 'gradients', 'activations', 'total'}, 'total_bytes': {...}}."""
  mesh = rules.parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
  if any(v == -1 for v in mesh.values()):
    raise ValueError(f'Mesh {mesh}: give every axis a size to plan for (no -1).')
  shape = rules.mesh_shape(mesh, math.prod(mesh.values()))
  devices = math.prod(shape.values())
  model_config = models.validate(config.model)
  model = models.build_model(model_config)
  # Params do not depend on the batch; one MoE group of whole images is the smallest
  # batch the model accepts.
  (ph, pw) = model_config['patch_size']
  tokens = (image_size // ph) * (image_size // pw) + (model_config['classifier'] == 'token')
  group = (model_config['encoder'].get('moe') or {}).get('group_size') or tokens
  images = jax.ShapeDtypeStruct((max(1, group // tokens), image_size, image_size, 3),
                                jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                          images)['params']
  rules.check_experts(params, shape)
  tx, _ = optimizers.create_optimizer(**config.optimizer.to_dict(), total_steps=1_000_000)
  opt_state = jax.eval_shape(tx.init, params)
  param_specs = rules.partition_specs(params, shape, fsdp=fsdp)
  opt_specs = rules.partition_specs(opt_state, shape, fsdp=fsdp)
  batch = config.dataset.train.batch_size / devices
  per_device = {
      'params': rules.bytes_per_device(params, param_specs, shape),
      'optimizer': rules.bytes_per_device(opt_state, opt_specs, shape),
      'gradients': rules.bytes_per_device(params, param_specs, shape),
      'activations': int(activation_bytes(model_config, batch, image_size)),
  }
  per_device['total'] = sum(per_device.values())
  expert = sum(math.prod(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if '/Moe/Mlp/' in '/' + rules.path_of(p) + '/')
  return {
      'num_params': int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
      'num_expert_params': int(expert),
      'mesh': shape,
      'batch_per_device': batch,
      'per_device_bytes': per_device,
      'total_bytes': {'params': _bytes(params), 'optimizer': _bytes(opt_state)},
  }


def format_plan(p: dict) -> str:
  gib = lambda b: f'{b / 2**30:.2f} GiB'
  lines = [f'{p["num_params"] / 1e9:.3f}B parameters ({p["num_expert_params"] / 1e9:.3f}B '
           f'in experts) on mesh {p["mesh"]}, {p["batch_per_device"]:g} images per device',
           'per device: ' + ', '.join(f'{k} {gib(v)}' for k, v in
                                      p['per_device_bytes'].items())]
  return '\n'.join(lines)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  p = plan(f.config, f.mesh, image_size=f.image_size, fsdp=f.fsdp)
  print(json.dumps(p) if f.json else format_plan(p), flush=True)


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from vmoe import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file of the model to plan.')
  flags.DEFINE_string('mesh', 'data:1', 'Mesh, e.g. data:16,expert:32.')
  flags.DEFINE_integer('image_size', 224, 'Square image size of the train inputs.')
  flags.DEFINE_bool('fsdp', False, "Also shard non-expert params over 'data'.")
  flags.DEFINE_bool('json', False, 'Print one JSON object.')
  cli.run(main, required=('config',))
