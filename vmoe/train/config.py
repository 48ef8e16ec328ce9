"""A training config, validated once into a frozen Run that everything downstream reads.

Three stages, each a ValueError naming the key, its value and the fix, all before
anything compiles (the trainer runs them in this order):

  run = resolve(config, num_devices=N, num_processes=P)  # the config alone: milliseconds
  run = with_data(run)       # datasets' metadata (never their records): splits exist
  run = with_inputs(run, {'dataset.train': (B, H, W, C), ...})  # first batches' shapes

`resolve` checks every key and value and fills in every default; `with_data` adds the
number of examples of each dataset (and the steps of a train_epochs run); `with_inputs`
resolves each dataset's model for its image size (tokens per image, capacity of every MoE
layer) and checks what depends on it: patches tile the images, MoE groups tile each
device's tokens, labels match the classes. The config itself is never edited.
"""
import dataclasses
import math
import sys
from typing import Any, Mapping, Optional

from absl import logging
import ml_collections
import tensorflow_datasets as tfds
from vmoe.checkpoints import initialization
from vmoe.data import pipeline
from vmoe.nn import models
from vmoe.nn import spec as spec_lib
from vmoe.parallel import mesh as mesh_lib
from vmoe.train import fewshot
from vmoe.train import losses
from vmoe.train import mixup
from vmoe.train import optimizers
from vmoe.train import schedules
from vmoe.utils import checks
from vmoe.utils import dotted
from vmoe.utils import paths

# Top-level key -> the keys of its sub-config (None: not a sub-config of ours).
TOP_KEYS = {
    'dataset': None,  # {split name: pipeline.KNOWN_KEYS}; 'train' is the train split.
    'model': None,  # vmoe.nn.models.MODEL_KEYS.
    'optimizer': None,  # vmoe.train.optimizers.
    'loss': frozenset(losses.KEYS),
    'train_steps': None,
    'train_epochs': None,
    'seed': None,
    'description': None,
    'extra_rng_keys': None,
    'mixup': frozenset({'concentration', 'size', 'granularity'}),
    'save_checkpoint': frozenset({'every_steps', 'keep_last', 'keep_every'}),
    'evaluate': frozenset({'every_steps', 'model_overrides'}),
    'report_progress': frozenset({'every_steps', 'every_secs'}),
    'fewshot': None,  # vmoe.train.fewshot.CONFIG_KEYS.
    # Start from another checkpoint (vmoe.checkpoints.initialization).
    'initialization': frozenset(initialization.CONFIG_KEYS),
    'nonfinite': None,  # One of NONFINITE_MODES.
    'mesh': None,  # {axis: size}, see vmoe.parallel.mesh.
    'fsdp': None,  # Also split the non-expert params over 'data' (bool).
}
# Keys of final_metrics.json next to the eval split names.
RESERVED_SPLIT_NAMES = frozenset({'step', 'num_params', 'train_seconds_per_step',
                                  'fewshot'})
# What a step whose loss or gradient norm is NaN/Inf does (its update is never
# applied): 'stop' the run (default) or 'skip' it and go on.
NONFINITE_MODES = ('stop', 'skip')


@dataclasses.dataclass(frozen=True)
class Data:
  """One dataset of the run: config.dataset.NAME, or config.fewshot.train / .test.

  name: 'dataset.train', 'dataset.test', 'fewshot.train', ...; config: its entry;
  images_per_device: the global batch_size over the devices. Then (with_data)
  num_examples; (with_inputs) image_shape [H, W, C], the model that reads it resolved for
  that size (the train model for 'dataset.train', else the eval model) and the MoE
  groups of each device's batch.
  """
  name: str
  config: ml_collections.FrozenConfigDict
  images_per_device: int
  num_examples: Optional[int] = None
  image_shape: Optional[tuple[int, ...]] = None
  model: Optional[spec_lib.ModelSpec] = None
  groups_per_device: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Run:
  """A training run, every default filled in.

  model / eval_model: config.model and it with config.evaluate.model_overrides, from the
  config alone (no image size; each Data has its own, resolved for its images).
  optimizer: config.optimizer with config.initialization.freeze in its frozen_pattern.
  loss: config.loss resolved for the model (E3: its ensemble members; a segmenter's
  losses.PixelLoss).
  train_steps: None for a train_epochs run until with_data. mesh: {axis: size}.
  """
  config: ml_collections.FrozenConfigDict
  num_devices: int
  num_processes: int
  model: spec_lib.ModelSpec
  eval_model: spec_lib.ModelSpec
  data: tuple[Data, ...]
  mesh: dict[str, int]
  optimizer: dict[str, Any]
  train_steps: Optional[int]
  seed: int = 0
  rng_names: tuple[str, ...] = ()
  mixup: Optional[dict[str, Any]] = None
  nonfinite: str = 'stop'
  loss: losses.AnyLoss = losses.Loss('softmax_xent')

  def entry(self, name: str) -> Data:
    return next(d for d in self.data if d.name == name)

  @property
  def evals(self) -> tuple[Data, ...]:
    """The eval splits: config.dataset except 'train'."""
    return tuple(d for d in self.data if d.name.startswith('dataset.')
                 and d.name != 'dataset.train')

  def get(self, key: str, default=None):
    """A (dotted) key of the config, e.g. run.get('save_checkpoint.every_steps'); the
    default if it (or a sub-config on the way) is absent; a value set to None is None."""
    node = self.config
    for part in key.split('.'):
      if node is None or part not in node:
        return default
      node = node[part]
    return node


