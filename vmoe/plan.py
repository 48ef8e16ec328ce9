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
magnitude, not a bound. A segmenter's decoder adds its own estimate per image
(vmoe.nn.decoders.activations_per_image: its feature maps and the logits at the input
size with their softmax), and its train batches carry labels per pixel [B, H, W].
"""
import dataclasses
import json
import math
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from vmoe import cli
from vmoe.nn import decoders
from vmoe.nn import moe as moe_lib
from vmoe.nn import spec as spec_lib
from vmoe.parallel import rules
from vmoe.utils import checks
from vmoe.utils import paths


def _bytes(tree) -> int:
  return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def activation_bytes(spec: spec_lib.ModelSpec, batch_per_device: float) -> float:
  """The estimate of the module docstring, in bytes, for a model resolved for its images."""
  enc, d, t = spec.encoder, spec.hidden_size, spec.tokens_per_image
  h, moe = enc.mlp_dim, enc.moe
  # Buffer slots per token: K x the capacity factor (Soft MoE: its own factor).
  slots = moe.num_selected_experts * (moe.capacity_rule.factor or 1.0) if moe else 0
  # E3: each block from the first MoE block on holds its M copies' activations.
  copies = [spec.copies_at(i) for i in range(enc.num_layers)]
  full = [c * (10 * d + enc.num_heads * t + (slots * (2 * h + 2 * d) if enc.moe_at(i)
                                              else 2 * h))
          for i, c in enumerate(copies)]
  if enc.remat in ('none', 'dots'):
    per_token = sum(full)
  else:
    kept = [c * (d if enc.remat == 'full' else
                 (5 * d + moe.num_experts if enc.moe_at(i) else 6 * d + h))
            for i, c in enumerate(copies)]
    per_token = sum(kept) + max(full)
  head = decoders.activations_per_image(spec) if spec.segmenter else 0
  return 4.0 * batch_per_device * (t * per_token + head)


def plan(config, mesh, *, image_size: int = 224, fsdp: bool = False) -> dict:
  """{'num_params', 'num_expert_params', 'mesh', 'batch_per_device', 'per_device_bytes':
  {'params', 'optimizer', 'gradients', 'activations', 'total'}, 'total_bytes': {...}}.

  mesh: {axis: size} or 'data:16,expert:32', every size given (the devices planned for).
  The config is resolved for that many devices (batch and MoE groups per device checked)
  and its model for square images of `image_size`."""
  # Here: vmoe.train loads TensorFlow, whose start-up lines main() sends to the log file.
  # pylint: disable=g-import-not-at-top
  from vmoe.train import config as config_lib
  from vmoe.train import trainer
  # pylint: enable=g-import-not-at-top
  mesh = rules.parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
  if any(v == -1 for v in mesh.values()):
    raise ValueError(f'Mesh {mesh}: give every axis a size to plan for (no -1).')
  shape = rules.mesh_shape(mesh, math.prod(mesh.values()))
  c = {**checks.to_dict(config), 'mesh': shape, 'fsdp': fsdp}
  run = config_lib.resolve(c, num_devices=math.prod(shape.values()))
  train = run.entry('dataset.train')
  batch = train.config.batch_size
  labels = ((batch, image_size, image_size) if run.model.segmenter
            else (batch, run.model.num_classes))
  run = config_lib.with_inputs(run, {'dataset.train': {
      'image': (batch, image_size, image_size, 3), 'labels': labels}})
  # The schedule's length does not change a shape (train_epochs runs have no steps yet).
  p = trainer.parts(dataclasses.replace(run, train_steps=run.train_steps or sys.maxsize))
  params, opt_state = p.abstract_state.params, p.abstract_state.opt_state
  param_specs = rules.partition_specs(params, shape, fsdp=fsdp)
  opt_specs = rules.partition_specs(opt_state, shape, fsdp=fsdp)
  per_device = {
      'params': rules.bytes_per_device(params, param_specs, shape),
      'optimizer': rules.bytes_per_device(opt_state, opt_specs, shape),
      'gradients': rules.bytes_per_device(params, param_specs, shape),
      'activations': int(activation_bytes(run.entry('dataset.train').model,
                                          train.images_per_device)),
  }
  per_device['total'] = sum(per_device.values())
  expert = sum(math.prod(x.shape) for name, x in paths.flat(params).items()
               if moe_lib.is_expert_param(name))
  return {
      'num_params': int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
      'num_expert_params': int(expert),
      'mesh': shape,
      'batch_per_device': batch / math.prod(shape.values()),
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
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  cli.log_to_file('plan')
  p = plan(f.config, f.mesh, image_size=f.image_size, fsdp=f.fsdp)
  print(json.dumps(p) if f.json else format_plan(p), flush=True)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Config file of the model to plan.')
  flags.DEFINE_string('mesh', 'data:1', 'Mesh, e.g. data:16,expert:32.')
  flags.DEFINE_integer('image_size', 224, 'Square image size of the train inputs.')
  flags.DEFINE_bool('fsdp', False, "Also shard non-expert params over 'data'.")
  flags.DEFINE_bool('json', False, 'Print one JSON object.')
  cli.run(main, required=('config',))
