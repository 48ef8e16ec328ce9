"""Run by test_sharding.py in a subprocess with 8 fake CPU devices: a tiny V-MoE's loss
and gradients on meshes vs one device, for three routers; prints one JSON object.

One process for everything, so that JAX starts once with 8 devices while the rest of
the suite keeps its single device.
"""
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vmoe.configs import common
from vmoe.nn import models
from vmoe.parallel import mesh as mesh_lib
from vmoe.train import losses
from vmoe.train import step as step_lib
from vmoe.train import train_state as train_state_lib

P = jax.sharding.PartitionSpec
ROUTERS = ('top_k', 'expert_choice', 'soft')
MESHES = {'data8': {'data': 8}, 'data2_expert4': {'data': 2, 'expert': 4},
          'expert8': {'expert': 8}}
B, E = 16, 8  # 16 images of 16 tokens, one image per group: 2 groups per device.
IMAGE = (8, 8, 3)


def model_config(router: str, num_layers: int = 1, chosen_experts=None, **encoder) -> dict:
  """One MoE block; or with num_layers=4 (and scan=True), MoE in blocks 1 and 3 (the
  last 2 for per-image routing). chosen_experts: the per-image dispatcher option."""
  layers = (0,) if num_layers == 1 else tuple(range(1, num_layers, 2))
  moe = common.moe_config(router, layers=layers, num_layers=num_layers, num_experts=E,
                          group_size=16, num_selected_experts=2, capacity_factor=1.0)
  if chosen_experts is not None:
    moe.router.dispatcher.chosen_experts = chosen_experts
  ensemble = router == 'e3'  # Groups of one image's 2 copies.
  moe.group_size *= 2 if ensemble else 1
  return dict(name='VisionTransformerMoeEnsemble' if ensemble else 'VisionTransformerMoe',
              num_classes=10, patch_size=(2, 2),
              hidden_size=16, classifier='gap', representation_size=None,
              head_kernel_zero_init=False,
              encoder=dict(num_layers=num_layers, mlp_dim=32, num_heads=1,
                           moe=moe.to_dict(), **encoder))


def is_moe_block(v) -> bool:
  return isinstance(v, dict) and 'Moe' in v


