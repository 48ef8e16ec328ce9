"""Checks a training config before anything is built or compiled.

Three passes, each a ValueError naming the key, its value and the fix:
  check_config: the config alone (keys, types, values, the model), in
      milliseconds: a typo never costs a compilation;
  check_data: what needs the datasets' metadata (never their records): each
      dataset is prepared and each split exists and is not empty;
  check_inputs: what needs the shapes of the first batches (patches tile the
      images, MoE groups tile each device's tokens, labels match the classes).
The trainer runs all three, in this order, before it compiles anything.
"""
import dataclasses
import math
import sys
from typing import Any, Mapping, Sequence

import ml_collections
import tensorflow_datasets as tfds
from vmoe.checkpoints import initialization
from vmoe.data import pipeline
from vmoe.data import pp_ops
from vmoe.evaluate import fewshot
from vmoe.nn import models
from vmoe.nn import routers
from vmoe.parallel import mesh as mesh_lib
from vmoe.train import losses
from vmoe.train import mixup
from vmoe.train import optimizers
from vmoe.train import registry
from vmoe.train import schedules

# Top-level key -> the keys of its sub-config (None: not a sub-config of ours).
TOP_KEYS = {
    'dataset': None,  # {split name: DATASET_KEYS}; 'train' is the train split.
    'model': None,  # Checked by vmoe.nn.models.validate.
    'optimizer': None,  # Checked by vmoe.train.optimizers.check_config.
    'loss': frozenset({'name'}),
    'train_steps': None,
    'train_epochs': None,
    'seed': None,
    'description': None,
    'extra_rng_keys': None,
    'mixup': frozenset({'concentration', 'size', 'granularity'}),
    'save_checkpoint': frozenset({'every_steps', 'keep_last', 'keep_every'}),
    'evaluate': frozenset({'every_steps', 'model_overrides'}),
    'report_progress': frozenset({'every_steps', 'every_secs'}),
    'fewshot': None,  # Checked by vmoe.evaluate.fewshot.check_config.
    # Start from another checkpoint (vmoe.checkpoints.initialization).
    'initialization': frozenset(initialization.CONFIG_KEYS),
    'nonfinite': None,  # One of NONFINITE_MODES.
    'mesh': None,  # {axis: size}, see vmoe.parallel.mesh.
    'fsdp': None,  # Also split the non-expert params over 'data' (bool).
}
DATASET_KEYS = pipeline.KNOWN_KEYS
DATASET_REQUIRED = ('name', 'split', 'process', 'batch_size')
# Keys of final_metrics.json next to the eval split names.
RESERVED_SPLIT_NAMES = frozenset({'step', 'num_params', 'train_seconds_per_step',
                                  'fewshot'})
# What a step whose loss or gradient norm is NaN/Inf does (its update is never
# applied): 'stop' the run (default) or 'skip' it and go on.
NONFINITE_MODES = ('stop', 'skip')
CACHE_VALUES = (None, False, True, 'batched')


def to_dict(config: Any) -> dict:
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def _check_keys(d: Mapping[str, Any], valid, where: str):
  unknown = sorted(set(d) - set(valid))
  if unknown:
    raise ValueError(f'Unknown key(s) {unknown} in {where}; valid keys: '
                     f'{sorted(valid)}.')


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _positive_int(value, where: str, *, optional: bool = False):
  if value is None and optional:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{where}={value!r} must be a positive integer'
                     f'{" or None" if optional else ""}.')