def log_inert_options(run: Run):
  """Logs, once per entry point, the reference's options the config sets that have no
  effect here (vmoe.nn.routers.INERT)."""
  moe = run.model.encoder.moe
  for note in moe.inert if moe else ():
    logging.warning('Accepted with no effect: %s.', note)


def resolve(config: Any, *, num_devices: int = 1, num_processes: int = 1) -> Run:
  """The Run of a training config (dict or ConfigDict), from the config alone."""
  c = checks.to_dict(config)
  checks.check_keys(c, TOP_KEYS, 'config')
  for key, valid in TOP_KEYS.items():
    if valid is not None:
      checks.check_keys(checks.sub_config(c, key, 'config'), valid, f'config.{key}')
  for key in ('dataset', 'model', 'optimizer', 'loss'):
    if not checks.sub_config(c, key, 'config'):
      raise ValueError(f'config.{key} is required.')
  _check_schedule_keys(c)
  model = models.resolve(c['model'])
  if model.segmenter:
    _check_segmenter_options(c, model)
  eval_model = _eval_model(c)
  mesh = _mesh(c, num_devices, (model, eval_model))
  return Run(
      config=ml_collections.FrozenConfigDict(c), num_devices=num_devices,
      num_processes=num_processes, model=model, eval_model=eval_model,
      data=_data(c, num_devices, num_processes), mesh=mesh,
      optimizer=_optimizer(c), train_steps=c.get('train_steps'), seed=c.get('seed', 0),
      rng_names=_rng_names(c, model), mixup=_mixup(c),
      loss=losses.resolve(c['loss'], model),
      nonfinite=checks.one_of(c.get('nonfinite', 'stop'), NONFINITE_MODES,
                              'config.nonfinite', ' (what a step with a NaN/Inf loss or '
                              'gradient norm does: stop the run, or skip that step)'))


def _check_schedule_keys(c: Mapping[str, Any]):
  """Steps, seed, loss, checkpoint / eval / report periods, initialization."""
  if (c.get('train_steps') is None) == (c.get('train_epochs') is None):
    raise ValueError(
        f'Give exactly one of config.train_steps and config.train_epochs, got '
        f'train_steps={c.get("train_steps")!r}, train_epochs={c.get("train_epochs")!r}.')
  checks.positive_int(c.get('train_steps'), 'config.train_steps', optional=True)
  epochs = c.get('train_epochs')
  if epochs is not None and not (checks.is_number(epochs) and epochs > 0):
    raise ValueError(f'config.train_epochs={epochs!r} must be a number > 0.')
  seed = c.get('seed', 0)
  if not checks.is_int(seed):
    raise ValueError(f'config.seed={seed!r} must be an integer.')
  for key, sub in (('save_checkpoint', 'every_steps'), ('save_checkpoint', 'keep_last'),
                   ('save_checkpoint', 'keep_every'),
                   ('evaluate', 'every_steps'), ('report_progress', 'every_steps')):
    checks.positive_int(checks.sub_config(c, key, 'config').get(sub), f'config.{key}.{sub}',
                        optional=True)
  secs = checks.sub_config(c, 'report_progress', 'config').get('every_secs')
  if secs is not None and not (checks.is_number(secs) and secs > 0):
    raise ValueError(f'config.report_progress.every_secs={secs!r} must be a number > 0 or '
                     'None.')
  if c.get('initialization'):
    initialization.check_config(c['initialization'])


