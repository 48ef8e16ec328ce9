r"""Sparse upcycling: a dense ViT-S/32 checkpoint (.npz) becomes a V-MoE S/32.

Sparse upcycling (Komatsuzaki et al., 2022, arXiv 2212.05055) starts a
mixture-of-experts model from a trained dense one: every MoE layer's experts
start as copies of the dense block's MLP, the routers start fresh, everything
else is copied as is, and training continues.

The dense checkpoint is a vision_transformer (vit_jax) .npz of ViT-S/32 (12
layers, width 384, MLP 1536, 6 heads), e.g. gs://vit_models/gsam/ViT-S_32.npz or
an AugReg S_32 under gs://vit_models/augreg/; names like
'Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel'. The block renames also
cover big_vision's own names (MultiHeadDotProductAttention_0, LayerNorm_1,
MlpBlock_0); its top-level 'pos_embedding' needs one more rule,
('rename', '^pos_embedding$', 'Encoder/posembed_input/pos_embedding').
Copy it locally first (this command reads local files only):

  python -m vmoe.main --workdir=/tmp/vit_s32_upcycled \
      --config=configs/vit_s32_upcycle.py:path=/data/ckpt/ViT-S_32.npz \
      --config.dataset.train.data_dir=DIR --config.dataset.val.data_dir=DIR \
      --config.dataset.test.data_dir=DIR

DIR: a TFDS data dir with imagenet2012 (see configs/vmoe_s32_last2_ilsvrc2012.py).

The model: the dense ViT-S/32's backbone with MoE layers in every other block
(1, 3, ..., 11), E=8 experts, K=2, V-MoE's top-k router (groups of 8 images'
tokens, capacity factor 1.05); token classifier, no pre-logits layer, 1,000
classes, 224 px. config.initialization (source 'npz'):
  ('rename', '^Transformer/', 'Encoder/') and the block renames
      (MultiHeadDotProductAttention_[01] -> SelfAttention, LayerNorm_[12] ->
      LayerNorm_1, MlpBlock_[03] -> Mlp): vision_transformer names -> ours;
  ('rename', '^(Encoder/encoderblock_(1|3|5|7|9|11))/Mlp/', '\1/Moe/Mlp/'):
      the MLPs of the MoE blocks become their experts' weights;
  ('expand_tile', '/Moe/Mlp/', 8): each copied into the 8 experts
      ([D, H] -> [8, D, H]);
  ('reinit', '^head/'): a new head (the dense one may have other classes);
  allow_missing='/Moe/Router/': the routers start fresh;
  allow_unused='^pre_logits/': an ImageNet-21k checkpoint's pre-logits layer
      (absent from ImageNet-1k ones) is not used.
The position embedding keeps its 7x7 grid (both at 224 px).

Training continues on ILSVRC2012 with V-MoE's recipe (Adam, weight decay 0.1 on
kernels, gradient clipping at 1.0, sigmoid cross-entropy, RandAugment(2, 10),
mixup 0.2, batch 4,096) for 30 epochs, a tenth of the dense model's budget,
with a short warmup (1,000 steps: the weights are trained already) to a peak
learning rate of 1e-3. Our choice, not a published recipe; not measured here
(no ImageNet offline, and a CPU would need months).

Argument (FILE.py:key=value,...): path=FILE.npz (or
--config.initialization.path=), num_experts=8, k=2, seed=0.
"""
from vmoe.configs import common

NUM_CLASSES = 1_000
BATCH_SIZE = 4_096
VARIANT = 'S12'  # ViT-S: 12 layers, width 384.
DEFAULTS = dict(path='', num_experts=8, k=2, seed=0)


def moe_layers() -> tuple[int, ...]:
  return common.every_n(2, common.VARIANTS[VARIANT]['num_layers'])


def get_config(arg=None):
  a = common.parse_arg(arg, DEFAULTS)
  config = common.base_config(seed=a['seed'])
  config.description = (f'ViT-S/32 upcycled to V-MoE, E={a["num_experts"]}, '
                        f'K={a["k"]}, Every 2')
  config.dataset = common.imagenet_datasets(BATCH_SIZE, NUM_CLASSES)
  config.model = common.vmoe_model(
      variant=VARIANT, patch=32, image_size=224, num_classes=NUM_CLASSES,
      num_experts=a['num_experts'], num_selected_experts=a['k'],
      moe_layers=moe_layers(), representation_size=False)
  config.initialization = common.initialization_config(
      source='npz', path=a['path'],
      rules=common.vit_upcycle_rules(moe_layers(), a['num_experts']),
      allow_missing='/Moe/Router/', allow_unused='^pre_logits/')
  config.loss = common.ConfigDict(dict(name='sigmoid_xent'))
  config.optimizer = common.paper_optimizer(peak_value=1e-3, warmup_steps=1_000)
  config.train_epochs = 30
  config.mixup = common.ConfigDict(dict(concentration=0.2, size=2,
                                        granularity='device'))
  return config
