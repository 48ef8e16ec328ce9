r"""Tiny V-MoE segmenter on digit_scenes: the offline segmentation demo (CPU, minutes).

  python -m vmoe.main --config=configs/digits_seg.py --workdir=/tmp/vmoe_digits_seg
  python -m vmoe.evaluate --config=configs/digits_seg.py --workdir=/tmp/vmoe_digits_seg \
      --sweep='capacity_factor=0.5,1,1.5;num_selected_experts=1,2' --analyze --predictions=8

digit_scenes (vmoe/data/digit_scenes.py): 32x32 RGB canvases of 1-3 scikit-learn digits on
textured backgrounds, 11 pixel classes (background, digits 0-9); 4,000 train / 500 test
canvases, built from scikit-learn into the TFDS data dir on first use (nothing is
downloaded). Patch 4 (an 8x8 grid, 64 tokens), width 64, 6 blocks, MLP 128, 4 heads, fixed
sin-cos positions; MoE in blocks 1, 3 and 5 with E=8 experts, K=2, groups of 4 images'
tokens, capacity factor 1.05; decoder 'fpn' on the output of block 3 and the final
tokens (2 levels), 32 channels, UperNet's pyramid pooling (1, 2, 3, 6). Per-pixel
softmax cross-entropy (ignore label 255), AdamW 2e-3 (200 warmup steps, cosine decay),
batch 32, random scale-and-crop (0.8-1.25), 3,000 steps. Evaluation preprocessing is only
value_range(-1, 1): outside code feeds the canvases as they are.

Measured with the command above (2 CPU cores, jax 0.10.2 CPU): test mIoU 0.7225, pixel
accuracy 0.9603 at step 3,000 (0.3703 at step 500, 0.5716 at 1,000, 0.6469 at 1,500,
0.6997 at 2,000); seeds 0-2 give 72.21 ± 0.16 % mIoU, the dense ViT (router=dense)
69.54 ± 0.69 and the shared expert 72.29 ± 0.47 (docs/segmentation.md, with the routing
analysis by layer).

Argument (configs/digits_seg.py:key=value,...): router=NAME (a short name of
vmoe.configs.common.ROUTER_VARIANTS: top_k (default, V-MoE), shared_expert (ViMoE: one
shared dense expert beside the routed ones), dense (a plain ViT), expert_choice, soft,
...), num_experts=8, k=2, capacity_factor=1.05, decoder=fpn|linear, moe_layers=odd
(blocks 1, 3, 5) | last (blocks 3, 4, 5: ViMoE's MoE-in-the-deep-layers placement),
steps=3000. Any key can also be overridden with --config.a.b=value.
"""
from vmoe.configs import common

NUM_CLASSES = 11  # Background and the digits 0-9.
SIZE, PATCH, LAYERS = 32, 4, 6
TOKENS = (SIZE // PATCH) ** 2
DEFAULTS = dict(router='top_k', num_experts=8, k=2, capacity_factor=1.05, decoder='fpn',
                moe_layers='odd', steps=3000)
DECODERS = {'linear': dict(name='linear'),
            'fpn': dict(name='fpn', layers=(3,), dim=32, pool_scales=(1, 2, 3, 6))}
MOE_LAYERS = {'odd': common.every_n(2, LAYERS), 'last': tuple(range(3, LAYERS))}
TAIL = 'value_range(-1,1)|seg_labels|keep("image", "labels")'


def get_config(arg=None):
  a = common.parse_arg(arg, DEFAULTS)
  for key, table in (('decoder', DECODERS), ('moe_layers', MOE_LAYERS)):
    if a[key] not in table:
      raise ValueError(f'configs/digits_seg.py:{key}={a[key]!r} is not one of '
                       f'{sorted(table)}.')
  config = common.base_config(seed=0)
  config.description = (f'Tiny V-MoE segmenter on digit_scenes, E={a["num_experts"]}, '
                         f'{a["router"]}, {a["decoder"]} decoder')
  config.dataset = common.ConfigDict(dict(
      train=common.data_config(
          name='digit_scenes', split='train', batch_size=32, shuffle_buffer=4_000,
          cache=True, process=f'decode|seg_random_scale_crop({SIZE}, 0.8, 1.25)|{TAIL}'),
      test=common.data_config(name='digit_scenes', split='test', batch_size=100,
                              cache=True, process=f'decode|{TAIL}')))
  layers = MOE_LAYERS[a['moe_layers']]
  config.model = common.ConfigDict(dict(
      name='VisionTransformerMoe',
      num_classes=NUM_CLASSES,
      patch_size=(PATCH, PATCH),
      hidden_size=64,
      classifier='gap',
      representation_size=None,
      decoder=DECODERS[a['decoder']],
      encoder=dict(
          num_layers=LAYERS, mlp_dim=128, num_heads=4, dropout_rate=0.0,
          attention_dropout_rate=0.0,
          # Fixed 2D sin-cos positions (MoCo v3's): no position parameters to learn from
          # 4,000 canvases (docs/segmentation.md, calibration).
          position_emb=dict(name='sincos2d'),
          moe=common.moe_config(
              a['router'], layers=layers, num_layers=LAYERS,
              num_experts=a['num_experts'], group_size=4 * TOKENS,
              num_selected_experts=a['k'], capacity_factor=a['capacity_factor']))))
  config.loss = common.pixel_loss()
  config.optimizer = common.adamw_optimizer(peak_value=2e-3, warmup_steps=200,
                                            weight_decay=0.05, global_norm=1.0)
  config.train_steps = a['steps']
  config.save_checkpoint.every_steps = 500
  config.save_checkpoint.keep_last = 2
  config.evaluate.every_steps = 500
  config.report_progress.every_steps = 250
  return config
