"""Every config in configs/ is valid, and a shrunk copy of its model trains one
step on random data of the right shapes (and, if the config changes the model
for evaluation, evaluates one padded batch with it).
"""
import dataclasses
import glob
import json
import os

import jax
import numpy as np
import pytest
from vmoe.configs import common
from vmoe.nn import models
from vmoe.nn import routers
from vmoe.parallel import mesh as mesh_lib
from vmoe.train import config as config_lib
from vmoe.train import evaluator
from vmoe.train import trainer
from vmoe.utils import dotted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def shrink(config: dict, tokens: int, batch_size: int) -> dict:
  """Same model kind and options, tiny sizes: 2 blocks of width 16, MoE in 1; every
  dataset's batch `batch_size`."""
  model = {'hidden_size': 16, 'encoder.num_layers': 2, 'encoder.mlp_dim': 32,
           'encoder.num_heads': 2, 'encoder.moe.layers': (1,),
           'encoder.moe.group_size': 8 * tokens}
  if config['model'].get('representation_size'):
    model['representation_size'] = 16
  if (config['model'].get('decoder') or {}).get('layers'):
    model.update({'decoder.layers': (0,), 'decoder.dim': 8, 'decoder.pool_scales': (1, 2)})
  values = {f'model.{k}': v for k, v in model.items()}
  values.update({f'dataset.{k}.batch_size': batch_size for k in config['dataset']})
  if config.get('fewshot'):
    values.update({f'fewshot.{k}.batch_size': batch_size for k in ('train', 'test')})
  return dotted.with_values(config, values)


def test_there_are_configs():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {'digits.py', 'vmoe_s32_last2_ilsvrc2012.py',
          'vmoe_b16_every2_imagenet21k.py'} <= names


def _argument(path, tmp_path) -> str:
  """The argument a config needs to load: Mobile V-MoE its super-class file."""
  if os.path.basename(path) != 'mobile_vmoe_ti16_ilsvrc2012.py':
    return ''
  table = tmp_path / 'superclasses.json'
  table.write_text(json.dumps({'superclass_of_class': [c % 10 for c in range(1000)]}))
  return f':superclasses={table}'


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_trains_one_step_on_fake_data(path, tmp_path):
  config = common.load_config(path + _argument(path, tmp_path)).to_dict()
  if config.get('initialization') and not config['initialization']['path']:
    # Fine-tuning configs name their checkpoint on the command line; the config
    # checks do not open it (a resumed run must not need it).
    config['initialization']['path'] = '/path/to/checkpoint'
  assert config_lib.resolve(config, num_devices=jax.device_count()).model.encoder.moe
  n = jax.device_count()  # Every config here is a V-MoE (above).
  patch = config['model']['patch_size'][0]
  tokens = 4 + (config['model'].get('classifier', 'token') == 'token')
  b, hw, c = 8 * n, 2 * patch, config['model']['num_classes']
  segmenter = bool(config['model'].get('decoder'))
  labels = (b, hw, hw) if segmenter else (b, c)  # Class ids per pixel, or one-hot.
  run = config_lib.resolve(shrink(config, tokens, b), num_devices=n)
  run = config_lib.with_inputs(run, {d.name: {'image': (b, hw, hw, 3), 'labels': labels}
                                     for d in run.data})
  # train_epochs configs get their steps from the dataset's size (with_data).
  run = dataclasses.replace(run, train_steps=run.train_steps or 100_000)
  program = trainer.build(run)  # What the trainer compiles, with the config's mesh.
  state = jax.jit(program.parts.init_fn, out_shardings=program.state_sharding)()

  rng = np.random.default_rng(0)
  batch = mesh_lib.global_batch({
      'image': rng.uniform(-1, 1, (b, hw, hw, 3)).astype(np.float32),
      'labels': (rng.integers(0, c, labels).astype(np.int32) if segmenter
                 else np.eye(c, dtype=np.float32)[rng.integers(0, c, b)])},
      program.batch_sharding)
  with jax.set_mesh(program.mesh):
    state, metrics = program.train_step(state, batch)
  assert int(state.step) == 1
  assert np.isfinite(float(metrics['loss'])) and float(metrics['auxiliary_loss']) >= 0
  assert any(k.startswith('encoderblock_1/') for k in metrics)

  if not config['evaluate'].get('model_overrides'):
    return  # The eval model is the trained one; test_main.py evaluates it.
  valid = np.arange(b) < b - 3  # A padded batch.
  eval_batch = mesh_lib.global_batch(
      {**jax.device_get(batch), '__valid__': valid}, program.batch_sharding)
  with jax.set_mesh(program.mesh):
    result = evaluator.evaluate(program.eval_steps[run.evals[0].name], state.params,
                                [eval_batch], num_examples=b - 3)
  assert result['num_examples'] == b - 3
  assert np.isfinite(result['loss']) and 0 <= result['prec@1'] <= 1


