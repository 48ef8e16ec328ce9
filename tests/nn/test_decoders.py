"""Segmenters (model.decoder): logits per pixel from 'linear' and 'fpn' heads on every
kind of encoder, feature layers that survive scan, FLOPs, and one clear error per bad
config."""
import copy

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe.nn import decoders
from vmoe.nn import models
from vmoe.nn import scan
from vmoe.nn import spec as spec_lib
from vmoe.nn import vit
from vmoe.nn.scan import Segment
from vmoe.utils import dotted

# 16x16 images, patch 4: a 4x4 grid, 16 patches (+ the class token).
IMAGES = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
FPN = {'name': 'fpn', 'layers': (0, 1), 'dim': 8, 'pool_scales': (1, 3)}
MOE = {'layers': (1, 2), 'num_experts': 4, 'group_size': 34,
       'router': {'num_selected_experts': 2, 'noise_std': 0.0,
                  'dispatcher': {'capacity_factor': 2.0}}}
BASE = {'num_classes': 3, 'patch_size': (4, 4), 'hidden_size': 16, 'classifier': 'token',
        'decoder': FPN, 'head_kernel_zero_init': False,
        'encoder': {'num_layers': 3, 'mlp_dim': 16, 'num_heads': 2, 'moe': MOE}}


def _config(**overrides):
  return dotted.with_values(copy.deepcopy(BASE), overrides)


def _model(config, image_size=(16, 16)):
  return models.build_model(config, image_size)


