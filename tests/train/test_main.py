"""End to end: `python -m vmoe.main` on digits with a tiny model.

The uninterrupted reference run of conftest.py writes checkpoints, TensorBoard
events and final metrics; config errors name the key. Kills, preemption and
restarts are in test_reliability.py.
"""
import json
import os
import re

import numpy as np
import pytest
from vmoe import main as vmoe_main
from vmoe.configs import common
from vmoe.train import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_run_artifacts(runs, reference):
  # Uninterrupted: checkpoints, TensorBoard events, final metrics.
  assert 'Final test: prec@1=' in reference.stdout
  with open(os.path.join(reference.workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert final['step'] == runs.train_steps
  assert final['num_params'] > 0 and final['train_seconds_per_step'] > 0
  test = final['test']
  assert test['num_examples'] == 360 and 0.0 <= test['prec@1'] <= 1.0
  assert np.isfinite(test['loss'])
  # keep_last=2:
  assert runs.steps(reference.workdir) == [runs.train_steps - 5, runs.train_steps]
  tags = set(runs.scalars(reference.workdir))
  for tag in ('test/prec@1', 'test/loss', 'train/loss', 'train/learning_rate',
              'train/auxiliary_loss', 'train/encoderblock_1/importance_loss',
              'train/encoderblock_1/expert_load_max', 'steps_per_sec'):
    assert tag in tags, sorted(tags)


def test_console_shows_progress_and_results_and_the_log_file_the_rest(runs, reference):
  out, err = reference.stdout.splitlines(), reference.stderr.splitlines()
  log = os.path.join(reference.workdir, 'logs', 'main.log')
  assert out[0] == f'Full logs: {log}'
  assert out[1].startswith('Training VisionTransformerMoe (') and 'for 40 steps' in out[1]
  assert out[2:] == ['Step 20, test: ' + out[2].split(': ', 1)[1],
                     'Step 40, test: ' + out[3].split(': ', 1)[1],
                     'Step 40, few-shot: ' + out[4].split(': ', 1)[1],
                     'Final test: ' + out[5].split(': ', 1)[1]], out
  # Not a terminal: one progress line per report (every 10 steps), nothing else.
  assert [line.split(' [')[0] for line in err] == [f'train: {s}/40' for s in (10, 20, 30, 40)], err
  assert re.search(r'train: 40/40 \[.*step/s, loss=[0-9.]+\]$', err[-1])
  with open(log) as f:
    text = f.read()
  # Python logs (absl, orbax, TFDS, JAX), TensorFlow's C++ start-up lines, the summary.
  for line in ('Load dataset info from', 'Saving checkpoint for step 40',
               'Final test: prec@1=', '| Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel'):
    assert line in text, line
  # TensorFlow's C++ start-up lines depend on the host's CPU (oneDNN, CPU features; none
  # once jaxlib has set absl's log level): tests/test_cli.py checks their capture.
  assert text.count('Load dataset info from') == 1  # One builder per dataset and process.


def test_unknown_override_key_lists_valid_keys(capsys):
  argv = ['vmoe.main', '--config=configs/digits.py', '--workdir=/nonexistent',
          '--config.optimizer.b3=0.9']
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    with pytest.raises(SystemExit) as e:
      vmoe_main.cli.parse_flags(argv)  # vmoe.main defines the --config flag.
  finally:
    os.chdir(cwd)
  assert e.value.code == 2
  assert re.match(r"error: Unknown config key 'optimizer.b3'.*valid keys: \['b1', 'b2'",
                  capsys.readouterr().err)


def test_unknown_config_key_lists_valid_keys():
  config = _digits_config()
  with config.unlocked():
    config.train_stpes = 10
  with pytest.raises(ValueError, match=r"\['train_stpes'\] in config; valid keys:"
                     r".*'train_steps'"):
    config_lib.resolve(config)
  config = _digits_config()
  config.save_checkpoint.every_step = 5
  with pytest.raises(ValueError, match=r"in config.save_checkpoint; valid keys: "
                     r"\['every_steps', 'keep_every', 'keep_last'\]"):
    config_lib.resolve(config)


def _digits_config():
  return common.load_config(os.path.join(REPO, 'configs', 'digits.py'))