@pytest.mark.parametrize('router', sorted(routers.ROUTERS))
def test_digits_accepts_every_router(router):
  config = common.load_config(
      os.path.join(REPO, 'configs', 'digits.py') + f':router={router},k=1')
  run = config_lib.resolve(config)
  assert run.model.encoder.moe.router == router
  models.resolve(config.model, image_size=(8, 8)).groups(128)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_argument_rejects_unknown_keys(path):
  with pytest.raises(ValueError, match=r"Bad config argument 'nope=1'.*key in"):
    common.load_config(f'{path}:nope=1')


def test_mobile_vmoe_configs():
  """The paper's ViT-Tiny Mobile V-MoE and its dense baseline (one file)."""
  path = os.path.join(REPO, 'configs', 'mobile_vmoe_ti16_ilsvrc2012.py')
  with pytest.raises(ValueError, match='needs a super-class file'):
    common.load_config(path)
  dense = models.resolve(common.load_config(f'{path}:router=dense').model,
                         image_size=(224, 224))
  assert (dense.encoder.num_layers, dense.hidden_size, dense.encoder.num_heads,
          dense.encoder.mlp_dim, dense.patch_size, dense.tokens_per_image,
          dense.encoder.moe) == (12, 192, 3, 768, (16, 16), 197, None)
  config = common.load_config(f'{path}:router=per_image')
  spec = models.resolve(config.model, image_size=(224, 224))
  moe = spec.encoder.moe
  assert (spec.encoder.moe_layers, moe.num_experts, moe.num_selected_experts,
          moe.model_router) == ((10, 11), 10, 1, True)
  eval_moe = models.resolve(config.model, image_size=(224, 224), overrides=dotted.flatten(
      config.evaluate.model_overrides.to_dict())).encoder.moe
  assert eval_moe.chosen_experts == 'always'


def test_parse_arg_types():
  defaults = dict(router='A', num_experts=8, capacity_factor=1.0)
  assert common.parse_arg('router=B,capacity_factor=2', defaults) == dict(
      router='B', num_experts=8, capacity_factor=2.0)
  with pytest.raises(ValueError, match="num_experts='x' must be of type int"):
    common.parse_arg('num_experts=x', defaults)


def test_digits_takes_the_router_options_from_the_command_line():
  """The keys the docs name for --config.KEY=VALUE exist, typed (ml_collections refuses
  an override of a key that is absent or of another type)."""
  config = common.load_config(os.path.join(REPO, 'configs', 'digits.py'))
  moe = config.model.encoder.moe
  moe.dropout_rate = 0.1
  moe.router.z_loss_weight = 0.001
  moe.router.load_balancing = 'bias'
  moe.router.importance_loss_weight = 0.0
  moe.router.load_loss_weight = 0.0
  spec = config_lib.resolve(config).model.encoder.moe
  assert spec.dropout_rate == 0.1 and spec.bias_balancing
  assert spec.option('z_loss_weight') == 0.001 and spec.option('load_loss_weight') == 0.0


@pytest.mark.parametrize('variant', sorted(common.ROUTER_VARIANTS))
def test_digits_router_variants_resolve(variant):
  config = common.load_config(
      os.path.join(REPO, 'configs', 'digits.py') + f':router={variant}')
  models.resolve(config.model, image_size=(8, 8))
