"""Checks a training config against the keys the trainer understands.

Runs before anything is built, so that a typo costs a second, not a
compilation: every unknown key is an error that lists the valid ones.
"""
from typing import Any, Mapping

import ml_collections
from vmoe.data import pipeline
from vmoe.data import pp_ops
from vmoe.evaluate import fewshot
from vmoe.nn import models
from vmoe.train import losses
from vmoe.train import mixup
from vmoe.train import optimizers
from vmoe.train import registry

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
    'save_checkpoint': frozenset({'every_steps', 'keep_last'}),
    'evaluate': frozenset({'every_steps', 'model_overrides'}),
    'report_progress': frozenset({'every_steps', 'every_secs'}),
    'fewshot': None,  # Checked by vmoe.evaluate.fewshot.check_config.
}
DATASET_KEYS = pipeline.KNOWN_KEYS
DATASET_REQUIRED = ('name', 'split', 'process', 'batch_size')
# Keys of final_metrics.json next to the eval split names.
RESERVED_SPLIT_NAMES = frozenset({'step', 'num_params', 'train_seconds_per_step',
                                  'fewshot'})


def to_dict(config: Any) -> dict:
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def _check_keys(d: Mapping[str, Any], valid, where: str):
  unknown = sorted(set(d) - set(valid))
  if unknown:
    raise ValueError(f'Unknown key(s) {unknown} in {where}; valid keys: '
                     f'{sorted(valid)}.')


def _positive_int(value, where: str, *, optional: bool = False):
  if value is None and optional:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{where}={value!r} must be a positive integer'
                     f'{" or None" if optional else ""}.')


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
    if valid is not None and c.get(key) is not None:
      _check_keys(c[key], valid, f'config.{key}')
  for key in ('dataset', 'model', 'optimizer', 'loss'):
    if not c.get(key):
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
  if epochs is not None and not (isinstance(epochs, (int, float)) and epochs > 0):
    raise ValueError(f'config.train_epochs={epochs!r} must be > 0.')
  if not isinstance(c.get('seed', 0), int):
    raise ValueError(f'config.seed={c["seed"]!r} must be an integer.')
  rng_keys = c.get('extra_rng_keys', ())
  if (not isinstance(rng_keys, (list, tuple))
      or not all(isinstance(k, str) for k in rng_keys)):
    raise ValueError(f'config.extra_rng_keys={rng_keys!r} must be a tuple of '
                     f'names, e.g. ("dropout", "gating").')
  loss_name = c['loss'].get('name')
  if loss_name not in losses.LOSSES:
    raise ValueError(f'config.loss.name={loss_name!r} is unknown; valid: '
                     f'{sorted(losses.LOSSES)}.')
  optimizers.check_config(c['optimizer'])
  if c.get('mixup'):
    registry.check_kwargs(mixup.check_config, c['mixup'], what='config.mixup')
    mixup.check_config(**c['mixup'])
  _positive_int(c.get('save_checkpoint', {}).get('every_steps'),
                'config.save_checkpoint.every_steps', optional=True)
  _positive_int(c.get('save_checkpoint', {}).get('keep_last'),
                'config.save_checkpoint.keep_last', optional=True)
  _positive_int(c.get('evaluate', {}).get('every_steps'),
                'config.evaluate.every_steps', optional=True)
  _positive_int(c.get('report_progress', {}).get('every_steps'),
                'config.report_progress.every_steps', optional=True)
  models.validate(c['model'])
  models.validate(eval_model_config(c))
  if c.get('fewshot'):
    fewshot.check_config(c['fewshot'])
    for split in ('train', 'test'):
      _check_data_config(c['fewshot'][split], f'config.fewshot.{split}',
                         num_devices=num_devices, num_processes=num_processes)
    _positive_int(c['fewshot'].get('every_steps'), 'config.fewshot.every_steps',
                  optional=True)


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
  pp_ops.get_pp_fn(cfg['process'], 'example')
  if cfg.get('process_batch'):
    pp_ops.get_pp_fn(cfg['process_batch'], 'batch')
  batch_size = cfg['batch_size']
  _positive_int(batch_size, f'{where}.batch_size')
  if batch_size % num_devices or batch_size % num_processes:
    raise ValueError(
        f'{where}.batch_size={batch_size} (the global batch) must be '
        f'divisible by the {num_devices} devices and the {num_processes} '
        f'processes; use a multiple of {num_devices}.')
