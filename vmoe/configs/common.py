"""Building blocks shared by the config files in configs/.

A config file defines `get_config(arg=None)`; `arg` is the text after ':' in
`--config=configs/FILE.py:ARG`, a comma-separated list of key=value pairs
parsed by `parse_arg`.
"""
import ast
import importlib.util
import math
import os
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict
from vmoe.nn import routers

ConfigDict = ml_collections.ConfigDict

# ViT variants of the V-MoE paper (its "S" has 8 layers, unlike later ViT-S).
VARIANTS = {
    'S': dict(hidden_size=512, num_layers=8, mlp_dim=2048, num_heads=8),
    'B': dict(hidden_size=768, num_layers=12, mlp_dim=3072, num_heads=12),
    'L': dict(hidden_size=1024, num_layers=24, mlp_dim=4096, num_heads=16),
    'H': dict(hidden_size=1280, num_layers=32, mlp_dim=5120, num_heads=16),
    # V-MoE 15B's backbone (ViT-G-like; the paper's largest model).
    '15B': dict(hidden_size=1408, num_layers=48, mlp_dim=6400, num_heads=16),
    # The later ViT-S (vision_transformer's AugReg and big_vision checkpoints).
    'S12': dict(hidden_size=384, num_layers=12, mlp_dim=1536, num_heads=6),
    # ViT-Tiny (DeiT; Mobile V-MoE's largest model).
    'Ti': dict(hidden_size=192, num_layers=12, mlp_dim=768, num_heads=3),
}


def parse_arg(arg: str | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """'k1=v1,k2=v2' -> defaults updated with the parsed values.

  Values are Python literals (3, 0.5, True, None) or else plain strings, and
  must have the type of the default (an int is accepted for a float).
  """
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, text = item.partition('=')
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f'Bad config argument {item!r}: expected key=value with '
                       f'key in {sorted(defaults)}.')
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = text.strip()
    default = defaults[key]
    if default is not None and not isinstance(value, type(default)):
      if isinstance(default, float) and isinstance(value, int):
        value = float(value)
      else:
        raise ValueError(f'Config argument {key}={text!r} must be of type '
                         f'{type(default).__name__}, like the default {default!r}.')
    out[key] = value
  return out


