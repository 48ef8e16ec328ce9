"""End to end: `python -m vmoe.main` on digits with a tiny model.

One uninterrupted run is the reference; a run killed with SIGKILL after its
first checkpoint must, once restarted, end with bit-identical params. SIGTERM
saves a checkpoint at the current step and exits 0. The runs share a
persistent compilation cache, so only the first one compiles.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from vmoe import main as vmoe_main
from vmoe.checkpoints import training
from vmoe.configs import common
from vmoe.train import config_checks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_STEPS = 40
TINY = [
    '--config=configs/digits.py:num_experts=4',
    f'--config.train_steps={TRAIN_STEPS}',
    '--config.optimizer.learning_rate.warmup_steps=10',
    '--config.dataset.train.batch_size=32',
    '--config.model.hidden_size=16',
    '--config.model.encoder.num_layers=2',
    '--config.model.encoder.mlp_dim=32',
    '--config.model.encoder.num_heads=2',
    '--config.model.encoder.moe.layers=(1,)',
    '--config.save_checkpoint.every_steps=5',
    '--config.evaluate.every_steps=20',
    '--config.report_progress.every_steps=10',
]


@pytest.fixture(scope='module')
def env(digits_data_dir, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  # The runs inherit conftest's JAX_DISABLE_MOST_OPTIMIZATIONS (fast compiles
  # of these tiny programs); all use the same flags, so bit-equality holds.
  return dict(os.environ, TFDS_DATA_DIR=digits_data_dir,
              JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def start(workdir, env) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, '-m', 'vmoe.main', f'--workdir={workdir}', *TINY],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def finish(proc, timeout=300) -> str:
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out


def steps(workdir) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def wait_for_checkpoint(proc, workdir, timeout=300):
  deadline = time.time() + timeout  # Guards against a hung run, not a speed check.
  while not steps(workdir):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    if time.time() > deadline:
      pytest.fail(f'No checkpoint in {workdir} after {timeout} s.')
    time.sleep(0.05)


def final_params(workdir) -> dict:
  step, params = training.load_latest_params(workdir)
  assert step == TRAIN_STEPS
  return params


def event_tags(workdir) -> set[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for name in os.listdir(workdir):
    if name.startswith('events.out.tfevents'):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
        tags.update(v.tag for v in event.summary.value)
  return tags


def assert_bit_equal(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_run_artifacts_and_sigkill_restart_bit_equal(env, tmp_path):
  # Uninterrupted: checkpoints, TensorBoard events, final metrics.
  reference = str(tmp_path / 'uninterrupted')
  stdout = finish(start(reference, env))
  assert 'Final test: prec@1=' in stdout
  with open(os.path.join(reference, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['step'] == TRAIN_STEPS
  assert final['num_params'] > 0 and final['train_seconds_per_step'] > 0
  test = final['test']
  assert test['num_examples'] == 360 and 0.0 <= test['prec@1'] <= 1.0
  assert np.isfinite(test['loss'])
  assert steps(reference) == [TRAIN_STEPS - 5, TRAIN_STEPS]  # keep_last=2.
  tags = event_tags(reference)
  for tag in ('test/prec@1', 'test/loss', 'train/loss', 'train/learning_rate',
              'train/auxiliary_loss', 'train/encoderblock_1/importance_loss',
              'train/encoderblock_1/expert_load_max', 'steps_per_sec'):
    assert tag in tags, sorted(tags)

  # Killed after its first checkpoint, then restarted: the same params.
  workdir = str(tmp_path / 'killed')
  proc = start(workdir, env)
  wait_for_checkpoint(proc, workdir)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert steps(workdir) and max(steps(workdir)) < TRAIN_STEPS
  finish(start(workdir, env))
  assert_bit_equal(final_params(workdir), final_params(reference))


def test_sigterm_saves_at_the_current_step_and_exits_0(env, tmp_path):
  workdir = str(tmp_path)
  proc = start(workdir, env)
  wait_for_checkpoint(proc, workdir)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert 'Stopped by SIGTERM at step' in err
  stopped_at = int(err.split('Stopped by SIGTERM at step ')[1].split(';')[0])
  assert max(steps(workdir)) == stopped_at < TRAIN_STEPS
  assert not os.path.exists(os.path.join(workdir, 'final_metrics.json'))


def test_unknown_override_key_lists_valid_keys():
  argv = ['vmoe.main', '--config=configs/digits.py', '--workdir=/nonexistent',
          '--config.optimizer.b3=0.9']
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    with pytest.raises(ValueError, match=r"'optimizer.b3'.*valid keys: \['b1', 'b2'"):
      vmoe_main.cli.parse_flags(argv)  # vmoe.main defines the --config flag.
  finally:
    os.chdir(cwd)


def test_unknown_config_key_lists_valid_keys():
  config = _digits_config()
  with config.unlocked():
    config.train_stpes = 10
  with pytest.raises(ValueError, match=r"\['train_stpes'\] in config; valid keys:"
                     r".*'train_steps'"):
    config_checks.check_config(config)
  config = _digits_config()
  config.save_checkpoint.every_step = 5
  with pytest.raises(ValueError, match=r"in config.save_checkpoint; valid keys: "
                     r"\['every_steps', 'keep_last'\]"):
    config_checks.check_config(config)


def _digits_config():
  return common.load_config(os.path.join(REPO, 'configs', 'digits.py'))
