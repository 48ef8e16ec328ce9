r"""Fine-tunes the released E3 S/32 (ILSVRC2012) on CIFAR-100 at 128x128: the reference's
recipe (google-research/vmoe, configs/eee_paper/eee_s32_last2_ilsvrc2012_ft_cifar100.py).

E3 (Efficient Ensembles of Experts, Allingham et al., arXiv 2110.03360; docs/e3.md): ViT-S/32
with 8 layers, MoE in blocks 5 and 7, E=8 experts split between M=2 ensemble members (4
each), K=1 per member, capacity factor 1.5, a 512-d pre-logits layer. Copy the released
checkpoint next to you first (this command reads local files only):

  gsutil -m cp 'gs://vmoe_checkpoints/eee_s32_last2_ilsvrc2012.*' /data/ckpt/
  CKPT=/data/ckpt/eee_s32_last2_ilsvrc2012
  python -m vmoe.main --workdir=/tmp/eee_s32_cifar100 \
      --config=configs/eee_s32_cifar100_finetune.py:path=$CKPT \
      --config.dataset.train.data_dir=DIR --config.dataset.val.data_dir=DIR \
      --config.dataset.test.data_dir=DIR

DIR: a TFDS data dir with cifar100 prepared (`tfds build cifar100`; nothing is
downloaded at run time).

config.initialization (source 'legacy') maps the upstream params with the reference's rules:
  ('reinit', '^head/')            a new 100-class head (1,000 upstream);
  ('resize_posemb', ...)          7x7 -> 4x4 position embeddings (224 -> 128 px, the
                                  reference's 'vit_zoom'), the class token's row kept;
  ('reshape', '/Moe/Router/dense/kernel$')   each router kernel to the model's
                                  [512, M=2, 4] (the reference's 'reshape');
and loads everything else as is.

The recipe is the reference's: train[:98%] / val train[98%:] / test, inception crop +
flip, batch 1,024, 2,000 steps, SGD momentum 0.9, warmup_cosine_decay (peak 0.005, 200
warmup steps, to 1e-5), global norm clipping at 10, loss ensemble_softmax_xent (each
member's softmax cross-entropy; evaluation: the NLL of the members' mean probability),
head bias -10, bfloat16 dispatch, no batch priority. Expected: 81.31% test accuracy (the
reference's mean over 3 fine-tuning seeds, its docstring); not run here (no CIFAR-100
and no accelerator offline). One difference: the reference's groups hold one device's
whole batch of 128 images (group_size 4,352 = 128 x 2 copies x 17 tokens, on 8 devices);
here 32 images (1,088), so that any device count up to 32 works; the capacity per token is
the same, only which tokens compete for it differs.

Argument (FILE.py:key=value,...): path=PREFIX (or --config.initialization.path=), seed=0.
On 8 devices, --config.mesh.expert=8 puts one expert per device, as the reference does.
"""
from vmoe.configs import common

NUM_CLASSES = 100
IMAGE_SIZE = 128
BATCH_SIZE = 1_024
DEFAULTS = dict(path='', seed=0)


def get_config(arg=None):
  a = common.parse_arg(arg, DEFAULTS)
  config = common.base_config(seed=a['seed'])
  config.description = 'E3-S/32, E=8, K=1, M=2, Last 2, fine-tuned on CIFAR-100'
  config.dataset = common.cifar_finetune_data('cifar100', num_classes=NUM_CLASSES,
                                               image_size=IMAGE_SIZE,
                                               batch_size=BATCH_SIZE)
  config.model = common.vmoe_model(
      variant='S', patch=32, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES,
      num_experts=8, num_selected_experts=1, router='e3', images_per_group=32,
      moe_layers=common.last_n(2, common.VARIANTS['S']['num_layers']),
      capacity_factor=1.5, head_bias_init=-10.0)
  config.initialization = common.initialization_config(
      source='legacy', path=a['path'],
      rules=[('reinit', '^head/'),
             ('resize_posemb', '^Encoder/posembed_input/pos_embedding$'),
             ('reshape', '/Moe/Router/dense/kernel$')])
  config.loss = common.ConfigDict(dict(name='softmax_xent'))
  config.optimizer = common.ConfigDict(dict(
      name='sgd', momentum=0.9,
      learning_rate=dict(schedule='warmup_cosine_decay', peak_value=0.005,
                         warmup_steps=200, end_value=1e-5),
      gradient_clip=dict(global_norm=10.0)))
  config.train_steps = 2_000
  config.evaluate.every_steps = 100
  config.save_checkpoint.every_steps = 1_000
  return common.with_ensemble(config)
