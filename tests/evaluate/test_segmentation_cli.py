"""End to end: a tiny digit_scenes V-MoE segmenter trained by `vmoe.main` on 1 device,
then `vmoe.evaluate` (capacity x batch-priority sweep, routing analysis by pixel class,
predictions) on 8 fake devices, and `vmoe.load_segmenter` on the raw test records.

Exactly once: the trainer evaluates the 500 test canvases in batches of 100 (they divide
the split), the evaluator in batches of 96 over 8 devices (they do not: the last batch is
padded). Both must count every pixel once, so the sweep's variant equal to the training
config reproduces the trainer's confusion-matrix metrics, and so does load_segmenter fed
the canvases as they are stored (the evaluation preprocessing is only value_range).
"""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import vmoe
from vmoe.configs import common
from vmoe.data import digit_scenes
from vmoe.train import segmentation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_ARG = 'configs/digits_seg.py:num_experts=4,steps=12'
OVERRIDES = {
    'optimizer.learning_rate.warmup_steps': 2,
    'dataset.train.batch_size': 32,
    'model.hidden_size': 16,
    'model.encoder.num_layers': 2,
    'model.encoder.mlp_dim': 32,
    'model.encoder.num_heads': 2,
    'model.encoder.moe.layers': (1,),
    'model.decoder.layers': (0,),
    'model.decoder.dim': 8,
    'save_checkpoint.every_steps': 6,
    'evaluate.every_steps': 100,  # Only the final evaluation.
}
FLAGS = [f'--config={CONFIG_ARG}'] + [
    f'--config.{k}={v}'.replace(' ', '') for k, v in OVERRIDES.items()]


@pytest.fixture(scope='module')
def env(digit_scenes_data_dir):
  return dict(os.environ, TFDS_DATA_DIR=digit_scenes_data_dir)


@pytest.fixture(scope='module')
def workdir(env, tmp_path_factory, run_module):
  path = str(tmp_path_factory.mktemp('segmenter'))
  out = run_module('vmoe.main', f'--workdir={path}', *FLAGS, env=env)
  assert 'Final test: miou=' in out
  return path


def final_test(workdir):
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    return json.load(f)['test']


def test_trainer_reports_confusion_metrics(workdir):
  final = final_test(workdir)
  assert final['num_examples'] == digit_scenes.SPLITS['test']
  assert final['num_pixels'] == digit_scenes.SPLITS['test'] * 32 * 32  # No ignored pixel.
  assert 0 <= final['miou'] <= 1 and 0 <= final['pixel_accuracy'] <= 1
  assert any(k.startswith('iou/') for k in final)
  assert 0 <= final['dropped/encoderblock_1'] < 1


def test_sweep_analysis_predictions_on_8_devices(workdir, env, run_module):
  run_module('vmoe.evaluate', f'--workdir={workdir}', *FLAGS, '--config.dataset.test.batch_size=96',
      '--analyze', '--predictions=4',
      '--sweep=capacity_factor=0.25,1.05;batch_priority=false,true', env=env, devices=8)
  eval_dir = os.path.join(workdir, 'eval')
  with open(os.path.join(eval_dir, 'sweep.json')) as f:
    rows = json.load(f)
  final = final_test(workdir)
  trained = next(r for r in rows if r['capacity_factor'] == 1.05 and not r['batch_priority'])
  for key in ('miou', 'pixel_accuracy', 'mean_accuracy', 'loss', 'dropped/encoderblock_1'):
    np.testing.assert_allclose(trained[key], final[key], atol=1e-4, err_msg=key)
  low = next(r for r in rows if r['capacity_factor'] == 0.25 and not r['batch_priority'])
  assert low['dropped/encoderblock_1'] > trained['dropped/encoderblock_1']
  assert low['gflops_per_image'] < trained['gflops_per_image']
  for name in ('sweep.png', 'routing.png', 'routing_summary.png', 'predictions.png'):
    assert os.path.getsize(os.path.join(eval_dir, name)) > 1000, name
  with open(os.path.join(eval_dir, 'routing.json')) as f:
    routing = json.load(f)
  layer = routing['layers']['encoderblock_1']
  counts = np.asarray(layer['class_expert_counts'])
  assert counts.shape == (digit_scenes.NUM_CLASSES, 4)
  assert counts[0].sum() > 0  # Background tokens are counted by their pixel class.
  with open(os.path.join(eval_dir, 'predictions.json')) as f:
    assert len(json.load(f)) == 4


def test_load_segmenter_reproduces_the_trainer(workdir, env):
  config = common.load_config(os.path.join(REPO, CONFIG_ARG))
  for key, value in OVERRIDES.items():
    node = config
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  segment = vmoe.load_segmenter(workdir, config.model)
  ds = tfds.builder('digit_scenes', data_dir=env['TFDS_DATA_DIR']).as_dataset(split='test')
  confusion = np.zeros((digit_scenes.NUM_CLASSES,) * 2, np.int64)
  for batch in ds.batch(100).as_numpy_iterator():
    images = batch['image'].astype(np.float32) / 127.5 - 1.0
    logits = segment(images)
    assert logits.dtype == np.float32 and logits.shape == (*images.shape[:3], 11)
    labels = batch['segmentation_mask'][..., 0].astype(np.int32)
    confusion += np.asarray(segmentation.confusion(
        np.argmax(logits, -1), labels, np.ones(len(labels), bool),
        digit_scenes.NUM_CLASSES, 255))
  metrics = segmentation.metrics(confusion)
  final = final_test(workdir)
  for key in ('miou', 'pixel_accuracy'):
    np.testing.assert_allclose(metrics[key], final[key], atol=1e-4, err_msg=key)


def test_exactly_once_on_8_devices_whether_or_not_the_batch_divides_the_split(
    workdir, env, tmp_path, run_module):
  """The first 320 test canvases on 8 devices in batches of 64 (5 full batches) and of 96
  (the fourth padded with 64 empty examples): the same confusion-matrix metrics."""
  rows = {}
  for batch in (64, 96):
    out = str(tmp_path / f'batch{batch}')
    run_module('vmoe.evaluate', f'--workdir={workdir}', *FLAGS, '--sweep=capacity_factor=1.05',
        '--config.dataset.test.split=test[:320]', f'--config.dataset.test.batch_size={batch}',
        f'--output_dir={out}', '--predictions=0', env=env, devices=8)
    with open(os.path.join(out, 'sweep.json')) as f:
      rows[batch] = json.load(f)[0]
  for key in ('miou', 'pixel_accuracy', 'mean_accuracy', 'loss'):
    np.testing.assert_allclose(rows[64][key], rows[96][key], rtol=1e-6, err_msg=key)
