"""End to end: a tiny digits V-MoE trained by `vmoe.main`, then `vmoe.evaluate` (sweep,
routing analysis, few-shot) on 8 fake devices and `vmoe.tools.superclasses`.

The sweep's variant equal to the training config must reproduce the trainer's own final
eval (accuracy and dropped tokens) although it runs on 8 devices instead of 1: groups
hold whole images, so routing does not depend on how the batch is split.
"""
import csv
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from vmoe.checkpoints import sources
from vmoe.configs import common
from vmoe.evaluate import command
from vmoe.tools import superclasses
from vmoe.train import config as config_lib
from vmoe.utils import dotted

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = {
    'train_steps': 8,
    'optimizer.learning_rate.warmup_steps': 2,
    'dataset.train.batch_size': 32,
    'model.hidden_size': 16,
    'model.encoder.num_layers': 2,
    'model.encoder.mlp_dim': 32,
    'model.encoder.num_heads': 2,
    'model.encoder.moe.layers': (1,),
    'save_checkpoint.every_steps': 4,
    'evaluate.every_steps': 100,  # Only the final evaluation.
    'fewshot.every_steps': 4,
    'fewshot.shots': (1, 2),
}
CONFIG_ARG = 'configs/digits.py:num_experts=4'
FLAGS = [f'--config={CONFIG_ARG}'] + [
    f'--config.{k}={v}'.replace(' ', '') for k, v in OVERRIDES.items()]


def tiny_config():
  config = common.load_config(os.path.join(REPO, CONFIG_ARG))
  return ml_collections.ConfigDict(dotted.with_values(config, OVERRIDES))


@pytest.fixture(scope='module')
def env(digits_data_dir):
  return dict(os.environ, TFDS_DATA_DIR=digits_data_dir)


@pytest.fixture(scope='module')
def workdir(env, tmp_path_factory, run_module):
  path = str(tmp_path_factory.mktemp('trained'))
  run_module('vmoe.main', f'--workdir={path}', *FLAGS, env=env)
  return path


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_training_reports_fewshot_and_dropped_tokens(workdir):
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert set(final['fewshot']) == {'fewshot/1shot', 'fewshot/2shot'}
  assert all(0 <= v <= 1 for v in final['fewshot'].values())
  assert 0 <= final['test']['dropped/encoderblock_1'] < 1


def test_sweep_analysis_fewshot_on_8_devices(workdir, env, run_module):
  out = run_module('vmoe.evaluate', f'--workdir={workdir}', *FLAGS, '--analyze', '--fewshot',
            '--sweep=capacity_factor=0.25,1.05,4;batch_priority=false,true', env=env,
            devices=8)
  assert 'Sweep of 6 variants' in out and out.startswith('Full logs: ')
  eval_dir = os.path.join(workdir, 'eval')
  rows = read_csv(os.path.join(eval_dir, 'sweep.csv'))
  assert [(r['capacity_factor'], r['batch_priority']) for r in rows] == [
      ('0.25', 'False'), ('0.25', 'True'), ('1.05', 'False'), ('1.05', 'True'),
      ('4', 'False'), ('4', 'True')]
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)['test']
  trained = rows[2]  # The training config: cf 1.05, no BPR.
  np.testing.assert_allclose(float(trained['accuracy']), final['prec@1'], atol=1e-6)
  np.testing.assert_allclose(float(trained['dropped/encoderblock_1']),
                             final['dropped/encoderblock_1'], atol=1e-6)
  dropped = [float(r['dropped/encoderblock_1']) for r in rows if r['batch_priority'] == 'False']
  gflops = [float(r['gflops_per_image']) for r in rows if r['batch_priority'] == 'False']
  assert dropped[0] > dropped[1] > dropped[2] == 0.0  # capacity 4x: nothing dropped.
  assert gflops[0] < gflops[1] < gflops[2]
  assert json.load(open(os.path.join(eval_dir, 'sweep.json')))[2]['capacity_factor'] == 1.05
  for name in ('sweep.png', 'routing.png', 'routing_summary.png', 'fewshot.png'):
    assert os.path.getsize(os.path.join(eval_dir, name)) > 1000, name
  routing = json.load(open(os.path.join(eval_dir, 'routing.json')))
  layer = routing['layers']['encoderblock_1']
  np.testing.assert_allclose(sum(layer['expert_load']), 1.0, atol=1e-9)
  np.testing.assert_allclose(layer['dropped_fraction'], final['dropped/encoderblock_1'],
                             atol=1e-6)
  assert np.asarray(layer['class_expert_counts']).shape == (10, 4)
  assert routing['recommendation']['keep_moe'] == ['encoderblock_1']
  shots = json.load(open(os.path.join(eval_dir, 'fewshot.json')))
  assert set(shots) == {'1shot', '2shot'}
  assert set(shots['1shot']['by_l2']) and 0 <= shots['2shot']['accuracy'] <= 1


