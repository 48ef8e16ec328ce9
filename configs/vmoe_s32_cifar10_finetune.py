r"""Fine-tunes the released V-MoE S/32 (ILSVRC2012) on CIFAR-10 at 384x384.

The upstream checkpoint is Google's vmoe_s32_last2_ilsvrc2012_randaug_light1
(configs/vmoe_s32_last2_ilsvrc2012.py: ViT-S/32 with 8 layers, E=8, K=2, MoE in
blocks 5 and 7, 224 px, a 512-d pre-logits layer, 1,000 classes), in the released
(legacy) format. Copy it next to you first (this command reads local files only):

  gsutil -m cp 'gs://vmoe_checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1.*' /data/ckpt/
  CKPT=/data/ckpt/vmoe_s32_last2_ilsvrc2012_randaug_light1
  python -m vmoe.main --workdir=/tmp/vmoe_s32_cifar10 \
      --config=configs/vmoe_s32_cifar10_finetune.py:path=$CKPT \
      --config.dataset.train.data_dir=DIR --config.dataset.val.data_dir=DIR \
      --config.dataset.test.data_dir=DIR

DIR: a TFDS data dir with cifar10 prepared (`tfds build cifar10`; nothing is
downloaded at run time).

config.initialization (source 'legacy'; only the slices each process's devices
hold are read) maps the upstream params onto this model with three rules:
  ('drop', '^pre_logits/')       the fine-tuned model has no pre-logits layer;
  ('resize_posemb', ...)         7x7 -> 12x12 position embeddings (224 -> 384 px,
                                 bilinear), the class token's row kept;
  ('reinit', '^head/')           a new 10-class head (1,000 upstream).
Everything else (patch embedding, class token, attention, experts, routers) is
loaded as is; the start-up log lists each param and where it came from.

The recipe is the reference's (google-research/vmoe): its S/32 fine-tuning config
(vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012: 384 px, no pre-logits,
capacity factor 1.5, head re-initialised) and its CIFAR-10 fine-tuning config
(vmoe_b16_imagenet21k_randaug_strong_ft_cifar10: train[:98%] / val train[98%:] /
test, inception crop + flip, batch 1,024, 1,000 steps, SGD momentum 0.9,
warmup_cosine_decay to 1e-5 with peak 0.0015 and 100 warmup steps, global norm
clipping at 10, softmax cross-entropy). Expected: not measured here (no CIFAR-10
and no accelerator offline); the reference reports 98.7% test accuracy for its
larger B/16 ImageNet-21k upstream with this CIFAR-10 recipe.

Argument (FILE.py:key=value,...): path=PREFIX (or --config.initialization.path=),
seed=0. On 8 or more devices, --config.mesh.expert=8 puts one expert per device,
as the reference does.
"""
from vmoe.configs import common

NUM_CLASSES = 10
IMAGE_SIZE = 384
BATCH_SIZE = 1_024
UPSTREAM = dict(variant='S', patch=32, num_experts=8, num_selected_experts=2)
DEFAULTS = dict(path='', seed=0)


def get_config(arg=None):
  a = common.parse_arg(arg, DEFAULTS)
  config = common.base_config(seed=a['seed'])
  config.description = 'ViT-S/32, E=8, K=2, Last 2, fine-tuned on CIFAR-10 at 384 px'
  config.dataset = common.cifar_finetune_data('cifar10', num_classes=NUM_CLASSES,
                                               image_size=IMAGE_SIZE,
                                               batch_size=BATCH_SIZE)
  config.model = common.vmoe_model(
      **UPSTREAM, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES,
      moe_layers=common.last_n(2, common.VARIANTS['S']['num_layers']),
      capacity_factor=1.5, representation_size=False)
  config.initialization = common.initialization_config(
      source='legacy', path=a['path'],
      rules=[('drop', '^pre_logits/'),
             ('resize_posemb', '^Encoder/posembed_input/pos_embedding$'),
             ('reinit', '^head/')])
  config.loss = common.ConfigDict(dict(name='softmax_xent'))
  config.optimizer = common.ConfigDict(dict(
      name='sgd', momentum=0.9,
      learning_rate=dict(schedule='warmup_cosine_decay', peak_value=0.0015,
                         warmup_steps=100, end_value=1e-5),
      gradient_clip=dict(global_norm=10.0)))
  config.train_steps = 1_000
  config.evaluate.every_steps = 100
  return config