def load_config(spec: str) -> ConfigDict:
  """'path/to/FILE.py[:ARG]' -> FILE.get_config(ARG), as --config does."""
  path, _, arg = spec.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(f'config_{name}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def base_config(*, seed: int = 0) -> ConfigDict:
  """Run options every config has (the reference's names and defaults)."""
  c = ConfigDict()
  c.seed = seed
  c.extra_rng_keys = ('dropout', 'gating')
  # keep_every=N also keeps every checkpoint whose step is a multiple of N.
  c.save_checkpoint = ConfigDict(dict(every_steps=1_000, keep_last=1,
                                      keep_every=config_dict.placeholder(int)))
  c.evaluate = ConfigDict(dict(every_steps=1_000))
  c.report_progress = ConfigDict(dict(
      every_steps=100, every_secs=config_dict.placeholder(float)))
  # A step with a NaN/Inf loss or gradient norm is never applied; 'stop' ends
  # the run naming the last good checkpoint, 'skip' goes on.
  c.nonfinite = 'stop'
  # Device mesh over all devices of all processes (-1: the rest), e.g.
  # --config.mesh.expert=4 spreads each MoE layer's experts over 4 devices.
  c.mesh = ConfigDict(dict(data=-1, expert=1))
  # True: also split the non-expert params and their optimizer state over 'data'.
  c.fsdp = False
  return c


def cifar_finetune_data(name: str, *, num_classes: int, image_size: int,
                        batch_size: int) -> ConfigDict:
  """config.dataset of the reference's CIFAR fine-tuning configs: train[:98%] with
  inception crop and flip, val train[98%:] and test resized to `image_size`."""
  labels = pp_labels(num_classes)
  eval_pp = f'decode|resize({image_size})|{labels}'
  return ConfigDict(dict(
      train=data_config(
          name=name, split='train[:98%]', batch_size=batch_size,
          process=f'decode|inception_crop({image_size})|flip_lr|{labels}',
          shuffle_buffer=50_000),
      val=data_config(name=name, split='train[98%:]', process=eval_pp,
                      batch_size=batch_size),
      test=data_config(name=name, split='test', process=eval_pp, batch_size=batch_size)))


def data_config(*, name: str, split: str, process: str, batch_size: int,
                shuffle_buffer: int | None = None, cache: bool | str | None = None,
                prefetch: int = 2, data_dir: str | None = None) -> ConfigDict:
  """One entry of config.dataset; batch_size is the global batch. cache: None, False,
  True, 'loaded' or 'batched' (vmoe.data.pipeline), any of them settable from the command
  line."""
  return ConfigDict(dict(
      name=name, split=split, process=process, batch_size=batch_size,
      shuffle_buffer=config_dict.placeholder(int) if shuffle_buffer is None
      else shuffle_buffer,
      cache=config_dict.FieldReference(cache, field_type=object),
      prefetch=prefetch,
      data_dir=config_dict.placeholder(str) if data_dir is None else data_dir))


def pp_labels(num_classes: int) -> str:
  """The common tail of the preprocessing strings: [-1, 1] pixels, one-hot."""
  return (f'value_range(-1,1)|onehot({num_classes}, key="label", '
          f'key_result="labels")|keep("image", "labels")')


def imagenet_datasets(batch_size: int, num_classes: int = 1000) -> ConfigDict:
  """config.dataset of the paper's ILSVRC2012 runs at 224 px: inception crop and
  RandAugment(2, 10) for training on train[:99%], the last 1% as val, the official
  validation split as test."""
  labels = pp_labels(num_classes)
  eval_pp = f'decode|resize_small(256)|central_crop(224)|{labels}'
  return ConfigDict(dict(
      train=data_config(
          name='imagenet2012', split='train[:99%]', batch_size=batch_size,
          process=f'decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,10)|{labels}',
          shuffle_buffer=50_000),
      val=data_config(name='imagenet2012', split='train[99%:]', process=eval_pp,
                      batch_size=batch_size),
      test=data_config(name='imagenet2012', split='validation', process=eval_pp,
                       batch_size=batch_size)))


# Short names of the MoE variants the papers compare (e.g. `router=NAME` of
# configs/digits.py): (router class, router options, dispatcher options, MoE layer
# options). layers='last': the same number of MoE layers, moved to the end of the encoder
# (Mobile V-MoE routes images by what the dense blocks before them computed).
NO_LOSSES = {'importance_loss_weight': 0.0, 'load_loss_weight': 0.0}
ROUTER_VARIANTS = {
    'dense': ('NoisyTopExpertsPerItemRouter', {}, {}, {'layers': ()}),  # No MoE.
    'top_k': ('NoisyTopExpertsPerItemRouter', {}, {}, {}),  # V-MoE.
    'top_k_bpr': ('NoisyTopExpertsPerItemRouter', {}, {'batch_priority': True}, {}),
    # Beyond the papers: ST-MoE's router z-loss; DeepSeek-V3's bias balancing instead of
    # the auxiliary losses; and neither, the baseline both are measured against.
    'top_k_zloss': ('NoisyTopExpertsPerItemRouter', {'z_loss_weight': 1e-3}, {}, {}),
    'top_k_bias': ('NoisyTopExpertsPerItemRouter',
                   {'load_balancing': 'bias', **NO_LOSSES}, {}, {}),
    'top_k_unbalanced': ('NoisyTopExpertsPerItemRouter', NO_LOSSES, {}, {}),
    'expert_choice': ('NoisyTopItemsPerExpertRouter', {}, {}, {}),
    'sinkhorn_tc': ('SinkhornTopExpertsPerItemRouter', {}, {}, {}),
    'sinkhorn_ec': ('SinkhornTopItemsPerExpertRouter', {}, {}, {}),
    'sparse_ec': ('SparseTransportTopItemsPerExpertRouter', {}, {}, {}),
    'ksparse_ec': ('KSparseTransportTopItemsPerExpertRouter', {}, {}, {}),
    'ksparse_tc': ('KSparseTransportTopExpertsPerItemRouter', {}, {}, {}),
    'soft': ('SoftRouter', {}, {}, {}),
    # Mobile V-MoE: one per-image router for the MoE part (the last blocks).
    'per_image': ('PerImageRouter', {}, {}, {'layers': 'last'}),
    # Needs moe_config(superclasses=PATH), from python -m vmoe.tools.superclasses.
    'per_image_superclass': ('PerImageRouter', {}, {}, {'layers': 'last'}),
    # The same with a per-image router in every MoE layer (for comparison).
    'per_image_layer': ('PerImageRouter', {'scope': 'layer'}, {}, {'layers': 'last'}),
    'per_image_layer_superclass': ('PerImageRouter', {'scope': 'layer'}, {},
                                   {'layers': 'last'}),
    'shared_expert': ('NoisyTopExpertsPerItemRouter', {}, {}, {'shared_experts': 1}),
    # E3 (VisionTransformerMoeEnsemble): the E experts split between M=2 members, K=1 per
    # member; and the V-MoE with the same E and K it is compared with.
    'e3': ('NoisyTopExpertsPerItemRouter', {'num_selected_experts': 1}, {},
           {'ensemble_size': 2}),
    'top_1': ('NoisyTopExpertsPerItemRouter', {'num_selected_experts': 1}, {}, {}),
}


def router_config(name: str, *, num_selected_experts: int,
                  capacity_factor: float, bfloat16: bool = False) -> ConfigDict:
  """Router class `name` with the V-MoE paper's settings, keeping only the
  options that router has (expert choice has no num_selected_experts, Soft MoE
  sizes its slots itself and adds no noise).

  Routers without num_selected_experts size their buffers from the S tokens
  of a group rather than from S * K choices; their capacity factor is scaled
  by K so that every router does the same expert compute.
  """
  defaults = routers.options(name)
  fields = set(defaults)
  if 'num_selected_experts' not in fields:
    capacity_factor *= num_selected_experts
  dispatcher = dict(name='einsum', bfloat16=bfloat16)
  wanted = dict(num_selected_experts=num_selected_experts,
                # The paper's 0.005 where the reference's default is 1 (its
                # transport routers default to 0: they balance by their plan).
                **{k: 0.005 for k in ('importance_loss_weight', 'load_loss_weight')
                   if defaults.get(k)},
                # Present, so that --config...z_loss_weight=W and
                # --config...load_balancing=bias work from the command line.
                z_loss_weight=0.0, load_balancing='losses', bias_update_rate=1e-3,
                # A typed empty value, so that --config...superclasses=PATH works.
                superclasses=config_dict.placeholder(str))
  if routers.ROUTERS[name].SLOTS == 'soft':  # Sizes its slots itself, adds no noise.
    fields.add('capacity_factor')
    wanted['capacity_factor'] = capacity_factor
  else:
    dispatcher['capacity_factor'] = capacity_factor
    wanted['noise_std'] = 1.0
  return ConfigDict({'name': name, 'dispatcher': dispatcher,
                     **{k: v for k, v in wanted.items() if k in fields}})


def moe_config(router: str, *, layers, num_layers: int, num_experts: int,
               group_size: int, num_selected_experts: int, capacity_factor: float,
               bfloat16: bool = False, superclasses: str | None = None) -> ConfigDict:
  """model.encoder.moe for `router`: a short name of ROUTER_VARIANTS or a
  router class name of vmoe.nn.routers.ROUTERS.

  superclasses: the JSON of python -m vmoe.tools.superclasses, needed by the
  '*_superclass' variants (one super-class per expert).
  """
  variant = router
  if router in ROUTER_VARIANTS:
    router, router_options, dispatcher_options, moe_options = ROUTER_VARIANTS[router]
  elif routers.canonical(router) in routers.ROUTERS:
    router = routers.canonical(router)
    router_options, dispatcher_options, moe_options = {}, {}, {}
  else:
    raise ValueError(f'router={router!r} is unknown; valid: '
                     f'{sorted(ROUTER_VARIANTS)} or a router class of '
                     f'{sorted(routers.ROUTERS)}.')
  r = router_config(router, num_selected_experts=num_selected_experts,
                    capacity_factor=capacity_factor, bfloat16=bfloat16)
  r.update(router_options)
  r.dispatcher.update(dispatcher_options)
  if variant.endswith('_superclass'):
    if not superclasses:
      raise ValueError(
          f'router={variant} needs a super-class file: derive one from a '
          'trained dense model with python -m vmoe.tools.superclasses and pass its '
          'path (superclasses=PATH).')
    r.superclasses = superclasses
  elif superclasses:
    raise ValueError(f'superclasses={superclasses!r} is only used by the '
                     f'*_superclass routers, not router={variant!r}.')
  moe_options = dict(moe_options)
  if moe_options.get('layers') == 'last':
    moe_options['layers'] = tuple(range(num_layers - len(tuple(layers)), num_layers))
  # dropout_rate: the experts' dropout, None for the encoder's (typed, so that
  # --config...moe.dropout_rate=0.1 works).
  moe = ConfigDict(dict(layers=tuple(layers), num_experts=num_experts,
                        group_size=group_size, split_rngs=False, router=r,
                        dropout_rate=config_dict.placeholder(float)))
  moe.update(moe_options)
  return moe


def vmoe_model(*, variant: str, patch: int, image_size: int, num_classes: int,
               num_experts: int, num_selected_experts: int, moe_layers,
               images_per_group: int = 8, capacity_factor: float = 1.05,
               router: str = 'top_k',
               superclasses: str | None = None,
               representation_size: bool = True,
               head_bias_init: float | None = None) -> ConfigDict:
  """V-MoE in the reference's schema ('token' classifier, as in the paper).

  Groups hold `images_per_group` images' tokens, so a group never spans two
  devices as long as each device has a multiple of that many images.
  """
  v = VARIANTS[variant]
  tokens = (image_size // patch) ** 2 + 1  # + the class token.
  return ConfigDict(dict(
      name='VisionTransformerMoe',
      num_classes=num_classes,
      patch_size=(patch, patch),
      hidden_size=v['hidden_size'],
      classifier='token',
      representation_size=v['hidden_size'] if representation_size else None,
      head_bias_init=(-math.log(num_classes) if head_bias_init is None
                      else head_bias_init),
      encoder=dict(
          num_layers=v['num_layers'], mlp_dim=v['mlp_dim'],
          num_heads=v['num_heads'], dropout_rate=0.0,
          attention_dropout_rate=0.0,
          # split_rngs=False: the paper starts all experts identical.
          moe=moe_config(router, layers=moe_layers, num_layers=v['num_layers'],
                         num_experts=num_experts, superclasses=superclasses,
                         group_size=images_per_group * tokens,
                         num_selected_experts=num_selected_experts,
                         capacity_factor=capacity_factor, bfloat16=True)),
  ))


def with_ensemble(config: ConfigDict) -> ConfigDict:
  """config made E3 where its MoE has ensemble_size M > 1 (the 'e3' router variant):
  model.name VisionTransformerMoeEnsemble, group_size times M (a group holds its images'
  M copies, as the reference counts it) and the ensemble version of config.loss."""
  moe = config.model.encoder.get('moe') or {}
  m = moe.get('ensemble_size', 1)
  if m > 1:
    config.model.name = 'VisionTransformerMoeEnsemble'
    moe.group_size *= m
    if not config.loss.name.startswith('ensemble_'):
      config.loss.name = f'ensemble_{config.loss.name}'
  return config


def adamw_optimizer(*, peak_value: float, warmup_steps: int, weight_decay: float,
                    schedule: str = 'warmup_cosine_decay',
                    global_norm: float | None = None) -> ConfigDict:
  """AdamW (b1 0.9, b2 0.999), warmup to `peak_value` then decay to 0 by `schedule`;
  gradient clipping at `global_norm` (None: none, settable from the command line)."""
  return ConfigDict(dict(
      name='adamw', b1=0.9, b2=0.999, weight_decay=weight_decay,
      learning_rate=dict(schedule=schedule, peak_value=peak_value,
                         warmup_steps=warmup_steps, end_value=0.0),
      gradient_clip=dict(global_norm=config_dict.placeholder(float) if global_norm is None
                         else global_norm)))


def pixel_loss(ignore_label: int = 255) -> ConfigDict:
  """config.loss of a segmenter: softmax cross-entropy per pixel, pixels of
  `ignore_label` left out (vmoe.train.losses.PixelLoss)."""
  return ConfigDict(dict(name='pixel_softmax_xent', ignore_label=ignore_label,
                         label_smoothing=0.0))


def paper_optimizer(*, peak_value: float, warmup_steps: int = 10_000,
                    global_norm: float | None = 1.0) -> ConfigDict:
  """Adam, linear warmup and decay to 1e-5, decay 0.1 on kernels (paper)."""
  return ConfigDict(dict(
      name='adam', b1=0.9, b2=0.999,
      weight_decay=[('.*/kernel', 0.1)],
      learning_rate=dict(schedule='warmup_linear_decay', peak_value=peak_value,
                         end_value=1e-5, warmup_steps=warmup_steps),
      gradient_clip=dict(global_norm=global_norm)))


def initialization_config(*, source: str, path: str | None = None, rules=(),
                          allow_unused=None, allow_missing=None,
                          allow_mismatched=None, freeze=None) -> ConfigDict:
  """config.initialization: start a new run from a checkpoint through ordered
  rules (vmoe.checkpoints.initialization). Every key is present, so that
  e.g. --config.initialization.path=PATH can set it."""
  return ConfigDict(dict(
      source=source, path=path or None, rules=list(rules),
      allow_unused=allow_unused, allow_missing=allow_missing,
      allow_mismatched=allow_mismatched, freeze=freeze or None))


def vit_upcycle_rules(layers, num_experts: int) -> list[tuple]:
  """config.initialization rules from a vision_transformer / big_vision ViT .npz: their
  names -> ours, the MLPs of the MoE blocks `layers` -> their E experts (sparse
  upcycling), and the checkpoint's classifier head left out (a new one starts fresh)."""
  blocks = '|'.join(map(str, layers))
  return [('rename', '^Transformer/', 'Encoder/'),
          ('rename', '/MultiHeadDotProductAttention_[01]/', '/SelfAttention/'),
          ('rename', '/LayerNorm_[12]/', '/LayerNorm_1/'),
          ('rename', '/MlpBlock_[03]/', '/Mlp/'),
          ('rename', rf'^(Encoder/encoderblock_({blocks}))/Mlp/', r'\1/Moe/Mlp/'),
          ('expand_tile', '/Moe/Mlp/', num_experts),
          ('reinit', '^head/')]


def every_n(n: int, num_layers: int) -> tuple[int, ...]:
  """'Every-n' MoE placement: blocks n-1, 2n-1, ... (every other block for n=2)."""
  return tuple(range(n - 1, num_layers, n))


def last_n(n: int, num_layers: int) -> tuple[int, ...]:
  """'Last-n' MoE placement: the last n odd blocks, e.g. (5, 7) for n=2 of 8 layers."""
  return tuple(range(1, num_layers, 2))[-n:]
