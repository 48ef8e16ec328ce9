"""Malformed configs are rejected before anything is traced or compiled, each
with one ValueError that names the key.

Each case changes one thing of configs/digits.py (as a plain dict, so that any
type can be put in, as a config file can) and runs the trainer's three stages of
vmoe.train.config: resolve (the config alone), with_data (TFDS metadata) and
with_inputs (the shapes of the first batches: digits gives 8x8x3 images and
10-class one-hot labels). SEGMENTER is digits' model with a decoder, checked against
per-pixel labels [B, 8, 8].
"""
import contextlib
import copy
import os
import re

import jax
import pytest
from vmoe.configs import common
from vmoe.train import config as config_lib
from vmoe.train import losses
from vmoe.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DELETE = object()
DIGITS = common.load_config(os.path.join(REPO, 'configs', 'digits.py')).to_dict()
K_ABOVE_E = {'encoder': {'moe': {'router': {'num_selected_experts': 9}}}}

# (id, dotted key, new value or DELETE, regex the message must match, devices).
CASES = [
    # Top level.
    ('unknown_top_key', 'train_stpes', 10, r"\['train_stpes'\] in config; valid"),
    ('train_steps_zero', 'train_steps', 0, r'config\.train_steps=0 must be'),
    ('train_steps_string', 'train_steps', '100', r"config\.train_steps='100'"),
    ('steps_and_epochs', 'train_epochs', 3, r'one of config\.train_steps and config\.train_epochs'),
    ('seed_float', 'seed', 1.5, r'config\.seed=1\.5 must be an integer'),
    ('nonfinite_mode', 'nonfinite', 'ignore', r"config\.nonfinite='ignore' is unknown"),
    ('rng_keys_string', 'extra_rng_keys', 'gating', r"config\.extra_rng_keys='gating'"),
    ('rng_keys_lack_gating', 'extra_rng_keys', ('dropout',),
     r"config\.extra_rng_keys=\('dropout',\) lacks \['gating'\]"),
    # Model and router.
    ('model_name', 'model.name', 'ResNet', r"model\.name='ResNet' is unknown"),
    ('model_key_typo', 'model.hidden_sise', 64, r"\['hidden_sise'\] in model"),
    ('hidden_size_negative', 'model.hidden_size', -64, r'model\.hidden_size=-64'),
    ('heads_do_not_divide_width', 'model.encoder.num_heads', 3,
     r'model\.encoder\.num_heads=3'),
    ('classifier', 'model.classifier', 'cls', r"model\.classifier='cls'"),
    ('patch_size_string', 'model.patch_size', '8', r"model\.patch_size='8' must be two"),
    ('patch_size_zero', 'model.patch_size', (0, 8), r'model\.patch_size=\(0, 8\)'),
    ('dropout_above_one', 'model.encoder.dropout_rate', 1.5,
     r'model\.encoder\.dropout_rate=1\.5 must be a number in \[0, 1\)'),
    ('moe_layer_out_of_range', 'model.encoder.moe.layers', (1, 4),
     r'model\.encoder\.moe\.layers=\(1, 4\) has indices \[4\]'),
    ('num_experts_zero', 'model.encoder.moe.num_experts', 0,
     r'model\.encoder\.moe\.num_experts=0'),
    ('k_above_e', 'model.encoder.moe.router.num_selected_experts', 9,
     r'router\.num_selected_experts=9 must be in \[1, num_experts=8\]'),
    ('group_size_zero', 'model.encoder.moe.group_size', 0, r'moe\.group_size=0'),
    ('capacity_factor_zero', 'model.encoder.moe.router.dispatcher.capacity_factor', 0.0,
     r'dispatcher\.capacity_factor=0\.0 must be > 0'),
    ('capacity_and_factor', 'model.encoder.moe.router.dispatcher.capacity', 8,
     r'dispatcher needs exactly one of capacity and capacity_factor'),
    ('router_name', 'model.encoder.moe.router.name', 'TopKRouter',
     r"router\.name='TopKRouter' is unknown"),
    ('router_key_typo', 'model.encoder.moe.router.noise_sdt', 1.0,
     r"\['noise_sdt'\] in model\.encoder\.moe\.router"),
    ('dispatcher_name', 'model.encoder.moe.router.dispatcher.name', 'scatter',
     r"dispatcher\.name='scatter' is unknown"),
    # Datasets.
    ('no_train_split', 'dataset.train', DELETE, r'config\.dataset needs a "train" split'),
    ('dataset_key_typo', 'dataset.train.shufle_buffer', 10,
     r"\['shufle_buffer'\] in config\.dataset\.train"),
    ('batch_size_zero', 'dataset.train.batch_size', 0, r'config\.dataset\.train\.batch_size=0'),
    ('batch_size_vs_devices', 'dataset.test.batch_size', 100,
     r'config\.dataset\.test\.batch_size=100 .* divisible by the 8 devices', 8),
    ('pp_op_typo', 'dataset.train.process', 'decode|resize_typo(3)',
     r"config\.dataset\.train\.process: Unknown pp op 'resize_typo'"),
    ('cache_value', 'dataset.test.cache', 'yes', r"config\.dataset\.test\.cache='yes'"),
    ('shuffle_buffer_negative', 'dataset.train.shuffle_buffer', -1,
     r'config\.dataset\.train\.shuffle_buffer=-1'),
    ('reserved_split_name', 'dataset.step', DIGITS['dataset']['test'],
     r"config\.dataset\.step: the split name 'step' is reserved"),
    ('missing_split', 'dataset.test.split', 'validation',
     r"config\.dataset\.test\.split='validation': Bad split"),
    ('unknown_dataset', 'dataset.train.name', 'digitz',
     r"config\.dataset\.train\.name='digitz': Unknown dataset"),
    # Optimizer and learning-rate schedule.
    ('optimizer_name', 'optimizer.name', 'adamm', r"optimizer\.name='adamm' is unknown"),
    ('optimizer_key_typo', 'optimizer.b3', 0.9, r"\['b3'\] in optimizer 'adamw'"),
    ('schedule_name', 'optimizer.learning_rate.schedule', 'cosine',
     r"learning_rate\.schedule='cosine' is unknown"),
    ('warmup_longer_than_training', 'optimizer.learning_rate.warmup_steps', 5000,
     r'config\.optimizer\.learning_rate: .*warmup_steps'),
    ('learning_rate_negative', 'optimizer.learning_rate.peak_value', -1e-3,
     r'config\.optimizer\.learning_rate\.peak_value=-0\.001'),
    ('learning_rate_string', 'optimizer.learning_rate', 'fast',
     r"config\.optimizer\.learning_rate='fast'"),
    ('gradient_clip_negative', 'optimizer.gradient_clip.global_norm', -1.0,
     r'config\.optimizer\.gradient_clip\.global_norm=-1\.0'),
    ('adam_b2_above_one', 'optimizer.b2', 1.5, r'optimizer\.b2=1\.5 must be a number in'),
    ('weight_decay_negative', 'optimizer.weight_decay', -0.1,
     r'optimizer\.weight_decay=-0\.1 must be >= 0'),
    ('weight_decay_type', 'optimizer.weight_decay', 'big', r'optimizer\.weight_decay must be'),
    ('frozen_pattern_regex', 'optimizer.frozen_pattern', '[', r'optimizer\.frozen_pattern'),
    # Loss, mixup, checkpoints, evaluation, reports.
    ('loss_name', 'loss.name', 'mse', r"config\.loss\.name='mse' is unknown"),
    ('mixup_concentration', 'mixup.concentration', 0.0, r'mixup\.concentration must be > 0'),
    ('mixup_granularity', 'mixup.granularity', 'pixel', r"mixup\.granularity='pixel'"),
    ('mixup_key_typo', 'mixup.alpha', 0.2, r"\['alpha'\] in config\.mixup"),
    ('checkpoint_every_zero', 'save_checkpoint.every_steps', 0,
     r'config\.save_checkpoint\.every_steps=0'),
    ('keep_last_negative', 'save_checkpoint.keep_last', -1,
     r'config\.save_checkpoint\.keep_last=-1'),
    ('checkpoint_not_a_dict', 'save_checkpoint', 500, r'config\.save_checkpoint=500 must be'),
    ('evaluate_every_string', 'evaluate.every_steps', '10',
     r"config\.evaluate\.every_steps='10'"),
    ('eval_override_k_above_e', 'evaluate.model_overrides', K_ABOVE_E,
     r'config\.evaluate\.model_overrides .*num_selected_experts=9'),
    ('report_every_secs', 'report_progress.every_secs', -1.0,
     r'config\.report_progress\.every_secs=-1\.0'),
    # Few-shot.
    ('fewshot_shots', 'fewshot.shots', (0, 5), r'config\.fewshot\.shots=\(0, 5\)'),
    ('fewshot_without_train', 'fewshot.train', DELETE, r'config\.fewshot\.train is required'),
    ('fewshot_key_typo', 'fewshot.shot', (1,), r"\['shot'\] in config\.fewshot"),
    ('fewshot_missing_split', 'fewshot.train.split', 'validation',
     r"config\.fewshot\.train\.split='validation': Bad split"),
    # Shapes of the data (check_inputs).
    ('patch_does_not_tile_image', 'model.patch_size', (3, 3),
     r'model\.patch_size=\(3, 3\) does not tile images of 8x8'),
    ('group_vs_tokens_per_device', 'model.encoder.moe.group_size', 128 * 16,
     r'64 images per device.*moe\.group_size=2048 does not divide the 1024 tokens', 2),
    ('labels_vs_num_classes', 'model.num_classes', 5,
     r'config\.dataset\.train\.process gives "labels" .* config\.model\.num_classes=5'),
]