def _params(model):
  """Random params of the model's shapes (eval_shape: no init compile)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), IMAGES)['params'])
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes)


def test_resolve_fills_the_decoder_and_the_feature_layers():
  spec = models.resolve(_config())
  assert spec.segmenter and spec.decoder == spec_lib.DecoderSpec('fpn', (0, 1), 8, (1, 3))
  assert spec.encoder.feature_layers == (0, 1)
  linear = models.resolve(_config(decoder={'name': 'linear'}))
  assert linear.decoder == spec_lib.DecoderSpec('linear') and linear.encoder.feature_layers == ()
  classifier = models.resolve(_config(decoder=None))
  assert not classifier.segmenter and classifier.encoder.feature_layers == ()
  assert decoders.scales(spec.decoder) == (4, 2, 1)
  default = models.resolve(_config(decoder={'name': 'fpn', 'layers': (0,), 'dim': 8}))
  assert default.decoder.pool_scales == decoders.POOL_SCALES == (1, 2, 3, 6)  # UperNet's.


def test_pool_matrix_is_adaptive_average_pooling():
  np.testing.assert_allclose(decoders.pool_matrix(4, 1), [[0.25] * 4])
  # 4 positions into 3 bins: [0, 2), [1, 3), [2, 4), as adaptive average pooling.
  np.testing.assert_allclose(decoders.pool_matrix(4, 3), [[.5, .5, 0, 0], [0, .5, .5, 0],
                                                          [0, 0, .5, .5]])
  assert decoders.pool_matrix(8, 6).sum(axis=1).tolist() == [1.0] * 6


FPN_PARAMS = {'norm_0', 'norm_1', 'lateral_0', 'lateral_1', 'lateral_2', 'up_0_0', 'up_0_1',
              'up_1_0', 'pool_1', 'pool_3', 'smooth_0', 'smooth_1', 'smooth_2', 'head'}


@pytest.mark.parametrize('decoder', [{'name': 'linear'}, FPN])
@pytest.mark.parametrize('overrides', [
    {'encoder.moe.layers': ()},  # Dense ViT.
    {},  # Top-2 token choice MoE.
    {'encoder.moe.shared_experts': 1},
    {'classifier': 'gap', 'encoder.moe.group_size': 32},
    {'classifier': '0', 'encoder.moe.group_size': 32,
     'encoder.position_emb': {'name': 'sincos2d'}},
    {'encoder.moe.router': {'name': 'PerImageRouter', 'num_selected_experts': 1,
                            'dispatcher': {'capacity_factor': 1.0}}},
    {'encoder.scan': True, 'encoder.num_layers': 4, 'encoder.moe.layers': (2, 3)},
])
def test_logits_per_pixel_for_every_encoder(decoder, overrides):
  model = _model(_config(decoder=decoder, **overrides))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), IMAGES))
  logits, metrics = jax.eval_shape(lambda v: model.apply(v, IMAGES), variables)
  assert (logits.shape, logits.dtype) == ((2, 16, 16, 3), jnp.float32)
  assert metrics['auxiliary_loss'].ndim <= 1
  params = variables['params']
  assert 'head' not in params and 'pre_logits' not in params
  want = {'head'} if decoder['name'] == 'linear' else FPN_PARAMS
  assert set(params['decoder']) == want
  assert ('cls' in params) == (model.spec.classifier == 'token')


def test_logits_are_finite_and_every_part_learns():
  """One train-mode gradient: the decoder's params and every encoder block (the fpn's
  earliest feature layer too, through its own level) get a gradient."""
  model = _model(_config())
  params = _params(model)

  def loss(p):
    logits, metrics = model.apply({'params': p}, IMAGES, train=True, rngs={
        'dropout': jax.random.PRNGKey(1), 'gating': jax.random.PRNGKey(2)})
    return jnp.mean(logits * jnp.arange(3.)) + jnp.mean(metrics['auxiliary_loss']), logits

  grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert logits.shape == (2, 16, 16, 3) and np.isfinite(logits).all()
  norm = lambda t: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t)))
  for name in ('embedding', 'cls'):
    assert norm(grads[name]) > 0, name
  for i in range(3):
    assert norm(grads['Encoder'][f'encoderblock_{i}']) > 0, i
  for name in FPN_PARAMS:
    assert norm(grads['decoder'][name]) > 0, name


def test_feature_layers_cut_the_scanned_segments():
  def segments(decoder):
    spec = models.resolve(_config(**{'encoder.num_layers': 6, 'encoder.moe.layers': (1, 3, 5),
                                     'encoder.scan': True, 'decoder': decoder}))
    return vit.Encoder(spec.encoder).segments()
  fpn = lambda layers: {'name': 'fpn', 'layers': layers, 'dim': 8, 'pool_scales': ()}
  # D M D M D M: one segment of 3 units, unless a feature layer's output must exist.
  assert segments({'name': 'linear'}) == (Segment(0, 2, 3),)
  assert segments(fpn((3,))) == (Segment(0, 2, 2),)  # Blocks 4 and 5 unscanned.
  assert segments(fpn((1,))) == (Segment(2, 2, 2),)
  assert segments(fpn((1, 3))) == ()


def test_scan_gives_the_unscanned_logits():
  """Feature layer 3 ends a segment (blocks 0-3 as 2 units): same logits and features
  after converting the params."""
  config = _config(**{'encoder.num_layers': 6, 'encoder.moe.layers': (1, 3, 5),
                      'decoder': {'name': 'fpn', 'layers': (3,), 'dim': 8,
                                  'pool_scales': (1, 2)}})
  plain = _model(config)
  scanned = _model(dotted.with_values(config, {'encoder.scan': True}))
  params = _params(plain)
  shapes = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), IMAGES)['params'])
  segments = scan.segments_of(traverse_util.flatten_dict(shapes, sep='/'))
  assert segments == (Segment(0, 2, 2),)
  scanned_params = scan.scan_tree(params, segments)
  assert jax.tree.map(jnp.shape, scanned_params) == jax.tree.map(jnp.shape, shapes)
  run = lambda m, p: jax.jit(lambda p: m.apply({'params': p}, IMAGES)[0])(p)
  np.testing.assert_allclose(run(scanned, scanned_params), run(plain, params), atol=1e-5,
                             rtol=1e-5)


def test_check_params_of_a_segmenter():
  spec = models.resolve(_config(), image_size=(16, 16))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), models.param_shapes(spec))
  models.check_params(params, spec, 'ckpt')
  del params['decoder']['smooth_1']
  with pytest.raises(ValueError, match=r'missing decoder/smooth_1/bias \(8,\)'):
    models.check_params(params, spec, 'ckpt')


def test_flops_hand_count_and_growth():
  """4x4 grid (g = 16), D 16, C 3; fpn of 2 levels (the finest at 8x8), dim 8."""
  spec = lambda d, **o: models.resolve(_config(decoder=d, **o), image_size=(16, 16))
  g, d, c, dim = 16, 16, 3, 8
  assert decoders.flops_per_image(spec({'name': 'linear'}).decoder,
                                  spec({'name': 'linear'})) == 2 * g * d * c
  two = spec({'name': 'fpn', 'layers': (0,), 'dim': dim, 'pool_scales': (1, 2)})
  pool = 2 * (1 + 4) * d * dim
  lateral = 2 * 2 * g * d * dim
  up = 2 * g * dim * 4 * dim
  smooth = 2 * (4 * g + g) * 9 * dim * dim
  head = 2 * 4 * g * dim * c
  assert decoders.flops_per_image(two.decoder, two) == pool + lateral + up + smooth + head
  values = [decoders.flops_per_image(s.decoder, s) for s in (
      spec({'name': 'fpn', 'layers': (0,), 'dim': k, 'pool_scales': (1,)})
      for k in (4, 8, 16))]
  assert 0 < values[0] < values[1] < values[2]


@pytest.mark.parametrize('overrides,message', [
    ({'decoder': {'name': 'upernet'}},
     r"model.decoder.name='upernet' is unknown; valid: \['fpn', 'linear'\]"),
    ({'decoder': {}}, r'model.decoder.name is required'),
    ({'decoder': 'linear'}, r"model.decoder='linear' must be a dict, e.g."),
    ({'decoder': {'name': 'fpn', 'layer': (0,), 'dim': 8}},
     r"Unknown key\(s\) \['layer'\] in model.decoder; valid keys: \['dim', 'layers', 'name', "
     r"'pool_scales'\]"),
    ({'decoder': {'name': 'linear', 'layers': (0,)}},
     r"'linear' classifies the final patch tokens alone; remove layers=\(0,\), dim=None"),
    ({'decoder': {'name': 'linear', 'dim': 8}}, r'remove layers=\(\), dim=8 and pool_scales=\(\)'),
    ({'decoder': {'name': 'linear', 'pool_scales': (1,)}}, r'and pool_scales=\(1,\) \(they'),
    ({'decoder': {**FPN, 'pool_scales': (2, 1)}},
     r'pool_scales=\(2, 1\) must be increasing positive bin counts \(e.g. \(1, 2, 3, 6\)'),
    ({'decoder': {**FPN, 'pool_scales': (0,)}}, r'pool_scales=\(0,\) must be increasing'),
    ({'decoder': {'name': 'fpn', 'layers': (2,), 'dim': 8}},
     r'model.decoder.layers=\(2,\) must be increasing block indices in \[0, 2\) '
     r'\(num_layers=3; the last block gives the final encoder output'),
    ({'decoder': {'name': 'fpn', 'layers': (1, 0), 'dim': 8}}, r'layers=\(1, 0\) must be incr'),
    ({'decoder': {'name': 'fpn', 'layers': (0, 0), 'dim': 8}}, r'layers=\(0, 0\) must be incr'),
    ({'decoder': {'name': 'fpn', 'layers': (-1,), 'dim': 8}}, r'layers=\(-1,\) must be incr'),
    ({'decoder': {'name': 'fpn', 'dim': 8}}, r'layers=\(\) must be increasing .* e.g. \(0, 1\)'),
    ({'decoder': {'name': 'fpn', 'layers': 1, 'dim': 8}}, r'layers=1 must be increasing'),
    ({'decoder': {'name': 'fpn', 'layers': (0,)}},
     r"model.decoder.dim=None must be a positive integer \(the 'fpn' channels\)"),
    ({'decoder': {'name': 'fpn', 'layers': (0,), 'dim': 0}}, r'decoder.dim=0 must be a pos'),
    ({'decoder': {'name': 'fpn', 'layers': (0,), 'dim': 2.5}}, r'decoder.dim=2.5 must be a'),
    ({'decoder': {'name': 'fpn', 'layers': (0,), 'dim': 8}, 'encoder.num_layers': 1,
      'encoder.moe.layers': ()},
     r"'fpn' needs the outputs of earlier blocks, but model.encoder.num_layers=1"),
    ({'decoder': {'name': 'fpn', 'layers': (0, 1, 2), 'dim': 8}, 'encoder.num_layers': 4},
     r"'fpn' with layers=\(0, 1, 2\) has 4 levels, the finest at 8x the patch grid, but "
     r'model.patch_size=\(4, 4\) is not a multiple of 8 .*; use at most 2 layers, or a '
     r'patch size divisible by 8'),
    ({'patch_size': (6, 4), 'decoder': {'name': 'fpn', 'layers': (0, 1), 'dim': 8}},
     r'patch_size=\(6, 4\) is not a multiple of 4 .*; use at most 1 layer,'),
    ({'patch_size': (3, 3), 'decoder': {'name': 'fpn', 'layers': (0,), 'dim': 8}},
     r"not a multiple of 2 .*; use model.decoder.name='linear', or a patch size divisible"),
    ({'classifier': 'map'}, r"model.classifier='map' pools the tokens into one vector, but "
                            r"a segmenter \(model.decoder\) reads every patch token; use"),
    ({'representation_size': 16}, r"model.representation_size=16 is a classifier's "
                                   r'pre-logits layer; .* set it to None'),
    ({'num_classes': None}, r'model.num_classes=None must be a positive integer with '
                            r'model.decoder: the pixel classes'),
    ({'num_classes': 0}, r'model.num_classes=0 must be a positive integer'),
    ({'name': 'VisionTransformerMoeEnsemble', 'encoder.moe.ensemble_size': 2},
     r"model.name='VisionTransformerMoeEnsemble' \(E3\) cannot take a model.decoder"),
    ({'encoder.moe.router': {'name': 'PerImageRouter', 'superclasses': (0, 1, 2)}},
     r'model.encoder.moe.router.superclasses: super-class guided routing learns from '
     r'image labels, and a segmenter \(model.decoder\) has labels per pixel only; remove'),
])
def test_bad_config_fails_with_one_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.resolve(_config(**overrides))


def test_pool_scales_larger_than_the_grid():
  with pytest.raises(ValueError, match=r'model.decoder.pool_scales=\(1, 2, 3, 6\) pools the '
                     r'4x4 patch grid of 16x16 images into up to 6x6 bins; use scales of '
                     r'at most 4'):
    models.resolve(_config(decoder={'name': 'fpn', 'layers': (0,), 'dim': 8}),
                   image_size=(16, 16))


def test_input_that_the_patches_do_not_tile():
  with pytest.raises(ValueError, match=r'patch_size=\(4, 4\) does not tile images of 18x16; '
                     'choose a patch size that divides the image size'):
    models.resolve(_config(), image_size=(18, 16))