def _check_segmenter_options(c: Mapping[str, Any], model: spec_lib.ModelSpec):
  """Refuses the options that work on whole images and their classes."""
  decoder = f'model.decoder.name={model.decoder.name!r}'
  if c.get('mixup'):
    raise ValueError(f'config.mixup={dict(c["mixup"])} mixes whole images and their '
                     f'one-hot labels, but the model is a segmenter ({decoder}) with '
                     'labels per pixel; drop config.mixup (set it to None).')
  if c.get('fewshot'):
    raise ValueError('config.fewshot: few-shot linear probes classify whole images from '
                     f"a classifier's pre-logits, but the model is a segmenter ({decoder}); "
                     'drop config.fewshot (set it to None).')


def _eval_model(c: Mapping[str, Any]) -> spec_lib.ModelSpec:
  """config.model with config.evaluate.model_overrides."""
  overrides = checks.sub_config(c, 'evaluate', 'config').get('model_overrides')
  if overrides is not None and not isinstance(overrides, Mapping):
    raise ValueError(f'config.evaluate.model_overrides={overrides!r} must be a sub-config '
                     'of model keys, e.g. {"encoder": {"moe": ...}}.')
  try:
    return models.resolve(c['model'], overrides=dotted.flatten(overrides or {}))
  except ValueError as e:
    raise ValueError(f'config.evaluate.model_overrides give an invalid eval model: {e}'
                     ) from None


def _mesh(c: Mapping[str, Any], num_devices: int, specs) -> dict[str, int]:
  """config.mesh fits the devices, its expert axis the experts of every MoE layer."""
  spec = c.get('mesh')
  if spec is not None and not isinstance(spec, Mapping):
    raise ValueError(f'config.mesh={spec!r} must be a dict of axis sizes, e.g. '
                     "{'data': -1, 'expert': 4}.")
  shape = mesh_lib.check_mesh(spec, num_devices)
  if not isinstance(c.get('fsdp', False), bool):
    raise ValueError(f'config.fsdp={c["fsdp"]!r} must be True or False.')
  experts = shape.get('expert', 1)
  for where, model in zip(('config.model', 'config.evaluate.model_overrides'), specs):
    moe = model.encoder.moe
    if moe is None:
      continue
    if moe.num_experts % experts:
      raise ValueError(
          f'{where}: encoder.moe.num_experts={moe.num_experts} is not divisible by the '
          f'mesh\'s expert axis (config.mesh={dict(spec or {})} -> {shape} on '
          f'{num_devices} devices); use a multiple of {experts} experts or a smaller '
          'config.mesh.expert.')
    if moe.dispatch == 'ragged' and experts > 1:
      raise ValueError(
          f"{where}: encoder.moe.router.dispatcher.name='ragged' has no expert "
          "parallelism (its rows are sorted across all groups); use 'indices' on a mesh "
          "with an 'expert' axis, or config.mesh.expert=1.")
  return shape