def mutate(config: dict, key: str, value) -> dict:
  config = copy.deepcopy(config)
  *path, last = key.split('.')
  node = config
  for part in path:
    node = node[part]
  if value is DELETE:
    del node[last]
  else:
    node[last] = value
  return config


def digits_shapes(run: config_lib.Run, num_processes: int = 1) -> dict:
  """The first batches' shapes of every dataset of a digits run."""
  return {d.name: {'image': (d.config.batch_size // num_processes, 8, 8, 3),
                   'labels': (d.config.batch_size // num_processes, 10)} for d in run.data}


def segmenter_config() -> dict:
  """configs/digits.py as a segmenter: a 'linear' decoder, the pixel loss, and neither
  mixup nor few-shot probes (they work on whole images)."""
  config = mutate(DIGITS, 'model.decoder', {'name': 'linear'})
  config = mutate(config, 'loss', {'name': 'pixel_softmax_xent'})
  return mutate(mutate(config, 'mixup', DELETE), 'fewshot', DELETE)


SEGMENTER = segmenter_config()
SEGMENTER_CASES = [
    ('seg_mixup', 'mixup', DIGITS['mixup'],
     r"config\.mixup=\{.*\} mixes whole images .* segmenter \(model\.decoder\.name="
     r"'linear'\) .* drop config\.mixup"),
    ('seg_fewshot', 'fewshot', DIGITS['fewshot'],
     r'config\.fewshot: few-shot linear probes .* drop config\.fewshot'),
    ('seg_classification_loss', 'loss.name', 'softmax_xent',
     r"config\.loss\.name='softmax_xent' is an image-classification loss, but the model "
     r"is a segmenter .* use 'pixel_softmax_xent'"),
    ('seg_ignore_label_in_range', 'loss.ignore_label', 3,
     r"config\.loss\.ignore_label=3 is a class id of the model's 10 classes"),
    ('seg_label_smoothing', 'loss.label_smoothing', -0.1,
     r'config\.loss\.label_smoothing=-0\.1 must be a number in \[0, 1\)'),
    ('seg_loss_key', 'loss.ensemble_size', 1,
     r"\['ensemble_size'\] in config\.loss \(name='pixel_softmax_xent'\)"),
]


def segmenter_shapes(run: config_lib.Run, labels=lambda b: (b, 8, 8)) -> dict:
  return {d.name: {'image': (d.config.batch_size, 8, 8, 3),
                   'labels': labels(d.config.batch_size)} for d in run.data}


@contextlib.contextmanager
def nothing_compiled():
  events = []
  listener = lambda name, *_, **__: events.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not [e for e in events if '/jax/core/compile/' in e], events


def check_all(config: dict, num_devices: int = 1) -> config_lib.Run:
  """What the trainer checks before compiling, in its order."""
  run = config_lib.with_data(config_lib.resolve(config, num_devices=num_devices))
  return config_lib.with_inputs(run, digits_shapes(run))


@pytest.fixture(autouse=True)
def tfds_data_dir(digits_data_dir, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', digits_data_dir)


@pytest.mark.parametrize('num_devices', [1, 2, 8])
def test_the_unchanged_config_passes(num_devices):
  before = copy.deepcopy(DIGITS)
  with nothing_compiled():
    run = check_all(DIGITS, num_devices)
  assert DIGITS == before  # Validation never edits the config.
  train = run.entry('dataset.train')
  assert train.images_per_device == 128 // num_devices
  assert train.groups_per_device == 128 // num_devices // 4  # 4 images of 16 tokens each.
  moe = train.model.encoder.moe
  assert (moe.tokens_per_image, moe.capacity) == (16, 20)  # ceil(64 x 2 x 1.05 / 8) -> 20.
  assert [d.name for d in run.data] == ['dataset.train', 'dataset.test', 'fewshot.train',
                                        'fewshot.test']
  assert run.train_steps == 2000 and run.rng_names == ('dropout', 'gating')


def test_there_are_enough_cases():
  assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_malformed_config_is_rejected_naming_the_key(case):
  _, key, value, message, *devices = case
  config = mutate(DIGITS, key, value)
  with nothing_compiled(), pytest.raises(ValueError, match=message):
    check_all(config, *devices)


@pytest.mark.parametrize('key, value, message', [
    ('dataset.test.split', 'validation', r"config\.dataset\.test\.split='validation'"),
    ('model.patch_size', (3, 3), r'model\.patch_size=\(3, 3\) does not tile'),
])
def test_the_trainer_rejects_before_compiling(key, value, message, tmp_path):
  """The trainer runs the checks itself, on the real first batches."""
  config = common.ConfigDict(mutate(DIGITS, key, value))
  with nothing_compiled(), pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_epochs_check_the_schedule_against_the_dataset_size():
  # 1,437 images, batch 128: one epoch is 12 steps, fewer than the 100 of warmup.
  config = mutate(mutate(DIGITS, 'train_steps', DELETE), 'train_epochs', 1)
  run = config_lib.resolve(config)  # The step count is not known yet.
  with pytest.raises(ValueError, match=r'config\.optimizer\.learning_rate: .*'
                     r'warmup_steps.*got 100 and decay_steps=12'):
    config_lib.with_data(run)


def test_the_segmenter_config_passes():
  with nothing_compiled():
    run = config_lib.with_data(config_lib.resolve(SEGMENTER))
    run = config_lib.with_inputs(run, segmenter_shapes(run))
  assert run.model.segmenter and run.loss == losses.PixelLoss('pixel_softmax_xent', 255, 0.0)


@pytest.mark.parametrize('case', SEGMENTER_CASES, ids=[c[0] for c in SEGMENTER_CASES])
def test_malformed_segmenter_config_is_rejected_naming_the_key(case):
  _, key, value, message = case
  config = mutate(SEGMENTER, key, value)
  with nothing_compiled(), pytest.raises(ValueError, match=message):
    run = config_lib.with_data(config_lib.resolve(config))
    config_lib.with_inputs(run, segmenter_shapes(run))


def test_a_segmenter_needs_labels_per_pixel():
  run = config_lib.with_data(config_lib.resolve(SEGMENTER))
  for labels, shown in ((lambda b: (b, 10)), '(128, 10)'), ((lambda b: (b, 4, 4)),
                                                              '(128, 4, 4)'):
    with pytest.raises(ValueError, match=(
        rf'config\.dataset\.train\.process gives "labels" of shape {re.escape(shown)} '
        r'for images of shape \(128, 8, 8, 3\), but a segmenter .* labels of shape '
        r'\(128, 8, 8\) \[B, H, W\]: end the pp string with seg_labels')):
      config_lib.with_inputs(run, segmenter_shapes(run, labels))


def test_a_classifier_refuses_the_pixel_loss_and_labels_per_pixel():
  with pytest.raises(ValueError, match=r"config\.loss\.name='pixel_softmax_xent' is a "
                     r'per-pixel loss for segmenters, .* set model\.decoder'):
    config_lib.resolve(mutate(DIGITS, 'loss', {'name': 'pixel_softmax_xent'}))
  run = config_lib.with_data(config_lib.resolve(DIGITS))
  with pytest.raises(ValueError, match=r'"labels" of shape \(128, 8, 10\) but '
                     r'config\.model\.num_classes=10: one-hot them'):
    config_lib.with_inputs(run, segmenter_shapes(run, lambda b: (b, 8, 10)))


def test_the_trainer_checks_a_segmenters_labels_before_compiling(tmp_path):
  """digits' pipeline gives one-hot labels: the real first batches are refused."""
  with nothing_compiled(), pytest.raises(ValueError, match='end the pp string with '
                                         'seg_labels'):
    trainer.train_and_evaluate(common.ConfigDict(SEGMENTER), str(tmp_path))
