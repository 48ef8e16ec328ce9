"""The reference's own config files build as they are, with the reference's param trees.

tests/fixtures/reference_configs/*.json (see its README) hold `config.model` of four of
google-research/vmoe's config files and the param tree the reference builds for each.
"""
import glob
import json
import os

import pytest

from flax import traverse_util

import vmoe
from vmoe.nn import models

FIXTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'fixtures',
                                         'reference_configs', '*.json')))


def _load(path):
  with open(path) as f:
    return json.load(f)


@pytest.mark.parametrize('path', FIXTURES, ids=os.path.basename)
def test_reference_config_builds_the_reference_param_tree(path):
  ref = _load(path)
  model = vmoe.build_model(ref['model'], image_size=(ref['image_size'],) * 2)
  shapes = traverse_util.flatten_dict(models.param_shapes(model.spec), sep='/')
  assert {k: list(v.shape) for k, v in shapes.items()} == ref['reference_param_shapes']


def test_reference_options_without_effect_are_reported():
  ref = _load(next(p for p in FIXTURES if p.endswith('pretrain_jft4b.json')))
  spec = models.resolve(ref['model'], image_size=(224, 224))
  assert spec.encoder.moe.inert == (
      'model.encoder.moe.router.partition_spec: sharding comes from config.mesh: the MoE '
      'layer pins the groups and the expert buffers to the mesh itself',)
  assert spec.encoder.moe.bfloat16  # The reference's Soft MoE always dispatches in bf16.
  assert dict(spec.encoder.moe.options)['compute_similarity_metrics'] is False


def test_reference_moe_dropout_is_the_experts_dropout():
  ref = _load(next(p for p in FIXTURES if 'light1' in p))
  spec = models.resolve(ref['model'], image_size=(224, 224))
  assert spec.encoder.moe.dropout_rate == 0.2
  assert spec.encoder.dropout_rate == 0.0


def _paper_model(variant, patch, where, num, image_size, num_classes=1000):
  """config.model in the schema of the reference's vmoe_paper configs, for 'ViT-{variant}/
  {patch}, E=8, K=2, {where} {num}' (the widths of its S, B, L and H variants)."""
  i = 'SBLH'.index(variant)
  hidden, layers = [512, 768, 1024, 1280][i], [8, 12, 24, 32][i]
  moe_layers = (list(range(num - 1, layers, num)) if where == 'Every'
                else list(range(1, layers, 2))[-num:])
  return {
      'name': 'VisionTransformerMoe', 'num_classes': num_classes, 'patch_size': [patch] * 2,
      'hidden_size': hidden, 'classifier': 'token', 'representation_size': hidden,
      'head_bias_init': -6.9, 'encoder': {
          'num_layers': layers, 'mlp_dim': [2048, 3072, 4096, 5120][i],
          'num_heads': [8, 12, 16, 16][i], 'dropout_rate': 0.0,
          'attention_dropout_rate': 0.0, 'moe': {
              'num_experts': 8, 'layers': moe_layers, 'dropout_rate': 0.0,
              'split_rngs': False,
              'group_size': 8 * ((image_size // patch) ** 2 + 1), 'router': {
                  'num_selected_experts': 2, 'noise_std': 1.0,
                  'importance_loss_weight': 0.005, 'load_loss_weight': 0.005,
                  'dispatcher': {'name': 'einsum', 'bfloat16': True,
                                 'capacity_factor': 1.05,
                                 'partition_spec': [['expert', 'replica']],
                                 'batch_priority': False}}}}}


@pytest.mark.parametrize('variant,patch,where,num,image_size', [
    ('B', 32, 'Every', 2, 224), ('L', 16, 'Every', 2, 224), ('L', 16, 'Last', 2, 384),
    ('H', 14, 'Every', 2, 224)])
def test_other_paper_configs_build(variant, patch, where, num, image_size):
  config = _paper_model(variant, patch, where, num, image_size)
  spec = models.resolve(config, image_size=(image_size, image_size))
  shapes = traverse_util.flatten_dict(models.param_shapes(spec), sep='/')
  moe_layers = config['encoder']['moe']['layers']
  kernel = shapes[f'Encoder/encoderblock_{moe_layers[-1]}/Moe/Mlp/Dense_0/kernel']
  assert kernel.shape == (8, config['hidden_size'], config['encoder']['mlp_dim'])
  assert f'Encoder/encoderblock_{moe_layers[-1]}/Moe/Router/dense/kernel' in shapes


def test_e3_config_builds_the_e3_model():
  ref = _load(next(p for p in FIXTURES if 'eee' in p))
  model = vmoe.build_model(ref['model'], image_size=(ref['image_size'],) * 2)
  assert model.spec.ensemble_size == 2 and model.spec.encoder.moe.num_experts == 8
  # ref['batch_size'] images fill whole groups (with their 2 copies each).
  assert model.spec.groups(ref['batch_size']) >= 1
