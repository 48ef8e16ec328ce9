"""FLOPs per image against a hand count, and how they follow the capacity."""
import pytest

from vmoe.evaluate import flops
from vmoe.nn import decoders
from vmoe.nn import models

# 8x8 images, patch 4 -> 4 patches + cls = 5 tokens; D 8, H 16, 2 layers, MoE in layer 1.
CONFIG = {
    'num_classes': 3, 'patch_size': (4, 4), 'hidden_size': 8, 'classifier': 'token',
    'representation_size': 4,
    'encoder': {'num_layers': 2, 'mlp_dim': 16, 'num_heads': 2,
                'moe': {'layers': (1,), 'num_experts': 4, 'group_size': 10,
                        'router': {'num_selected_experts': 2, 'dispatcher': {
                            'capacity_factor': 1.0, 'capacity_multiple_of': 1}}}},
}


def test_hand_count():
  t, d, h = 5, 8, 16
  embed = 2 * 4 * (4 * 4 * 3) * d
  attention = 4 * 2 * t * d * d + 2 * 2 * t * t * d
  dense_mlp = 2 * 2 * d * h * t
  # Group of 10 tokens (2 images), K=2: capacity 10 * 2 / 4 = 5 slots per expert, so 20
  # slots per group and 10 per image, each a D -> H -> D MLP; router 2 * t * d * E.
  moe = 2 * t * d * 4 + 10 * 2 * 2 * d * h
  head = 2 * d * 4 + 2 * 4 * 3
  expected = embed + 2 * attention + dense_mlp + moe + head
  assert flops.flops_per_image(models.resolve(CONFIG, image_size=(8, 8))) == expected


def test_flops_follow_capacity_and_k():
  spec = lambda **o: models.resolve(CONFIG, image_size=(8, 8), overrides=o)
  low = spec(**{'encoder.moe.router.dispatcher.capacity_factor': 0.5})
  k1 = spec(**{'encoder.moe.router.num_selected_experts': 1})
  full = flops.flops_per_image(spec())
  mlp_slot = 2 * 2 * 8 * 16
  # cf 0.5: ceil(2.5) = 3 slots per expert -> 12 per group, 6 per image (was 10).
  assert full - flops.flops_per_image(low) == pytest.approx(4 * mlp_slot)
  assert flops.flops_per_image(k1) < full
  assert flops.moe_slots_per_image(low) == 6


def test_e3_counts_every_block_from_the_first_moe_block_once_per_member():
  """E3 with MoE from block 0: all but the patch embedding runs M times, each copy like a
  V-MoE of the member's E/M experts (same capacity per copy)."""
  def config(name, e, s, **moe):
    return dict(name=name, num_classes=10, patch_size=(4, 4), hidden_size=16,
                classifier='token', encoder=dict(num_layers=2, mlp_dim=32, num_heads=2, moe=dict(
                    layers=(0, 1), num_experts=e, group_size=s, **moe, router=dict(
                        num_selected_experts=1, dispatcher=dict(capacity_factor=1.0)))))
  e3 = models.resolve(config('VisionTransformerMoeEnsemble', 4, 40, ensemble_size=2),
                      image_size=(8, 8))
  plain = models.resolve(config('VisionTransformerMoe', 2, 20), image_size=(8, 8))
  assert e3.encoder.moe.capacity == plain.encoder.moe.capacity
  embedding = 2 * 4 * 16 * 3 * 16
  assert flops.flops_per_image(e3) == embedding + 2 * (flops.flops_per_image(plain)
                                                       - embedding)


def test_segmenter_counts_its_decoder_instead_of_the_head():
  """The encoder's FLOPs as the classifier's, plus the decoder's (vmoe.nn.decoders)."""
  seg = dict(CONFIG, representation_size=None, decoder={'name': 'fpn', 'layers': (0,),
                                                         'dim': 4, 'pool_scales': (1, 2)})
  spec = models.resolve(seg, image_size=(8, 8))
  encoder_only = models.resolve(dict(CONFIG, representation_size=None, num_classes=None),
                                image_size=(8, 8))
  assert flops.flops_per_image(spec) == (flops.flops_per_image(encoder_only)
                                         + decoders.flops_per_image(spec.decoder, spec))
  linear = models.resolve(dict(seg, decoder={'name': 'linear'}), image_size=(8, 8))
  # Per patch (2 x 2 grid): D 8 -> 3 classes.
  assert flops.flops_per_image(linear) == flops.flops_per_image(encoder_only) + 2 * 4 * 8 * 3
