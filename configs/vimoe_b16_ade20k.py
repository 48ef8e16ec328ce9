r"""ViMoE-style semantic segmentation of ADE20K (150 classes) with a V-MoE B/16 backbone.

ViMoE (arXiv 2410.15732) puts MoE layers into a ViT, adds a shared expert that every
token goes through (output = shared(x) + routed(x)), and segments ADE20K with it. This
config builds that setup from a classification checkpoint:

  python -m vmoe.data.ade20k --manual_dir=DIR/downloads/manual --data_dir=DIR
  python -m vmoe.main --workdir=/tmp/vimoe_b16_ade20k \
      --config=configs/vimoe_b16_ade20k.py:path=/data/ckpt/ViT-B_16.npz \
      --config.dataset.train.data_dir=DIR --config.dataset.validation.data_dir=DIR

DIR: a TFDS data dir; the first command builds 'ade20k' (vmoe/data/ade20k.py) from MIT's
ADEChallengeData2016.zip, put in DIR/downloads/manual by hand (nothing is downloaded).
TFDS's own 'scene_parse150' is not this benchmark (it holds the Places-challenge instance
annotations: vmoe/data/seg_ops.py); dataset=scene_parse150 trains on its 100 object
classes (+ 'no object') instead.

The model: ViT-B/16 (12 blocks, width 768, MLP 3072, 12 heads) at 512x512 (a 32x32 patch
grid + the class token, dropped before the decoder), MoE in the last `moe_layers` blocks
(default 2: blocks 10 and 11) with E=8 experts, K=2, V-MoE's top-k router, groups of 2
images' tokens, capacity factor 1.05, and one shared expert per MoE layer; decoder 'fpn'
on the outputs of blocks 2, 5 and 8 and the final tokens (the feature indices of
mmsegmentation's ViT + UperNet), 4 levels at 8x, 4x, 2x and 1x the grid, 256 channels.

config.initialization (source 'npz', a vision_transformer ViT-B/16 .npz, e.g. an AugReg
ImageNet-21k checkpoint): common.vit_upcycle_rules (their names -> ours; the MLPs of the
MoE blocks copied into the 8 experts; the classifier head left out), then
('resize_posemb', ...) from the checkpoint's 14x14 grid to 32x32. The routers, shared
experts and decoder start fresh (allow_missing); a pre-logits layer is not used.

Training: per-pixel softmax cross-entropy (ignore label 255: ADE20K's 'other' pixels,
after seg_remap("ade20k")), AdamW 6e-5 with weight decay 0.01, linear warmup (1,500
steps) and linear decay, batch 16, 160,000 steps, random scale (0.5-2) and 512 crop, flip
(mmsegmentation's ADE20K schedule). Evaluation at 512x512: images and masks resized to
512x512 (masks nearest), so the mIoU is not the single-scale protocol of published tables
(each image at its own aspect ratio).

Expected result: not run here (no ADE20K offline, and a CPU would need months). ViMoE
reports ADE20K results for its MoE ViTs; their numbers could not be checked from the
material available to this project, so none is quoted.

Argument (FILE.py:key=value,...): path=FILE.npz (or --config.initialization.path=),
num_experts=8, k=2, moe_layers=2 (the last N blocks are MoE), router=shared_expert (or
top_k: no shared expert), dataset=ade20k|scene_parse150, seed=0.
"""
from vmoe.configs import common

VARIANT, PATCH, SIZE = 'B', 16, 512
GRID = SIZE // PATCH
BATCH_SIZE = 16
DEFAULTS = dict(path='', num_experts=8, k=2, moe_layers=2, router='shared_expert',
                dataset='ade20k', seed=0)
TAIL = 'value_range(-1,1)|seg_labels|keep("image", "labels")'
# name -> (classes, mask ops before the joint ops, eval split).
DATASETS = {
    'ade20k': (150, 'seg_remap("ade20k")', 'validation'),
    'scene_parse150': (101, 'mask_channel(0, key="annotation", '
                            'key_result="segmentation_mask")', 'test'),
}


def get_config(arg=None):
  a = common.parse_arg(arg, DEFAULTS)
  if a['dataset'] not in DATASETS:
    raise ValueError(f'configs/vimoe_b16_ade20k.py:dataset={a["dataset"]!r} is not one of '
                     f'{sorted(DATASETS)}.')
  num_classes, mask_ops, eval_split = DATASETS[a['dataset']]
  layers = tuple(range(12 - a['moe_layers'], 12))
  config = common.base_config(seed=a['seed'])
  config.description = (f'ViMoE B/16 segmenter on {a["dataset"]}, E={a["num_experts"]}, '
                        f'K={a["k"]}, MoE blocks {layers}, {a["router"]}')
  pre = f'decode|{mask_ops}|seg_resize({SIZE})'
  config.dataset = common.ConfigDict(dict(
      train=common.data_config(
          name=a['dataset'], split='train', batch_size=BATCH_SIZE, shuffle_buffer=5_000,
          process=f'{pre}|seg_random_scale_crop({SIZE}, 0.5, 2.0)|seg_flip_lr|{TAIL}'),
      validation=common.data_config(name=a['dataset'], split=eval_split,
                                    batch_size=BATCH_SIZE, process=f'{pre}|{TAIL}')))
  v = common.VARIANTS[VARIANT]
  config.model = common.ConfigDict(dict(
      name='VisionTransformerMoe',
      num_classes=num_classes,
      patch_size=(PATCH, PATCH),
      hidden_size=v['hidden_size'],
      classifier='token',
      representation_size=None,
      decoder=dict(name='fpn', layers=(2, 5, 8), dim=256),
      encoder=dict(
          num_layers=v['num_layers'], mlp_dim=v['mlp_dim'], num_heads=v['num_heads'],
          dropout_rate=0.0, attention_dropout_rate=0.0,
          moe=common.moe_config(
              a['router'], layers=layers, num_layers=v['num_layers'],
              num_experts=a['num_experts'], group_size=2 * (GRID * GRID + 1),
              num_selected_experts=a['k'], capacity_factor=1.05, bfloat16=True))))
  config.initialization = common.initialization_config(
      source='npz', path=a['path'],
      rules=common.vit_upcycle_rules(layers, a['num_experts']) + [
          ('resize_posemb', '^Encoder/posembed_input/pos_embedding$')],
      allow_missing='/Moe/(Router|SharedMlp_0)/|^decoder/', allow_unused='^pre_logits/')
  config.loss = common.pixel_loss()
  config.optimizer = common.adamw_optimizer(peak_value=6e-5, warmup_steps=1_500,
                                            weight_decay=0.01,
                                            schedule='warmup_linear_decay', global_norm=1.0)
  config.train_steps = 160_000
  config.save_checkpoint.every_steps = 4_000
  config.evaluate.every_steps = 16_000
  return config
