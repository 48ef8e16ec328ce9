"""Run by test_restore_mesh.py in subprocesses with 8 fake CPU devices.

  restore_mesh_worker.py save WORKDIR     # data 2 x expert 4: save, print the arrays
  restore_mesh_worker.py restore WORKDIR  # onto expert 8, data 8 (fsdp), one device

Each prints one JSON object. Saving and restoring are separate processes, as
they are when a run resumes on other hardware: nothing is shared but the files.
"""
import json
import os
import sys

import jax
import numpy as np
import optax

from vmoe.checkpoints import training
from vmoe.configs import common
from vmoe.nn import models
from vmoe.parallel import mesh as mesh_lib
from vmoe.utils import paths
from vmoe.train import train_state as train_state_lib

E = 8
SAVED_AT = {'data': 2, 'expert': 4}
TARGETS = {'expert8': ({'expert': 8}, False), 'data8_fsdp': ({'data': 8}, True)}
STEP = 7


def init_fn():
  moe = common.moe_config('top_k', layers=(1,), num_layers=2, num_experts=E,
                          group_size=16, num_selected_experts=2, capacity_factor=1.0)
  model = models.build_model(dict(
      name='VisionTransformerMoe', num_classes=10, patch_size=(2, 2), hidden_size=16,
      classifier='gap', representation_size=None, head_kernel_zero_init=False,
      encoder=dict(num_layers=2, mlp_dim=32, num_heads=2, moe=moe.to_dict())), (8, 8))
  return train_state_lib.make_init_fn(model, optax.adam(1e-3), image_shape=(8, 8, 8, 3),
                                      seed=0)


def describe(state) -> dict:
  """{path: [spec (None: one device), shard shape, hex of the bytes]} of every leaf."""
  out = {}
  for path, x in paths.flat(state).items():
    spec = (list(x.sharding.spec) if isinstance(x.sharding, jax.sharding.NamedSharding)
            else None)
    out[path] = [spec, list(x.addressable_shards[0].data.shape),
                                np.asarray(x).tobytes().hex()]
  return out


def save(workdir: str) -> dict:
  init = init_fn()
  mesh = mesh_lib.make_mesh(SAVED_AT)
  sharding = mesh_lib.state_sharding(mesh, jax.eval_shape(init))
  state = jax.jit(init, out_shardings=sharding)()
  # Not the init values only: Adam's moments and the step must round-trip too.
  state = state.replace(step=state.step + STEP, opt_state=jax.tree.map(
      lambda x: x + 0.5 if x.dtype == np.float32 else x, state.opt_state))
  ckpt = training.TrainCheckpointer(workdir, every_steps=1, seed=0)
  ckpt.save(STEP, state)
  ckpt.close()
  return describe(state)


def restore(workdir: str) -> dict:
  init = init_fn()
  shapes = jax.eval_shape(init)
  ckpt = training.TrainCheckpointer(workdir, every_steps=1, seed=0)
  out = {}
  for name, (spec, fsdp) in TARGETS.items():
    sharding = mesh_lib.state_sharding(mesh_lib.make_mesh(spec), shapes, fsdp=fsdp)
    step, state = ckpt.restore_latest(jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, sharding))
    out[name] = {'step': step, 'leaves': describe(state)}
  one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
  state, meta = ckpt.restore(STEP, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), shapes))
  out['single_device'] = {'step': meta['step'], 'leaves': describe(state),
                          'devices': sorted({d.id for x in jax.tree.leaves(state)
                                             for d in x.devices()})}
  ckpt.close()
  return out


if __name__ == '__main__':
  assert jax.device_count() == 8, (jax.devices(), os.environ.get('XLA_FLAGS'))
  print(json.dumps({'save': save, 'restore': restore}[sys.argv[1]](sys.argv[2])))
