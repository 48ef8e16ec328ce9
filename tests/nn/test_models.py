"""Model configs: resolved once into a frozen spec; variants build and run; bad values fail
early with one clear message."""
import copy
import dataclasses

import numpy as np
import pytest

import jax

from vmoe.configs import common
from vmoe.nn import models
from vmoe.utils import dotted

BASE = {
    'num_classes': 5, 'patch_size': (4, 4), 'hidden_size': 16, 'classifier': 'token',
    'representation_size': None,
    'encoder': {
        'num_layers': 2, 'mlp_dim': 32, 'num_heads': 2,
        'moe': {'layers': (1,), 'num_experts': 4, 'group_size': 10,
                'router': {'num_selected_experts': 2, 'noise_std': 1.0,
                           'dispatcher': {'name': 'einsum', 'capacity_factor': 1.0}}},
    },
}
IMAGES = np.zeros((2, 8, 8, 3), np.float32)  # 4 patches (+ cls) per image.


def _config(**overrides):
  return dotted.with_values(copy.deepcopy(BASE), overrides)


def _build(config, image_size=(8, 8)):
  return models.build(models.resolve(config, image_size=image_size))


def test_placement_helpers():
  assert common.every_n(2, 12) == (1, 3, 5, 7, 9, 11)
  assert common.last_n(2, 8) == (5, 7)
  assert common.last_n(5, 32) == (23, 25, 27, 29, 31)


def test_resolve_never_edits_the_config_and_is_frozen():
  config = _config(**{'encoder.moe.router.name': 'PerImageRouter',
                      'encoder.moe.router.superclasses': (0, 1, 2, 3, 0)})
  before = copy.deepcopy(config)
  spec = models.resolve(config, image_size=(8, 8))
  assert config == before
  assert spec == models.resolve(config, image_size=(8, 8)) and hash(spec)
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.hidden_size = 3  # pytype: disable=not-writable
  assert spec.encoder.moe.superclasses == (0, 1, 2, 3, 0)


@pytest.mark.parametrize('router,options,capacity,token_slots', [
    # Token choice: S * K = 10 * 2 choices, cf 1 over 4 experts -> 5 -> 8 (multiple of 4).
    ('NoisyTopExpertsPerItemRouter', {}, 8, 8),
    # Expert choice: the S = 10 tokens -> ceil(2.5) = 3 -> 4.
    ('NoisyTopItemsPerExpertRouter', {'num_selected_experts': None}, 4, 4),
    # Per image: 2 images x K = 2 choices over 4 experts -> 1 image slot of 5 tokens.
    ('PerImageRouter', {}, 1, 5),
    # Soft MoE: round(10 * 1.0 / 4) = 2 slots per expert (round, no multiple).
    ('SoftRouter', {'num_selected_experts': None, 'noise_std': None,
                    'dispatcher': {'name': 'einsum'}}, 2, 2),
])
def test_capacity_is_resolved_once_per_router_kind(router, options, capacity, token_slots):
  config = _config(**{'encoder.moe.router.name': router})
  for key, value in options.items():
    node = config['encoder']['moe']['router']
    if value is None:
      del node[key]
    else:
      node[key] = value
  spec = models.resolve(config, image_size=(8, 8))
  moe = spec.encoder.moe
  assert (spec.tokens_per_image, moe.tokens_per_image) == (5, 5)
  assert (moe.capacity, moe.token_slots) == (capacity, token_slots)
  assert models.resolve(config).encoder.moe.capacity is None  # Needs the image size.
  assert spec.groups(4) == 2


def test_moe_layers_and_dispatch_kind_per_block():
  spec = models.resolve(_config(**{'encoder.moe.router.dispatcher.name': 'indices'}))
  assert spec.encoder.moe_at(0) is None and spec.encoder.moe_at(1) is spec.encoder.moe
  assert spec.encoder.moe.dispatch == 'indices'
  soft = models.resolve(_config(**{'encoder.moe.router': {'name': 'SoftRouter'}}))
  assert soft.encoder.moe.dispatch == 'soft'  # The config's 'einsum', resolved.
  assert models.resolve(_config(**{'encoder.moe.layers': ()})).encoder.moe is None


@pytest.mark.parametrize('overrides,tokens', [
    ({'classifier': 'token', 'encoder.position_emb': {'name': 'sincos2d'}}, 5),
    ({'classifier': 'gap', 'encoder.moe.group_size': 8}, 4),
    ({'classifier': '0', 'encoder.moe.group_size': 8,
      'encoder.position_emb': {'name': 'none'}}, 4),
    ({'classifier': 'map', 'encoder.moe.group_size': 8, 'representation_size': 16,
      'encoder.moe.router.dispatcher.name': 'indices'}, 4),
    ({'encoder.moe.layers': ()}, 5),  # A dense ViT.
])
def test_variants_build_and_run(overrides, tokens):
  model = _build(_config(**overrides))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), IMAGES)
  logits, metrics = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs={
      'dropout': jax.random.PRNGKey(1), 'gating': jax.random.PRNGKey(2)}))(variables, IMAGES + 1)
  assert logits.shape == (2, 5) and np.isfinite(logits).all()
  assert np.isfinite(np.mean(metrics['auxiliary_loss']))
  pos = variables['params']['Encoder'].get('posembed_input')
  if pos is not None:
    assert pos['pos_embedding'].shape == (1, tokens, 16)


