r"""V-MoE 15B: 48 blocks, width 1408, MLP 6400, 16 heads, patch 14, E=32, K=2, MoE
in every other block (24 MoE layers) -- the V-MoE paper's largest model.

The paper pre-trains it on JFT-300M (not public); this config uses ImageNet-21k
at 224 px with the paper's recipe otherwise (batch 4096, sigmoid cross-entropy,
big_vision Adafactor with factored second moments and bfloat16 momentum, as its
ViT-G/14 baseline, so that the optimizer state stays at half the params). 14.7B parameters; 29 GB of
float32 params alone, so it needs expert parallelism. Plan the memory first,
from abstract shapes only (nothing is allocated):

  python -m vmoe.plan --config=configs/vmoe_15b.py --mesh=data:16,expert:32

and train on a pod with the same mesh (config.mesh):

  python -m vmoe.main --config=configs/vmoe_15b.py --workdir=gs://BUCKET/vmoe_15b \
      --config.dataset.train.data_dir=DIR --config.dataset.val.data_dir=DIR

Not run here: it needs a TPU pod (the paper used a TPUv3-1024-class slice).
Argument (FILE.py:key=value,...): num_experts=32, k=2, seed=0.
"""
from vmoe.configs import common

NUM_CLASSES = 21_843
BATCH_SIZE = 4_096
DEFAULTS = dict(num_experts=32, k=2, seed=0)


def get_config(arg=None):
  a = common.parse_arg(arg, DEFAULTS)
  config = common.base_config(seed=a['seed'])
  config.description = f'V-MoE 15B (ViT-15B/14), E={a["num_experts"]}, K={a["k"]}, Every 2'
  labels = common.pp_labels(NUM_CLASSES)
  config.dataset = common.ConfigDict(dict(
      train=common.data_config(
          name='imagenet21k', split='full[102400:]', batch_size=BATCH_SIZE,
          process=f'decode_jpeg_and_inception_crop(224)|flip_lr|{labels}',
          shuffle_buffer=250_000),
      val=common.data_config(
          name='imagenet21k', split='full[:102400]', batch_size=BATCH_SIZE,
          process=f'decode|resize_small(256)|central_crop(224)|{labels}')))
  config.model = common.vmoe_model(
      variant='15B', patch=14, image_size=224, num_classes=NUM_CLASSES,
      num_experts=a['num_experts'], num_selected_experts=a['k'],
      moe_layers=common.every_n(2, common.VARIANTS['15B']['num_layers']),
      representation_size=False, head_bias_init=-10.0)
  # 8 images per device keep ~15 GiB of activations for the backward pass (vmoe.plan);
  # recomputing each block from its input keeps ~1 GiB, for about one more forward pass.
  config.model.encoder.remat = 'full'
  # One (dense, MoE) pair of blocks compiled once and scanned 24 times: compile time of
  # a 2-block model instead of 48 (benchmarks/compile_scan.py). Checkpoints load into
  # either layout (vmoe/nn/scan.py).
  config.model.encoder.scan = True
  config.loss = common.ConfigDict(dict(name='sigmoid_xent'))
  config.optimizer = common.ConfigDict(dict(
      name='big_vision_adafactor', momentum_dtype='bfloat16',
      weight_decay=[('.*/kernel', 0.03)],
      learning_rate=dict(schedule='big_vision_rsqrt', peak_value=8e-4,
                         warmup_steps=10_000, timescale=10_000,
                         cooldown_steps=50_000),
      gradient_clip=dict(global_norm=1.0)))
  config.train_epochs = 7
  return config
