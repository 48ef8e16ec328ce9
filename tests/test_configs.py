"""Every config in configs/ is valid, and a shrunk copy of its model trains one
step on random data of the right shapes (and, if the config changes the model
for evaluation, evaluates one padded batch with it).
"""
import glob
import os

import jax
import numpy as np
import pytest
from vmoe.configs import common
from vmoe.nn import models
from vmoe.nn import routers
from vmoe.parallel import mesh as mesh_lib
from vmoe.train import config_checks
from vmoe.train import evaluator
from vmoe.train import losses
from vmoe.train import optimizers
from vmoe.train import train_state as train_state_lib
from vmoe.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
P = jax.sharding.PartitionSpec


def shrink(model_config, tokens: int) -> dict:
  """Same model kind and options, tiny sizes: 2 blocks of width 16, MoE in 1."""
  overrides = {'hidden_size': 16, 'encoder.num_layers': 2, 'encoder.mlp_dim': 32,
               'encoder.num_heads': 2, 'encoder.moe.layers': (1,),
               'encoder.moe.group_size': 8 * tokens}
  if model_config.get('representation_size'):
    overrides['representation_size'] = 16
  return models.apply_overrides(model_config, overrides)


def test_there_are_configs():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {'digits.py', 'vmoe_s32_last2_ilsvrc2012.py',
          'vmoe_b16_every2_imagenet21k.py'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_trains_one_step_on_fake_data(path):
  config = common.load_config(path)
  if config.get('initialization') and not config.initialization.path:
    # Fine-tuning configs name their checkpoint on the command line; the config
    # checks do not open it (a resumed run must not need it).
    config.initialization.path = '/path/to/checkpoint'
  config_checks.check_config(config, num_devices=jax.device_count())
  assert config.model.encoder.moe.layers  # Every config here is a V-MoE.
  n = jax.device_count()
  patch = config.model.patch_size[0]
  tokens = 4 + (config.model.get('classifier', 'token') == 'token')
  b, hw, c = 8 * n, 2 * patch, config.model.num_classes
  model_config = shrink(config.model, tokens)
  eval_config = config.to_dict()
  eval_config['model'] = model_config
  model = models.build_model(model_config)
  eval_model = models.build_model(config_checks.eval_model_config(eval_config))
  tx, schedule = optimizers.create_optimizer(**config.optimizer.to_dict(),
                                             total_steps=100_000)
  loss_fn = losses.LOSSES[config.loss.name]

  mesh = mesh_lib.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, P())
  batch_sharding = jax.sharding.NamedSharding(mesh, P('data'))
  init_fn = train_state_lib.make_init_fn(model, tx, image_shape=(8, hw, hw, 3),
                                         seed=config.seed)
  state_sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(init_fn))
  state = jax.jit(init_fn, out_shardings=state_sharding)()

  rng = np.random.default_rng(0)
  batch = mesh_lib.global_batch({
      'image': rng.uniform(-1, 1, (b, hw, hw, 3)).astype(np.float32),
      'labels': np.eye(c, dtype=np.float32)[rng.integers(0, c, b)]},
      batch_sharding)
  train_step = jax.jit(
      trainer.make_train_step(
          model, tx, schedule, loss_fn, seed=config.seed,
          rng_names=config.extra_rng_keys,
          mixup_config=config.mixup.to_dict() if config.get('mixup') else None,
          num_shards=n),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  state, metrics = train_step(state, batch)
  assert int(state.step) == 1
  assert np.isfinite(float(metrics['loss'])) and float(metrics['auxiliary_loss']) >= 0
  assert any(k.startswith('encoderblock_1/') for k in metrics)

  if not config.evaluate.get('model_overrides'):
    return  # The eval model is the trained one; test_main.py evaluates it.
  valid = np.arange(b) < b - 3  # A padded batch.
  eval_batch = mesh_lib.global_batch(
      {**jax.device_get(batch), '__valid__': valid}, batch_sharding)
  eval_step = evaluator.make_eval_step(eval_model, loss_fn,
                                       params_sharding=state_sharding.params,
                                       batch_sharding=batch_sharding)
  result = evaluator.evaluate(eval_step, state.params, [eval_batch],
                              num_examples=b - 3)
  assert result['num_examples'] == b - 3
  assert np.isfinite(result['loss']) and 0 <= result['prec@1'] <= 1


@pytest.mark.parametrize('router', sorted(routers.ROUTERS))
def test_digits_accepts_every_router(router):
  config = common.load_config(
      os.path.join(REPO, 'configs', 'digits.py') + f':router={router},k=1')
  config_checks.check_config(config)
  assert config.model.encoder.moe.router.name == router
  models.check_input(config.model, 128, (8, 8))


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_argument_rejects_unknown_keys(path):
  with pytest.raises(ValueError, match=r"Bad config argument 'nope=1'.*key in"):
    common.load_config(f'{path}:nope=1')


def test_parse_arg_types():
  defaults = dict(router='A', num_experts=8, capacity_factor=1.0)
  assert common.parse_arg('router=B,capacity_factor=2', defaults) == dict(
      router='B', num_experts=8, capacity_factor=2.0)
  with pytest.raises(ValueError, match="num_experts='x' must be of type int"):
    common.parse_arg('num_experts=x', defaults)
