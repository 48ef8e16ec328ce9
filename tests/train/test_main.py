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
from vmoe.train import config_checks

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
    config_checks.check_config(config)
  config = _digits_config()
  config.save_checkpoint.every_step = 5
  with pytest.raises(ValueError, match=r"in config.save_checkpoint; valid keys: "
                     r"\['every_steps', 'keep_every', 'keep_last'\]"):
    config_checks.check_config(config)


def _digits_config():
  return common.load_config(os.path.join(REPO, 'configs', 'digits.py'))