def random_params(model, seed: int):
  """Params of the model's shapes, drawn with numpy: no init to compile (the checks
  compare the same params on different meshes, whatever their values)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1,) + IMAGE), train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(x.dtype),
                      shapes['params'])


def loss_fn(model):
  def loss(params, batch):
    rngs = {'gating': jax.random.PRNGKey(1), 'dropout': jax.random.PRNGKey(2)}
    logits, metrics = model.apply({'params': params}, batch['image'], train=True,
                                  rngs=rngs)
    m = model.spec.ensemble_size  # E3: each member's cross-entropy.
    loss = losses.Loss('ensemble_softmax_xent' if m > 1 else 'softmax_xent', m)
    xent = jnp.mean(loss.train(logits, batch['labels']))
    return xent + jnp.mean(metrics['auxiliary_loss'])
  return jax.value_and_grad(loss)


def max_rel_diff(a, b) -> float:
  """max |a - b| / max(1, max |a|) over a tree."""
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             / max(1.0, float(np.max(np.abs(np.asarray(x)))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(B,) + IMAGE).astype(np.float32),
           'labels': np.eye(10, dtype=np.float32)[rng.integers(0, 10, B)]}
  out = {}
  # (router, model config, meshes): every router on every mesh; and the scanned
  # encoder (weights [L, E, ...] of the MoE blocks under Encoder/scan_0_2x2) on one.
  # Mobile V-MoE (one router for 2 MoE blocks) with capacity buffers and with each
  # image's chosen experts' weights gathered to it.
  cases = [(r, model_config(r), MESHES) for r in ROUTERS] + [
      ('scanned_top_k', model_config('top_k', num_layers=4, scan=True),
       {'data2_expert4': MESHES['data2_expert4']})] + [
      (f'per_image_{"chosen" if c else "buffers"}',
       model_config('per_image', num_layers=4, chosen_experts=c),
       {'data2_expert4': MESHES['data2_expert4']}) for c in (False, True)] + [
      # E3: 2 members of 4 experts each, the batch repeated before block 1.
      ('e3', model_config('e3', num_layers=4), {'data2_expert4': MESHES['data2_expert4']})]
  for router, config, meshes in cases:
    model = models.build_model(config, IMAGE[:2])
    params = random_params(model, seed=1)
    ref_loss, ref_grads = jax.jit(loss_fn(model))(params, batch)
    for name, spec in meshes.items():
      mesh = mesh_lib.make_mesh(spec)
      sharded_model = model.clone(moe_sharding=mesh_lib.moe_sharding(mesh))
      param_sharding = mesh_lib.state_sharding(mesh, params)
      batch_sharding = jax.sharding.NamedSharding(mesh, mesh_lib.batch_spec(mesh))
      p = jax.device_put(params, param_sharding)
      x = mesh_lib.global_batch(batch, batch_sharding)
      f = jax.jit(loss_fn(sharded_model), in_shardings=(param_sharding, batch_sharding),
                  out_shardings=(None, param_sharding)).lower(p, x).compile()
      loss, grads = f(p, x)
      hlo = f.as_text()
      experts = [v['Moe']['Mlp'] for v in jax.tree.leaves(p['Encoder'], is_leaf=is_moe_block)
                 if is_moe_block(v)]
      assert experts, 'no MoE block found'
      out[f'{router}/{name}'] = {
          'loss': float(loss), 'ref_loss': float(ref_loss),
          'grads_max_rel_diff': max_rel_diff(ref_grads, grads),
          'all_to_all': len(re.findall(r'\ball-to-all(-start)?\(', hlo)),
          # Bytes each device holds of each expert weight, vs the whole weight.
          'expert_bytes': sorted({(int(s.data.nbytes), int(x.nbytes))
                                  for x in jax.tree.leaves(experts)
                                  for s in x.addressable_shards}),
          'grads_follow_params': all(
              g.sharding.is_equivalent_to(s, g.ndim) for g, s in zip(
                  jax.tree.leaves(grads), jax.tree.leaves(param_sharding))),
      }
  out['train_step'] = train_step_shardings(batch)
  print(json.dumps(out))


def train_step_shardings(batch) -> dict:
  """One real train step (Adam) on data 2 x expert 4: where the state lives after it."""
  model = models.build_model(model_config('top_k'), IMAGE[:2])
  tx = optax.adam(1e-3)
  mesh = mesh_lib.make_mesh({'data': -1, 'expert': 4})
  params = random_params(model, seed=2)
  state = train_state_lib.TrainState(step=np.zeros((), np.int32), params=params,
                                     opt_state=tx.init(params))
  state_sharding = mesh_lib.state_sharding(mesh, state)
  batch_sharding = jax.sharding.NamedSharding(mesh, mesh_lib.batch_spec(mesh))
  step = jax.jit(step_lib.make_train_step(
      model.clone(moe_sharding=mesh_lib.moe_sharding(mesh)), tx, lambda s: 1e-3,
      losses.Loss('softmax_xent'), seed=0, rng_names=('gating',), mixup_config=None,
      num_shards=8), in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, None))
  state = jax.device_put(state, state_sharding)
  state, metrics = step(state, mesh_lib.global_batch(batch, batch_sharding))
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {'loss': float(metrics['loss']),
          'specs': {jax.tree_util.keystr(k): str(x.sharding.spec) for k, x in leaves},
          'shard_shapes': {jax.tree_util.keystr(k): list(x.addressable_shards[0].data.shape)
                           for k, x in leaves}}


if __name__ == '__main__':
  assert jax.device_count() == 8, (jax.devices(), os.environ.get('XLA_FLAGS'))
  sys.exit(main())
