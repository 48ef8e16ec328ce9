r"""V-MoE B/16 "Every 2" (E=8 experts, K=2) pre-trained on ImageNet-21k.

The V-MoE paper's upstream model (arXiv 2106.05974; the reference's
pretrain_imagenet21k config): ViT-B/16 with 12 layers, width 768, MLP 3072,
12 heads, MoE in every other block (1, 3, ..., 11), groups of 8 images x 197
tokens, capacity factor 1.05; 300 epochs at batch 4096, Adam (peak 8e-4, 10k
warmup steps, linear decay to 1e-5), weight decay 0.1 on kernels, gradient
clipping at 1.0, sigmoid cross-entropy, inception crop + flip +
RandAugment(2, 20) and mixup 0.5. The first 102,400 images are held out.

  python -m vmoe.main --config=configs/vmoe_b16_every2_imagenet21k.py \
      --workdir=/tmp/vmoe_b16_every2 --config.dataset.train.data_dir=DIR \
      --config.dataset.val.data_dir=DIR

DIR: a TFDS data dir holding imagenet21k (built from the ImageNet-21k
archive; nothing is downloaded here).

Expected: the reference reports no upstream prec@1 for this run; its
fine-tuned descendant reaches 85.26% on ILSVRC2012 at 384px (a secondary
source, see the paper's table). Not reproduced here: the dataset is not
available offline and the run needs a TPU pod. Argument
(FILE.py:key=value,...): num_experts=8, k=2, seed=0.
"""
from vmoe.configs import common

NUM_CLASSES = 21_843
BATCH_SIZE = 4_096
DEFAULTS = dict(num_experts=8, k=2, seed=0)


def get_config(arg=None):
  a = common.parse_arg(arg, DEFAULTS)
  config = common.base_config(seed=a['seed'])
  config.description = f'ViT-B/16, E={a["num_experts"]}, K={a["k"]}, Every 2, 300 Epochs'
  labels = common.pp_labels(NUM_CLASSES)
  config.dataset = common.ConfigDict(dict(
      train=common.data_config(
          name='imagenet21k', split='full[102400:]', batch_size=BATCH_SIZE,
          process=f'decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,20)|{labels}',
          shuffle_buffer=250_000),
      val=common.data_config(
          name='imagenet21k', split='full[:102400]', batch_size=BATCH_SIZE,
          process=f'decode|resize_small(256)|central_crop(224)|{labels}')))
  config.model = common.vmoe_model(
      variant='B', patch=16, image_size=224, num_classes=NUM_CLASSES,
      num_experts=a['num_experts'], num_selected_experts=a['k'],
      moe_layers=common.every_n(2, common.VARIANTS['B']['num_layers']),
      representation_size=False, head_bias_init=-10.0)
  config.loss = common.ConfigDict(dict(name='sigmoid_xent'))
  config.optimizer = common.paper_optimizer(peak_value=8e-4)
  config.train_epochs = 300
  config.mixup = common.ConfigDict(dict(concentration=0.5, size=2,
                                        granularity='device'))
  return config