def _data(c: Mapping[str, Any], num_devices: int, num_processes: int) -> tuple[Data, ...]:
  """The datasets: config.dataset ('train' first), then config.fewshot.train / .test."""
  dataset = c['dataset']
  if 'train' not in dataset:
    raise ValueError(f'config.dataset needs a "train" split (the training data); it has '
                     f'{sorted(dataset)}.')
  entries = {f'dataset.{k}': v for k, v in sorted(dataset.items(),
                                                   key=lambda kv: kv[0] != 'train')}
  for name in entries:
    if name.split('.', 1)[1] in RESERVED_SPLIT_NAMES:
      raise ValueError(f'config.{name}: the split name {name.split(".", 1)[1]!r} is '
                       'reserved (a key of final_metrics.json); rename it.')
  if c.get('fewshot'):
    if num_processes > 1:
      raise ValueError(f'config.fewshot: few-shot probes gather every example\'s features '
                       f'on one host, so they run in single-process runs only; drop '
                       f'config.fewshot for this {num_processes}-process run (e.g. '
                       'configs/digits.py:fewshot=False).')
    fewshot.check_config(c['fewshot'])
    entries.update({f'fewshot.{k}': c['fewshot'][k] for k in ('train', 'test')})
  out = []
  for name, cfg in entries.items():
    where = f'config.{name}'
    pipeline.check_config(cfg, where, train=name == 'dataset.train')
    b = cfg['batch_size']
    if b % num_devices or b % num_processes:
      raise ValueError(
          f'{where}.batch_size={b} (the global batch) must be divisible by the '
          f'{num_devices} devices and the {num_processes} processes; use a multiple of '
          f'{num_devices}.')
    out.append(Data(name, ml_collections.FrozenConfigDict(cfg), b // num_devices))
  return tuple(out)


def _optimizer(c: Mapping[str, Any]) -> dict[str, Any]:
  """config.optimizer, checked, with config.initialization.freeze in its frozen_pattern."""
  opt = dict(c['optimizer'])
  checks.sub_config(opt, 'gradient_clip', 'config.optimizer')
  optimizers.check_config(opt)
  norm = (opt.get('gradient_clip') or {}).get('global_norm')
  if norm is not None and not (checks.is_number(norm) and norm > 0):
    raise ValueError(f'config.optimizer.gradient_clip.global_norm={norm!r} must be a '
                     'number > 0, or None for no clipping.')
  check_learning_rate(opt['learning_rate'], c.get('train_steps'))
  freeze = (c.get('initialization') or {}).get('freeze')
  if freeze:
    opt['frozen_pattern'] = (paths.patterns(opt.get('frozen_pattern'))
                             + paths.patterns(freeze))
  return opt


def check_learning_rate(lr: Any, train_steps: Optional[int]):
  """config.optimizer.learning_rate: a rate or a schedule, for `train_steps` (None: not
  known yet, with train_epochs; with_data checks it again)."""
  where = 'config.optimizer.learning_rate'
  if checks.is_number(lr) or not isinstance(lr, Mapping):
    if not (checks.is_number(lr) and math.isfinite(lr) and lr >= 0):
      raise ValueError(f'{where}={lr!r} must be a finite number >= 0 or a schedule '
                       f'{{"schedule": NAME, ...}} with NAME in {sorted(schedules.SCHEDULES)}.')
    return
  for key, value in lr.items():
    if key != 'schedule' and value is not None and not (
        checks.is_number(value) and math.isfinite(value) and value >= 0):
      raise ValueError(f'{where}.{key}={value!r} must be a finite number >= 0.')
  try:
    schedules.create_schedule(lr, total_steps=train_steps or sys.maxsize)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None


def _rng_names(c: Mapping[str, Any], model: spec_lib.ModelSpec) -> tuple[str, ...]:
  """config.extra_rng_keys, which must hold the random streams the model draws from in
  training (flax would only fail while tracing the train step)."""
  names = c.get('extra_rng_keys', ())
  if not isinstance(names, (list, tuple)) or not all(isinstance(k, str) for k in names):
    raise ValueError(f'config.extra_rng_keys={names!r} must be a tuple of names, e.g. '
                     '("dropout", "gating").')
  enc, needed = model.encoder, []
  if enc.dropout_rate or enc.attention_dropout_rate:
    needed.append('dropout')
  if enc.moe is not None and dict(enc.moe.options).get('noise_std'):
    needed.append('gating')
  missing = [k for k in needed if k not in names]
  if missing:
    raise ValueError(f'config.extra_rng_keys={tuple(names)!r} lacks {missing}, which the '
                     'model draws from in training (dropout rates > 0, router noise_std > '
                     '0); add them.')
  return tuple(names)


def _mixup(c: Mapping[str, Any]) -> Optional[dict[str, Any]]:
  if not c.get('mixup'):
    return None
  checks.check_kwargs(mixup.check_config, c['mixup'], what='config.mixup')
  mixup.check_config(**c['mixup'])
  return dict(c['mixup'])


def with_data(run: Run) -> Run:
  """Checks every dataset against its TFDS metadata (reads no record): it is prepared,
  its split exists and gives every process examples. Adds their sizes, and the steps of a
  train_epochs run (checking the learning-rate schedule against them)."""
  data = []
  for d in run.data:
    where = f'config.{d.name}'
    try:
      builder = pipeline.builder(d.config)
    except ValueError as e:
      raise ValueError(f'{where}.name={d.config.name!r}: {e}') from None
    try:
      n = pipeline.split_info(builder, d.config.split).num_examples
      if d.name == 'dataset.train':  # Each process trains on its own shard.
        for shard in tfds.even_splits(d.config.split, run.num_processes):
          pipeline.split_info(builder, shard)
    except ValueError as e:
      raise ValueError(f'{where}.split={d.config.split!r}: {e}') from None
    data.append(dataclasses.replace(d, num_examples=n))
  steps = run.train_steps
  if steps is None:
    train = data[0]
    steps = math.ceil(run.config.train_epochs * train.num_examples
                      / train.config.batch_size)
    check_learning_rate(run.optimizer['learning_rate'], steps)
  return dataclasses.replace(run, data=tuple(data), train_steps=steps)


def with_inputs(run: Run, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> Run:
  """Checks what depends on the shapes of the data and resolves each dataset's model for
  its images, before anything compiles.

  shapes: of one (process-local) batch of 'dataset.train' and of the other datasets to
    use, e.g. {'dataset.train': {'image': (B, H, W, C), 'labels': (B, K)}, ...}; a dataset
    without shapes is left unresolved (e.g. the eval sets a planner does not run).
  """
  train_image = tuple(shapes['dataset.train'].get('image', ()))
  data = []
  for d in run.data:
    if d.name not in shapes:
      data.append(d)
      continue
    where, image = f'config.{d.name}', tuple(shapes[d.name].get('image', ()))
    if len(image) != 4:
      raise ValueError(f'{where}.process must give "image" batches [B, H, W, C], got '
                       f'{dict(shapes[d.name])}.')
    if image[3] != train_image[3]:
      raise ValueError(f'{where}.process gives {image[3]}-channel images, '
                       f'config.dataset.train {train_image[3]}-channel ones (the patch '
                       'kernel is shaped by them); make them agree.')
    spec = run.model if d.name == 'dataset.train' else run.eval_model
    try:
      model, train_model = (models.resolve(_config_of(run, d), image_size=s[1:3])
                            for s in (image, train_image))
    except ValueError as e:
      raise ValueError(f'{where} ({image[1]}x{image[2]} images): {e}') from None
    if (spec.encoder.position_emb == 'learned'
        and model.tokens_per_image != train_model.tokens_per_image):
      raise ValueError(f'{where}.process gives {image[1]}x{image[2]} images, '
                       f'{model.tokens_per_image} tokens, but the learned position '
                       f'embedding is shaped by the {train_model.tokens_per_image} tokens '
                       f'of config.dataset.train; resize to {train_image[1:3]}.')
    _check_labels(d, shapes[d.name], spec)
    try:
      groups = model.groups(d.images_per_device)
    except ValueError as e:
      raise ValueError(f'{where} (batch_size={d.config.batch_size} over {run.num_devices} '
                       f'devices: {d.images_per_device} images per device): {e}') from None
    data.append(dataclasses.replace(d, image_shape=image[1:], model=model,
                                    groups_per_device=groups))
  return dataclasses.replace(run, data=tuple(data))


def _config_of(run: Run, d: Data) -> dict:
  """The model config that reads dataset d: config.model, for evaluation with
  config.evaluate.model_overrides."""
  model = run.config.model.to_dict()
  if d.name == 'dataset.train':
    return model
  overrides = run.get('evaluate.model_overrides')
  return dotted.with_values(model, dotted.flatten(overrides.to_dict() if overrides else {}))


def _check_labels(d: Data, shapes: Mapping[str, tuple[int, ...]],
                  spec: spec_lib.ModelSpec):
  """A classifier's 'labels' are [B, num_classes] (one-hot), a segmenter's [B, H, W] (a
  class id per pixel of the [B, H, W, C] images)."""
  num_classes = spec.num_classes
  if not d.name.startswith('dataset.') or not num_classes:
    return
  labels = tuple(shapes.get('labels', ()))
  if spec.segmenter:
    image = tuple(shapes['image'])
    if labels != image[:3]:
      raise ValueError(f'config.{d.name}.process gives "labels" of shape {labels} for '
                       f'images of shape {image}, but a segmenter (config.model.decoder) '
                       f'needs a class id per pixel, labels of shape {image[:3]} [B, H, W]: '
                       'end the pp string with seg_labels (e.g. '
                       '"decode|value_range(-1, 1)|seg_labels").')
    return
  if len(labels) != 2 or labels[-1] != num_classes:
    raise ValueError(f'config.{d.name}.process gives "labels" of shape {labels} but '
                     f'config.model.num_classes={num_classes}: one-hot them to {num_classes} '
                     f'classes (onehot({num_classes}, key="label", key_result="labels")) or '
                     'fix model.num_classes.')