def test_superclasses_from_a_trained_model(workdir, tmp_path):
  config = tiny_config()
  path = superclasses.derive(config, workdir, 3, output=str(tmp_path / 'sc.json'))
  table = json.load(open(path))
  assert len(table['superclass_of_class']) == 10
  assert set(table['superclass_of_class']) == {0, 1, 2}
  assert np.asarray(table['confusion']).sum() == 360  # The whole test split.
  assert os.path.getsize(tmp_path / 'sc.png') > 1000
  # The file plugs into the super-class guided per-image variant.
  guided = common.load_config(os.path.join(
      REPO, f'configs/digits.py:router=per_image_superclass,superclasses={path}'))
  config_lib.resolve(guided)
  assert guided.model.encoder.moe.router.superclasses == path
  with pytest.raises(ValueError, match='Cannot split 10 classes into num_experts=11'):
    superclasses.derive(config, workdir, 11, output=str(tmp_path / 'x.json'))


@pytest.mark.parametrize('spec, message', [
    ('capacity_factr=1,2', r"Bad sweep item 'capacity_factr=1,2'.*KEY one of "
                           r"\['batch_priority', 'capacity', 'capacity_factor'"),
    ('capacity_factor=-1', r'Sweep variant capacity_factor=-1 is not a valid config'),
    ('num_selected_experts=5', r'Sweep variant num_selected_experts=5 is not a valid config'),
])
def test_bad_sweep_fails_before_anything_runs(spec, message, env, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', env['TFDS_DATA_DIR'])
  with pytest.raises(ValueError, match=message):
    command.prepare(tiny_config(), eval_set='test', spec=spec, few_shot=False)


def test_variants_are_resolved_for_their_eval_images(env, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', env['TFDS_DATA_DIR'])
  run, variants = command.prepare(tiny_config(), eval_set='test', few_shot=True,
                                  spec='capacity_factor=0.5,1.05;num_selected_experts=1,2')
  assert [v.values for v in variants][1] == {
      'model.encoder.moe.router.dispatcher.capacity_factor': 0.5,
      'model.encoder.moe.router.num_selected_experts': 2}
  # Groups of 4 images x 16 tokens, E=4: ceil(64 K cf / 4) up to a multiple of 4.
  assert [v.data.model.encoder.moe.capacity for v in variants] == [8, 16, 20, 36]
  assert len({id(v.iterable) for v in variants}) == 1  # One eval pipeline for all.
  assert run.entry('fewshot.train').model.image_size == (8, 8)


def test_bad_eval_set():
  with pytest.raises(ValueError, match=r"--eval_set='val' is not an eval set.*\['test'\]"):
    command.prepare(tiny_config(), eval_set='val', spec='capacity_factor=1', few_shot=False)


def test_load_params_accepts_a_workdir_and_a_step_directory(workdir, tmp_path):
  _, by_workdir = sources.load_params(workdir)
  _, by_step = sources.load_params(os.path.join(workdir, 'checkpoints', '4'))
  assert jax.tree.structure(by_workdir) == jax.tree.structure(by_step)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(by_workdir),
                                                       jax.tree.leaves(by_step))]
  assert any(changed)  # Step 8 (latest) is not step 4.
  with pytest.raises(ValueError, match='No checkpoint at .*a WORKDIR'):
    sources.load_params(str(tmp_path))


def test_e3_trains_sweeps_and_analyses_on_8_devices(env, tmp_path, run_module):
  """E3 (configs/digits.py:router=e3, E=4 split between 2 members): the final metrics
  hold the ensemble's and each member's accuracy, NLL and ECE; the sweep's training
  variant reproduces them on 8 devices; the routing analysis reads the members' tokens."""
  workdir = str(tmp_path / 'e3')
  flags = [f.replace(CONFIG_ARG, 'configs/digits.py:num_experts=4,router=e3') for f in FLAGS]
  run_module('vmoe.main', f'--workdir={workdir}', *flags, '--config.fewshot.every_steps=100',
      env=env)
  final = json.load(open(os.path.join(workdir, 'final_metrics.json')))['test']
  for key in ('prec@1', 'loss', 'ece', 'member_0/prec@1', 'member_1/loss', 'member_1/ece'):
    assert np.isfinite(final[key]), key
  assert 0 <= final['ece'] <= 1 and final['num_examples'] == 360
  run_module('vmoe.evaluate', f'--workdir={workdir}', *flags, '--analyze',
      '--sweep=capacity_factor=0.5,1.05;num_selected_experts=1,2', env=env, devices=8)
  rows = read_csv(os.path.join(workdir, 'eval', 'sweep.csv'))
  trained = next(r for r in rows if r['capacity_factor'] == '1.05'
                 and r['num_selected_experts'] == '1')
  np.testing.assert_allclose(float(trained['accuracy']), final['prec@1'], atol=1e-6)
  np.testing.assert_allclose(float(trained['ece']), final['ece'], atol=1e-6)
  k2 = next(r for r in rows if r['capacity_factor'] == '1.05'
            and r['num_selected_experts'] == '2')
  assert float(k2['gflops_per_image']) > float(trained['gflops_per_image'])
  layer = json.load(open(os.path.join(workdir, 'eval', 'routing.json')))['layers'][
      'encoderblock_1']
  np.testing.assert_allclose(sum(layer['expert_load']), 1.0, atol=1e-9)
  np.testing.assert_allclose(layer['dropped_fraction'], final['dropped/encoderblock_1'],
                             atol=1e-6)
  assert layer['gate_entropy'] is not None
