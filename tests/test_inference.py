"""vmoe.load_segmenter and load_classifier: the right loader for the model, one shared
loader behind both."""
import jax
import numpy as np
import pytest

import vmoe
from vmoe.checkpoints import legacy
from vmoe.nn import models

CF = 'encoder.moe.router.dispatcher.capacity_factor'


def _config(decoder):
  config = dict(name='VisionTransformerMoe', num_classes=3, patch_size=(4, 4),
                hidden_size=8, classifier='token', encoder=dict(
                    num_layers=2, mlp_dim=8, num_heads=1, moe=dict(
                        layers=(1,), num_experts=2, group_size=10, router=dict(
                            num_selected_experts=1, noise_std=0.0,
                            dispatcher=dict(name='einsum', capacity_factor=1.0)))))
  return {**config, 'decoder': decoder} if decoder else config


def test_load_segmenter_gives_per_pixel_logits(tmp_path):
  config = _config({'name': 'fpn', 'layers': (0,), 'dim': 8, 'pool_scales': (1, 2)})
  model = models.build_model(config, 8)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  # Random weights: the zero-initialised head would give zero logits.
  params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32),
                        models.param_shapes(model.spec))
  prefix = str(tmp_path / 'segmenter')
  legacy.save(prefix, params)
  segment = vmoe.load_segmenter(prefix, config)
  logits = segment(images)
  assert logits.dtype == np.float32 and logits.shape == (2, 8, 8, 3)
  want = model.apply({'params': params}, images, train=False)[0]
  np.testing.assert_allclose(logits, want, atol=1e-6, rtol=0)
  # Test-time overrides reach the model: capacity 0.5x drops tokens, changing logits.
  low = vmoe.load_segmenter(prefix, config, {CF: 0.5})(images)
  assert low.shape == logits.shape and not np.allclose(low, logits)
  with pytest.raises(ValueError, match=r'images must be \[B, H, W, 3\]'):
    segment(images[..., 0])


def test_each_loader_refuses_the_other_kind_before_reading():
  with pytest.raises(ValueError, match=r"load_classifier: the model config has a decoder "
                                       r"\('linear'\), so it is a segmenter; use "
                                       r'vmoe.load_segmenter'):
    vmoe.load_classifier('/nonexistent', _config({'name': 'linear'}))
  with pytest.raises(ValueError, match=r'load_segmenter: the model config has no decoder .*'
                                       r'so it is a classifier; use vmoe.load_classifier'):
    vmoe.load_segmenter('/nonexistent', _config(None))
  assert vmoe.__all__ == ['build_model', 'load_classifier', 'load_segmenter']