def test_head_initialisation_options():
  model = _build(_config(head_bias_init=-2.0))
  head = jax.jit(model.init)(jax.random.PRNGKey(0), IMAGES)['params']['head']
  assert np.all(head['kernel'] == 0) and np.all(head['bias'] == -2.0)
  model = _build(_config(head_kernel_zero_init=False))
  assert np.any(jax.jit(model.init)(jax.random.PRNGKey(0), IMAGES)['params']['head']['kernel'])


@pytest.mark.parametrize('overrides,message', [
    ({'encoder.moe.router.num_selected_experts': 5}, 'num_selected_experts=5'),
    ({'encoder.moe.router.num_selected_experts': 0}, 'num_selected_experts=0'),
    ({'encoder.moe.router.dispatcher.capacity': 4}, 'exactly one of capacity and capacity_f'),
    ({'encoder.moe.router.dispatcher.capacity_factor': None}, 'exactly one of capacity'),
    ({'encoder.moe.router.dispatcher.capacity_factor': None,
      'encoder.moe.router.dispatcher.capacity': 0}, 'capacity=0'),
    ({'encoder.moe.router.dispatcher.capacity_factor': -1.0}, 'capacity_factor=-1.0'),
    ({'encoder.moe.router.name': 'TopK'}, "router.name='TopK' is unknown; valid: \\["),
    ({'encoder.moe.router.dispatcher.name': 'magic'}, "name='magic' is unknown; valid"),
    ({'encoder.moe.layers': (1, 2)}, r'indices \[2\] outside \[0, 2\)'),
    ({'encoder.moe.layers': (-1,)}, r'indices \[-1\] outside'),
    ({'encoder.moe.router.dispatcher.capacity_ceil_or_round': 'floor'}, "'floor'"),
    ({'encoder.moe.routr': {}}, r"Unknown key\(s\) \['routr'\] in model.encoder.moe; valid"),
    ({'encoder.moe.router.k': 2}, r"Unknown key\(s\) \['k'\] in model.encoder.moe.router"),
    ({'classifier': 'cls'}, "classifier='cls' is unknown"),
    ({'encoder.position_emb': {'name': 'rope'}}, "position_emb.name='rope'"),
    ({'encoder.num_heads': 3}, 'not divisible by model.encoder.num_heads=3'),
    ({'name': 'ResNet'}, "model.name='ResNet' is unknown"),
])
def test_bad_config_fails_with_one_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.resolve(_config(**overrides))


def test_input_dependent_checks_before_tracing():
  spec = models.resolve(_config(), image_size=(8, 8))
  with pytest.raises(ValueError, match='group_size=10 does not divide the 15 tokens'):
    spec.groups(3)
  with pytest.raises(ValueError, match=r'patch_size=\(4, 4\) does not tile images of 10x8'):
    models.resolve(_config(), image_size=(10, 8))
  with pytest.raises(ValueError, match='capacity_factor=0.01'):
    models.resolve(_config(**{'encoder.moe.router.dispatcher.capacity_factor': 0.01,
                              'encoder.moe.router.dispatcher.capacity_ceil_or_round': 'round',
                              'encoder.moe.router.dispatcher.capacity_multiple_of': None}),
                   image_size=(8, 8))
  with pytest.raises(ValueError, match='build: resolve the model config for its image size'):
    models.build(models.resolve(_config()))
  # The model itself refuses a bad batch or image size at trace time, before compiling.
  model = models.build(spec)
  with pytest.raises(ValueError, match='group_size=10 does not divide'):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((3, 8, 8, 3))))
  with pytest.raises(ValueError, match=r'resolved for \(8, 8\) images, got images of shape'):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((2, 4, 8, 3))))


def test_check_params_lists_every_mismatch():
  spec = models.resolve(_config(), image_size=(8, 8))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), models.param_shapes(spec))
  models.check_params(params, spec, 'ckpt')
  params['head']['kernel'] = np.zeros((16, 7), np.float32)
  del params['cls']
  params['extra'] = {'w': np.zeros(3)}
  with pytest.raises(ValueError, match=r'The parameters in ckpt do not fit the model config: '
                     r'missing cls \(1, 1, 16\); unexpected extra/w \(3,\); head/kernel has '
                     r'shape \(16, 7\), the model needs \(16, 5\)'):
    models.check_params(params, spec, 'ckpt')