def _sub(c: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
  """c[key] as a mapping ({} if unset)."""
  value = c.get(key)
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise ValueError(f'{where}.{key}={value!r} must be a sub-config (a dict).')
  return value


def check_key_path(config: Any, path: str):
  """Raises ValueError if the dotted `path` (e.g. 'optimizer.b1') is not in
  `config`, listing the valid keys where the lookup fails."""
  node, seen = config, []
  for part in path.split('.'):
    keys = list(node.keys()) if isinstance(node, Mapping) or hasattr(
        node, 'keys') else []
    if part not in keys:
      where = '.'.join(['config'] + seen)
      raise ValueError(f'Unknown config key {path!r}: {where} has no key '
                       f'{part!r}; valid keys: {sorted(keys)} (an override '
                       f'can only change keys the config file defines).')
    node, seen = node[part], seen + [part]


def flatten_overrides(overrides: Mapping[str, Any], prefix: str = '') -> dict:
  """{'encoder': {'moe': {'k': v}}} -> {'encoder.moe.k': v}."""
  flat = {}
  for k, v in overrides.items():
    if isinstance(v, Mapping):
      flat.update(flatten_overrides(v, f'{prefix}{k}.'))
    else:
      flat[f'{prefix}{k}'] = v
  return flat


def eval_model_config(config: Mapping[str, Any]) -> dict:
  """config.model with config.evaluate.model_overrides applied."""
  overrides = (config.get('evaluate') or {}).get('model_overrides') or {}
  return models.apply_overrides(config['model'], flatten_overrides(overrides))


def check_config(config: Any, *, num_devices: int = 1, num_processes: int = 1):
  """Raises ValueError naming the first bad key or value of `config`."""
  c = to_dict(config)
  _check_keys(c, TOP_KEYS, 'config')
  for key, valid in TOP_KEYS.items():
    if valid is not None:
      _check_keys(_sub(c, key, 'config'), valid, f'config.{key}')
  for key in ('dataset', 'model', 'optimizer', 'loss'):
    if not _sub(c, key, 'config'):
      raise ValueError(f'config.{key} is required.')
  _check_dataset(c['dataset'], num_devices=num_devices,
                 num_processes=num_processes)
  if (c.get('train_steps') is None) == (c.get('train_epochs') is None):
    raise ValueError(
        f'Give exactly one of config.train_steps and config.train_epochs, got '
        f'train_steps={c.get("train_steps")!r}, '
        f'train_epochs={c.get("train_epochs")!r}.')
  _positive_int(c.get('train_steps'), 'config.train_steps', optional=True)
  epochs = c.get('train_epochs')
  if epochs is not None and not (_is_number(epochs) and epochs > 0):
    raise ValueError(f'config.train_epochs={epochs!r} must be a number > 0.')
  seed = c.get('seed', 0)
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise ValueError(f'config.seed={seed!r} must be an integer.')
  mode = c.get('nonfinite', 'stop')
  if mode not in NONFINITE_MODES:
    raise ValueError(f'config.nonfinite={mode!r} is unknown; valid: '
                     f'{NONFINITE_MODES} (what a step with a NaN/Inf loss or '
                     f'gradient norm does: stop the run, or skip that step).')
  loss_name = c['loss'].get('name')
  if loss_name not in losses.LOSSES:
    raise ValueError(f'config.loss.name={loss_name!r} is unknown; valid: '
                     f'{sorted(losses.LOSSES)}.')
  _check_optimizer(c['optimizer'], c.get('train_steps'))
  if c.get('mixup'):
    registry.check_kwargs(mixup.check_config, c['mixup'], what='config.mixup')
    mixup.check_config(**c['mixup'])
  for key, sub in (('save_checkpoint', 'every_steps'), ('save_checkpoint', 'keep_last'),
                   ('save_checkpoint', 'keep_every'),
                   ('evaluate', 'every_steps'), ('report_progress', 'every_steps')):
    _positive_int(_sub(c, key, 'config').get(sub), f'config.{key}.{sub}',
                  optional=True)
  secs = _sub(c, 'report_progress', 'config').get('every_secs')
  if secs is not None and not (_is_number(secs) and secs > 0):
    raise ValueError(f'config.report_progress.every_secs={secs!r} must be a '
                     f'number > 0 or None.')
  models.validate(c['model'])
  overrides = _sub(c, 'evaluate', 'config').get('model_overrides')
  if overrides is not None and not isinstance(overrides, Mapping):
    raise ValueError(f'config.evaluate.model_overrides={overrides!r} must be a '
                     f'sub-config of model keys, e.g. {{"encoder": {{"moe": ...}}}}.')
  try:
    models.validate(eval_model_config(c))
  except ValueError as e:
    raise ValueError(f'config.evaluate.model_overrides give an invalid eval '
                     f'model: {e}') from None
  _check_rng_keys(c)
  if c.get('initialization'):
    initialization.check_config(c['initialization'])
  _check_mesh(c, num_devices)
  if c.get('fewshot') and num_processes > 1:
    raise ValueError(f'config.fewshot: few-shot probes gather every example\'s '
                     f'features on one host, so they run in single-process runs '
                     f'only; drop config.fewshot for this {num_processes}-process '
                     f'run (e.g. configs/digits.py:fewshot=False).')
  if c.get('fewshot'):
    fewshot.check_config(_sub(c, 'fewshot', 'config'))
    for split in ('train', 'test'):
      _check_data_config(c['fewshot'][split], f'config.fewshot.{split}',
                         num_devices=num_devices, num_processes=num_processes)
    _positive_int(c['fewshot'].get('every_steps'), 'config.fewshot.every_steps',
                  optional=True)


def _check_mesh(c: Mapping[str, Any], num_devices: int):
  """config.mesh fits the devices, its expert axis the experts of every MoE layer."""
  spec = c.get('mesh')
  if spec is not None and not isinstance(spec, Mapping):
    raise ValueError(f'config.mesh={spec!r} must be a dict of axis sizes, e.g. '
                     "{'data': -1, 'expert': 4}.")
  shape = mesh_lib.check_mesh(spec, num_devices)
  if not isinstance(c.get('fsdp', False), bool):
    raise ValueError(f'config.fsdp={c["fsdp"]!r} must be True or False.')
  experts = shape.get('expert', 1)
  for where, model in (('config.model', c['model']),
                       ('config.evaluate.model_overrides', eval_model_config(c))):
    moe = models.validate(model)['encoder'].get('moe') or {}
    if moe.get('layers') and moe['num_experts'] % experts:
      raise ValueError(
          f'{where}: encoder.moe.num_experts={moe["num_experts"]} is not divisible by '
          f'the mesh\'s expert axis (config.mesh={dict(spec or {})} -> {shape} on '
          f'{num_devices} devices); use a multiple of {experts} experts or a smaller '
          f'config.mesh.expert.')


def _check_rng_keys(c: Mapping[str, Any]):
  """The model's random streams in training must be in config.extra_rng_keys
  (flax would only fail while tracing the train step)."""
  rng_keys = c.get('extra_rng_keys', ())
  if (not isinstance(rng_keys, (list, tuple))
      or not all(isinstance(k, str) for k in rng_keys)):
    raise ValueError(f'config.extra_rng_keys={rng_keys!r} must be a tuple of '
                     f'names, e.g. ("dropout", "gating").')
  model = models.validate(c['model'])
  enc, needed = model['encoder'], []
  if enc.get('dropout_rate') or enc.get('attention_dropout_rate'):
    needed.append('dropout')
  moe = enc.get('moe') or {}
  if moe.get('layers'):
    router = moe['router']
    defaults = {f.name: f.default
                for f in dataclasses.fields(routers.ROUTERS[router['name']])}
    if router.get('noise_std', defaults.get('noise_std')):
      needed.append('gating')
  missing = [k for k in needed if k not in rng_keys]
  if missing:
    raise ValueError(f'config.extra_rng_keys={tuple(rng_keys)!r} lacks {missing}, '
                     f'which the model draws from in training (dropout rates > 0, '
                     f'router noise_std > 0); add them.')


def _check_optimizer(opt: Mapping[str, Any], train_steps: int | None):
  _sub(opt, 'gradient_clip', 'config.optimizer')
  optimizers.check_config(opt)
  norm = (opt.get('gradient_clip') or {}).get('global_norm')
  if norm is not None and not (_is_number(norm) and norm > 0):
    raise ValueError(f'config.optimizer.gradient_clip.global_norm={norm!r} must '
                     f'be a number > 0, or None for no clipping.')
  check_learning_rate(opt['learning_rate'], train_steps)


def check_learning_rate(lr: Any, train_steps: int | None):
  """config.optimizer.learning_rate: a rate or a schedule, for `train_steps`
  (None: not known yet, with train_epochs; check_data checks it again)."""
  where = 'config.optimizer.learning_rate'
  if _is_number(lr) or not isinstance(lr, Mapping):
    if not (_is_number(lr) and math.isfinite(lr) and lr >= 0):
      raise ValueError(f'{where}={lr!r} must be a finite number >= 0 or a '
                       f'schedule {{"schedule": NAME, ...}} with NAME in '
                       f'{sorted(schedules.SCHEDULES)}.')
    return
  for key, value in lr.items():
    if key != 'schedule' and value is not None and not (
        _is_number(value) and math.isfinite(value) and value >= 0):
      raise ValueError(f'{where}.{key}={value!r} must be a finite number >= 0.')
  try:
    schedules.create_schedule(lr, total_steps=train_steps or sys.maxsize)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None


def _check_dataset(dataset: Mapping[str, Any], *, num_devices: int,
                   num_processes: int):
  if 'train' not in dataset:
    raise ValueError(f'config.dataset needs a "train" split (the training '
                     f'data); it has {sorted(dataset)}.')
  for split, cfg in dataset.items():
    where = f'config.dataset.{split}'
    if split in RESERVED_SPLIT_NAMES:
      raise ValueError(f'{where}: the split name {split!r} is reserved (a key of '
                       f'final_metrics.json); rename it.')
    _check_data_config(cfg, where, num_devices=num_devices, num_processes=num_processes)


def _check_data_config(cfg: Any, where: str, *, num_devices: int, num_processes: int):
  if not isinstance(cfg, Mapping):
    raise ValueError(f'{where} must be a sub-config with keys '
                     f'{sorted(DATASET_KEYS)}, got {cfg!r}.')
  _check_keys(cfg, DATASET_KEYS, where)
  missing = [k for k in DATASET_REQUIRED if cfg.get(k) is None]
  if missing:
    raise ValueError(f'{where} lacks {missing}; valid keys: '
                     f'{sorted(DATASET_KEYS)}.')
  for key in ('name', 'split', 'process', 'process_batch', 'data_dir', 'manual_dir'):
    if cfg.get(key) is not None and not isinstance(cfg[key], str):
      raise ValueError(f'{where}.{key}={cfg[key]!r} must be a string.')
  for key, kind in (('process', 'example'), ('process_batch', 'batch')):
    if cfg.get(key):
      try:
        pp_ops.get_pp_fn(cfg[key], kind)
      except ValueError as e:
        raise ValueError(f'{where}.{key}: {e}') from None
  batch_size = cfg['batch_size']
  _positive_int(batch_size, f'{where}.batch_size')
  if batch_size % num_devices or batch_size % num_processes:
    raise ValueError(
        f'{where}.batch_size={batch_size} (the global batch) must be '
        f'divisible by the {num_devices} devices and the {num_processes} '
        f'processes; use a multiple of {num_devices}.')
  if cfg.get('cache') not in CACHE_VALUES:
    raise ValueError(f'{where}.cache={cfg["cache"]!r} must be one of '
                     f'{CACHE_VALUES}.')
  buffer = cfg.get('shuffle_buffer')
  if buffer is not None and not (isinstance(buffer, int) and buffer >= 0):
    raise ValueError(f'{where}.shuffle_buffer={buffer!r} must be an integer >= 0 '
                     f'(examples), or None for the default.')
  prefetch = cfg.get('prefetch')
  if prefetch is not None and not (isinstance(prefetch, int) and prefetch >= -1):
    raise ValueError(f'{where}.prefetch={prefetch!r} must be an integer >= 0 '
                     f'(batches), or None / -1 to autotune.')


def data_entries(config: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
  """{'dataset.train': cfg, 'dataset.test': cfg, 'fewshot.train': cfg, ...}."""
  entries = {f'dataset.{k}': v for k, v in sorted(
      config['dataset'].items(), key=lambda kv: kv[0] != 'train')}
  if config.get('fewshot'):
    entries.update({f'fewshot.{k}': config['fewshot'][k] for k in ('train', 'test')})
  return entries


def check_data(config: Any, *, num_processes: int = 1):
  """Checks every dataset entry against its TFDS metadata (reads no record):
  the dataset is prepared, the split exists and gives every process examples.
  With train_epochs, also the learning-rate schedule against the step count."""
  c = to_dict(config)
  for name, cfg in data_entries(c).items():
    where = f'config.{name}'
    # pylint: disable=protected-access
    try:
      builder = pipeline._builder(ml_collections.ConfigDict(cfg))
    except ValueError as e:
      raise ValueError(f'{where}.name={cfg["name"]!r}: {e}') from None
    try:
      n = pipeline._split_info(builder, cfg['split']).num_examples
      if name == 'dataset.train':  # Each process trains on its own shard.
        for shard in tfds.even_splits(cfg['split'], num_processes):
          pipeline._split_info(builder, shard)
    except ValueError as e:
      raise ValueError(f'{where}.split={cfg["split"]!r}: {e}') from None
    # pylint: enable=protected-access
    if name == 'dataset.train' and c.get('train_epochs') is not None:
      check_learning_rate(c['optimizer']['learning_rate'],
                          math.ceil(c['train_epochs'] * n / cfg['batch_size']))


def check_inputs(config: Any, batches: Mapping[str, Mapping[str, Sequence[int]]],
                 *, num_devices: int = 1):
  """Checks what depends on the shapes of the data, before anything compiles.

  Args:
    config: the training config (check_config passed).
    batches: the shapes of one batch of every entry of data_entries(config),
      e.g. {'dataset.train': {'image': [B, H, W, C], 'labels': [B, K]}, ...}.
    num_devices: the devices the global batch_size is split over.
  """
  c = to_dict(config)
  eval_model = models.validate(eval_model_config(c))
  train_image = tuple(batches['dataset.train'].get('image', ()))
  for name, cfg in data_entries(c).items():
    where, shapes = f'config.{name}', batches[name]
    model = models.validate(c['model']) if name == 'dataset.train' else eval_model
    image = tuple(shapes.get('image', ()))
    if len(image) != 4:
      raise ValueError(f'{where}.process must give "image" batches [B, H, W, C], '
                       f'got {shapes}.')
    if image[3] != train_image[3]:
      raise ValueError(f'{where}.process gives {image[3]}-channel images, '
                       f'config.dataset.train {train_image[3]}-channel ones (the '
                       f'patch kernel is shaped by them); make them agree.')
    tokens = [(s[1] // model['patch_size'][0]) * (s[2] // model['patch_size'][1])
              for s in (image, train_image)]
    if (model['encoder']['position_emb'].get('name', 'learned') == 'learned'
        and tokens[0] != tokens[1]):
      raise ValueError(f'{where}.process gives {image[1]}x{image[2]} images, '
                       f'{tokens[0]} patches, but the learned position embedding '
                       f'is shaped by the {tokens[1]} patches of '
                       f'config.dataset.train; resize to {train_image[1:3]}.')
    k = model.get('num_classes')
    if name.startswith('dataset.') and k:
      labels = tuple(shapes.get('labels', ()))
      if labels[-1:] != (k,):
        raise ValueError(f'{where}.process gives "labels" of shape {labels} but '
                         f'config.model.num_classes={k}: one-hot them to {k} '
                         f'classes (onehot({k}, key="label", key_result="labels")) '
                         f'or fix model.num_classes.')
    b = cfg['batch_size'] // num_devices
    try:
      models.check_input(model, b, image[1:3])
    except ValueError as e:
      raise ValueError(f'{where} (batch_size={cfg["batch_size"]} over '
                       f'{num_devices} devices: {b} images per device): {e}') from None


def check_initialization(config: Any, params: Any):
  """config.initialization against the model's params (a tree of
  jax.ShapeDtypeStruct) and the checkpoint's names and shapes (its index or
  array headers; no array is read): each rule matches, each checkpoint tensor
  is used, each param filled, the shapes agree (unless allowed). The trainer
  runs it for a new run only: a resumed run ignores config.initialization."""
  init = to_dict(config).get('initialization')
  if init:
    initialization.plan(params, init)
