"""Mesh shapes, sharding rules and the dry-run planner (abstract shapes only)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from vmoe import plan as plan_lib
from vmoe.configs import common
from vmoe.nn import models
from vmoe.parallel import rules

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
P = jax.sharding.PartitionSpec


def test_mesh_shape():
  assert rules.mesh_shape('data:-1,expert:4', 8) == {'data': 2, 'expert': 4}
  assert rules.mesh_shape({'data': 8}, 8) == {'data': 8}
  for spec, message in [('data:3,expert:4', 'has 12 devices but there are 8'),
                        ('data:-1,expert:-1', 'at most one of them -1'),
                        ('data:-1,expert:3', '8 devices are not a multiple of 3'),
                        ('data=8', "Bad mesh item 'data=8'")]:
    with pytest.raises(ValueError, match=message):
      rules.mesh_shape(spec, 8)


def _digits_params(num_experts=4):
  config = common.load_config(os.path.join(REPO, f'configs/digits.py:num_experts={num_experts}'))
  model = models.build_model(config.model, (8, 8))
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                        jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32))['params']


def test_experts_on_the_expert_axis_rest_replicated_or_fsdp():
  params = _digits_params()
  mesh = {'data': 2, 'expert': 4}
  specs = rules.partition_specs(params, mesh)
  moe = specs['Encoder']['encoderblock_1']['Moe']
  assert moe['Mlp']['Dense_0']['kernel'] == P('expert')
  assert moe['Mlp']['Dense_1']['bias'] == P('expert')
  assert moe['Router']['dense']['kernel'] == P()
  assert specs['head']['kernel'] == P()
  mlp = params['Encoder']['encoderblock_1']['Moe']['Mlp']
  total = sum(x.size * 4 for x in jax.tree.leaves(mlp))
  assert rules.bytes_per_device(mlp, moe['Mlp'], mesh) == total // 4
  fsdp = rules.partition_specs(params, mesh, fsdp=True)
  assert fsdp['Encoder']['encoderblock_0']['Mlp']['Dense_0']['kernel'] == P(None, 'data')
  assert fsdp['Encoder']['encoderblock_1']['Moe']['Mlp']['Dense_0']['kernel'] == P(
      'expert', None, 'data')


def test_experts_must_divide_the_expert_axis():
  config = common.load_config(os.path.join(REPO, 'configs/digits.py:num_experts=4'))
  with pytest.raises(ValueError, match=r"num_experts=4 is not divisible by the mesh's "
                     r"expert axis .* on 8 devices"):
    plan_lib.plan(config, 'data:1,expert:8', image_size=8)


def test_15b_plan():
  config = common.load_config(os.path.join(REPO, 'configs/vmoe_15b.py'))
  p = plan_lib.plan(config, 'data:16,expert:32')
  assert abs(p['num_params'] / 14.7e9 - 1) < 0.02
  dense = p['total_bytes']['params'] - 4 * p['num_expert_params']
  assert p['per_device_bytes']['params'] == dense + 4 * p['num_expert_params'] // 32
  assert p['per_device_bytes']['gradients'] == p['per_device_bytes']['params']
  assert p['batch_per_device'] == 4096 / 512
  assert p['per_device_bytes']['total'] == sum(
      v for k, v in p['per_device_bytes'].items() if k != 'total')


def test_plan_cli_json():
  out = subprocess.run(
      [sys.executable, '-m', 'vmoe.plan', '--config=configs/digits.py', '--mesh=data:2',
       '--image_size=8', '--json'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  p = json.loads(out.stdout.strip().splitlines()[-1])
  assert p['num_params'] == 136_522 + 2 * 7 * (64 * 128 + 128 * 64 + 128 + 64) + 2 * 64 * 8
  assert p['per_device_bytes']['params'] == 4 * p['num_params']


@pytest.mark.parametrize('flag, message', [
    # Caught in main: the digits config's 8 experts on an expert axis of 3.
    ('--mesh=data:1,expert:3', "num_experts=8 is not divisible by the mesh's expert axis"),
    # Caught while parsing the flags: an override of a key the config lacks.
    ('--config.trian_steps=3', "Unknown config key 'trian_steps'"),
])
def test_plan_cli_bad_input_is_one_line_and_status_2(flag, message):
  out = subprocess.run(
      [sys.executable, '-m', 'vmoe.plan', '--config=configs/digits.py', '--image_size=8',
       flag], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, out.stderr[-2000:]


def test_e3_activations_count_the_members_copies():
  """E3 with MoE from block 0: every block holds M copies, so twice a plain V-MoE's."""
  def config(**moe):
    return dict(name='VisionTransformerMoe', num_classes=10, patch_size=(4, 4),
                hidden_size=16, encoder=dict(num_layers=2, mlp_dim=32, num_heads=2, moe=dict(
                    layers=(0, 1), num_experts=4, group_size=40, **moe, router=dict(
                        num_selected_experts=1, dispatcher=dict(capacity_factor=1.0)))))
  e3 = dict(config(ensemble_size=2), name='VisionTransformerMoeEnsemble')
  plain = config()
  plain['encoder']['moe']['group_size'] = 20
  a, b = (plan_lib.activation_bytes(models.resolve(c, image_size=(8, 8)), 4) for c in (e3, plain))
  assert a == 2 * b


def test_segmenter_activations_count_its_decoder():
  """The decoder's feature maps and per-pixel logits come on top of the encoder's; a
  wider fpn keeps more."""
  def spec(decoder):
    return models.resolve(dict(
        num_classes=11, patch_size=(4, 4), hidden_size=16, classifier='gap',
        decoder=decoder, encoder=dict(num_layers=2, mlp_dim=32, num_heads=2)),
        image_size=(16, 16))
  encoder = plan_lib.activation_bytes(spec(None), 4)
  linear = plan_lib.activation_bytes(spec({'name': 'linear'}), 4)
  # Logits at the input size and their softmax, and the 4x4 grid's logits, per image.
  assert linear - encoder == 4 * 4 * (2 * 16 * 16 * 11 + 16 * 11)
  fpn = [plan_lib.activation_bytes(spec({'name': 'fpn', 'layers': (0,), 'dim': d,
                                                      'pool_scales': (1, 2)}), 4)
         for d in (8, 16)]
  assert linear < fpn[0] < fpn[1]


def test_plan_of_a_segmenter_takes_labels_per_pixel():
  config = common.load_config(os.path.join(REPO, 'configs/digits_seg.py'))
  p = plan_lib.plan(config, 'data:1', image_size=32)
  spec = models.resolve(config.model, image_size=(32, 32))
  assert p['per_device_bytes']['activations'] == int(
      plan_lib.activation_bytes(spec, config.dataset.train.batch_size))
  assert p['num_params'] == sum(x.size for x in jax.tree.leaves(models.param_shapes(spec)))
