r"""V-MoE S/32 "Last 2" (E=8 experts, K=2) trained from scratch on ILSVRC2012.

The V-MoE paper's setup (arXiv 2106.05974; the reference's
vmoe_s32_last2_ilsvrc2012_randaug_light1 config): ViT-S/32 with 8 layers,
width 512, MLP 2048, 8 heads, MoE in blocks 5 and 7, groups of 8 images x 50
tokens, capacity factor 1.05 (4.0 at evaluation); 300 epochs at batch 4096,
Adam (peak 3e-3, 10k warmup steps, linear decay to 1e-5), weight decay 0.1 on
kernels, gradient clipping at 1.0, sigmoid cross-entropy, inception crop +
flip + RandAugment(2, 10) ("light1") and mixup 0.2.

  python -m vmoe.main --config=configs/vmoe_s32_last2_ilsvrc2012.py \
      --workdir=/tmp/vmoe_s32_last2 --config.dataset.train.data_dir=DIR \
      --config.dataset.val.data_dir=DIR --config.dataset.test.data_dir=DIR

DIR: a TFDS data dir holding imagenet2012 (`tfds build imagenet2012
--manual_dir=...` with the ILSVRC2012 tar files; nothing is downloaded here).

Expected (the reference's numbers, mean of 3 seeds, 5h50m on a TPUv3-32):
val (train[99%:]) prec@1 76.8%, test (the official validation set) 73.1%.
Not reproduced here: ImageNet is not available offline and a CPU would need
months. Argument (FILE.py:key=value,...): num_experts=8, k=2, seed=0.
"""
from vmoe.configs import common

NUM_CLASSES = 1_000
BATCH_SIZE = 4_096
DEFAULTS = dict(num_experts=8, k=2, seed=0)


def get_config(arg=None):
  a = common.parse_arg(arg, DEFAULTS)
  config = common.base_config(seed=a['seed'])
  config.description = f'ViT-S/32, E={a["num_experts"]}, K={a["k"]}, Last 2, 300 Epochs'
  config.dataset = common.imagenet_datasets(BATCH_SIZE, NUM_CLASSES)
  config.model = common.vmoe_model(
      variant='S', patch=32, image_size=224, num_classes=NUM_CLASSES,
      num_experts=a['num_experts'], num_selected_experts=a['k'],
      moe_layers=common.last_n(2, common.VARIANTS['S']['num_layers']))
  config.loss = common.ConfigDict(dict(name='sigmoid_xent'))
  config.optimizer = common.paper_optimizer(peak_value=3e-3)
  config.train_epochs = 300
  config.mixup = common.ConfigDict(dict(concentration=0.2, size=2,
                                        granularity='device'))
  config.evaluate.model_overrides = common.ConfigDict(
      {'encoder': {'moe': {'router': {'dispatcher': {'capacity_factor': 4.0}}}}})
  return config
