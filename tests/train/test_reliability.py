"""Fault injection on tiny `python -m vmoe.main` runs (conftest.py): kills at
several points, a truncated checkpoint, an unwritable workdir, a loss that
explodes; and that no loading path unpickles or evaluates code."""
import ast
import glob
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from vmoe.checkpoints import sources
from vmoe.checkpoints import training
from vmoe.configs import common
from vmoe.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPLODE = '--config.optimizer.learning_rate.peak_value=100'  # NaN from step 14 on.


def _state(step: int) -> dict:
  return {'step': jnp.array(step, jnp.int32), 'params': {'w': jnp.arange(300.0) * step}}


def _truncate_data(directory: str, step: int):
  """Truncates the data files (OCDBT b-tree nodes and array chunks) of `step`
  to half their size: a restore reads only some of them, so all are cut."""
  for path in glob.glob(os.path.join(directory, str(step), 'state', '**', 'd', '*'),
                        recursive=True):
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.xla_defaults
def test_killed_at_several_points_resumes_bit_equal(runs, reference, tmp_path):
  workdir = str(tmp_path)
  # SIGKILL while the first checkpoint is written: nothing complete, so the
  # restart starts over.
  proc = runs.start(workdir)
  runs.kill_during_checkpoint_write(proc, workdir)
  assert runs.steps(workdir) == []
  # SIGTERM (preemption): a checkpoint at the current step, exit 0.
  proc = runs.start(workdir)
  runs.wait_for_checkpoint(proc, workdir, min_step=15)
  proc.send_signal(signal.SIGTERM)
  _, err = runs.finish(proc)
  stopped_at = int(re.search(r'Stopped by SIGTERM at step (\d+)', err).group(1))
  assert max(runs.steps(workdir)) == stopped_at < runs.train_steps
  assert not os.path.exists(os.path.join(workdir, 'final_metrics.json'))
  # SIGKILL while a later checkpoint is written: the previous one is used.
  proc = runs.start(workdir)
  killed_at = runs.kill_during_checkpoint_write(proc, workdir, min_step=stopped_at + 1)
  assert stopped_at <= max(runs.steps(workdir)) < killed_at
  out, _ = runs.finish(runs.start(workdir))
  assert 'Resuming from the checkpoint of step' in out
  runs.assert_bit_equal(runs.final_params(workdir), runs.final_params(reference.workdir))


def test_truncated_checkpoint_is_refused_and_the_previous_step_used(
    runs, reference, tmp_path):
  workdir = str(tmp_path / 'w')
  shutil.copytree(reference.workdir, workdir)
  last = runs.train_steps
  _truncate_data(os.path.join(workdir, 'checkpoints'), last)
  _, err = runs.finish(runs.start(workdir))
  assert re.search(rf'Checkpoint step {last} in \S+ cannot be read, so it is not used '
                   rf'\(trying the previous one\): ValueError: OUT_OF_RANGE: .*'
                   rf'/checkpoints/{last}/state/', err), err[-3000:]
  assert f'Resuming from step {last - 5}, the latest readable checkpoint' in err
  assert [n.split('-')[0] for n in os.listdir(
      os.path.join(workdir, 'checkpoints_unreadable'))] == [str(last)]
  runs.assert_bit_equal(runs.final_params(workdir), runs.final_params(reference.workdir))


def test_unreadable_checkpoints_fall_back_or_fail_clearly(tmp_path):
  ckpt = training.TrainCheckpointer(str(tmp_path), every_steps=1, keep_last=3)
  for step in (3, 5):
    ckpt.save(step, _state(step))
  ckpt.wait()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _state(0))
  _truncate_data(ckpt.directory, 5)
  with pytest.raises(ValueError, match=r'Checkpoint step 5 in .* cannot be read: '
                     r'ValueError: OUT_OF_RANGE'):
    sources.load_params(str(tmp_path))  # Never a silent fallback.
  step, state = ckpt.restore_latest(abstract)
  assert step == 3 and ckpt.all_steps() == [3]
  np.testing.assert_array_equal(state['params']['w'], _state(3)['params']['w'])
  ckpt.save(5, _state(5))  # The step moved aside can be saved again.
  ckpt.wait()
  assert ckpt.all_steps() == [3, 5]
  for step in (3, 5):
    _truncate_data(ckpt.directory, step)
  with pytest.raises(ValueError, match=r'No checkpoint in .* can be read: step 5: .*; '
                     r'step 3: .*restore it; to start from scratch, move'):
    ckpt.restore_latest(abstract)
  assert ckpt.all_steps() == [3, 5]  # Nothing moved when nothing loads.
  ckpt.close()


@pytest.mark.parametrize('kind', ['under_a_file', 'checkpoints_is_a_file', 'read_only'])
def test_unwritable_workdir_fails_at_start(kind, tmp_path):
  if kind == 'under_a_file':
    (tmp_path / 'file').write_text('')
    workdir = tmp_path / 'file' / 'workdir'
  elif kind == 'checkpoints_is_a_file':
    workdir = tmp_path / 'workdir'
    workdir.mkdir()
    (workdir / 'checkpoints').write_text('')
  else:
    if os.geteuid() == 0:
      pytest.skip('root writes into read-only directories')
    workdir = tmp_path / 'read_only'
    workdir.mkdir(mode=0o500)
  config = common.load_config(os.path.join(REPO, 'configs', 'digits.py'))
  events = []
  listener = lambda name, *_, **__: events.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(ValueError, match=rf'--workdir={re.escape(repr(str(workdir)))} '
                       r'cannot be written \(.*\); give a directory'):
      trainer.train_and_evaluate(config, str(workdir))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not [e for e in events if '/jax/core/compile/' in e]


@pytest.fixture(scope='module')
def exploded(runs, tmp_path_factory) -> dict[str, tuple[str, int, str]]:
  """{mode: (workdir, exit code, stderr)} of the exploding config in both
  config.nonfinite modes (the second run reuses the first one's compilation)."""
  tmp = tmp_path_factory.mktemp('exploded')
  # A config file of one's own sets the mode: config files are Python.
  (tmp / 'skip.py').write_text(
      'from vmoe.configs import common\n\n\ndef get_config(arg):\n'
      '  config = common.load_config("configs/digits.py:" + arg)\n'
      '  config.nonfinite = "skip"\n  return config\n')
  out = {}
  for mode, config in (('stop', runs.config), ('skip', f'{tmp / "skip.py"}:num_experts=4')):
    proc = runs.start(str(tmp / mode), EXPLODE, config=config)
    err = proc.communicate(timeout=300)[1]
    out[mode] = (str(tmp / mode), proc.returncode, err)
  return out


def test_exploding_loss_stops_and_keeps_the_last_good_checkpoint(runs, exploded):
  workdir, returncode, err = exploded['stop']
  assert returncode != 0
  match = re.search(r'NonFiniteError: Training stopped: step (\d+) gave a NaN or Inf loss, '
                    r'gradient norm or update.* The last good checkpoint is step (\d+): '
                    r'(\S+); a restart resumes', err)
  assert match, err[-3000:]
  bad, good, path = int(match.group(1)), int(match.group(2)), match.group(3)
  assert runs.steps(workdir)[-1] == good < bad  # Nothing saved after the bad step.
  assert path == os.path.join(workdir, 'checkpoints', str(good))
  params = training.load_step_params(path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_exploding_loss_skip_mode_leaves_the_state_unchanged(runs, exploded):
  workdir, returncode, err = exploded['skip']
  assert returncode == 0, err[-3000:]
  assert re.search(r'Step 20: \d+ step\(s\) of this run skipped .* the first at step', err)
  skipped = runs.scalars(workdir)['train/nonfinite_steps']
  assert skipped[runs.train_steps] == 10  # Steps 31 to 40: none applied...
  states = {}
  for step in (runs.train_steps - 5, runs.train_steps):
    with ocp.StandardCheckpointer() as ckptr:
      states[step] = ckptr.restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  a, b = (states[s] for s in sorted(states))
  assert int(a['step']) + 5 == int(b['step'])  # ...the step counter advanced,
  runs.assert_bit_equal(a['params'], b['params'])  # params and optimizer
  runs.assert_bit_equal(a['opt_state'], b['opt_state'])  # state did not change,
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(b['params']))  # finite.


UNSAFE_MODULES = {'pickle', '_pickle', 'cPickle', 'dill', 'cloudpickle', 'jsonpickle',
                  'marshal', 'shelve', 'joblib', 'torch'}


def _unsafe(node: ast.AST) -> bool:
  """Code that can execute what it reads: an unpickler, eval / exec, yaml.load,
  np.load(allow_pickle=True)."""
  if isinstance(node, (ast.Import, ast.ImportFrom)):
    names = [a.name for a in node.names] + [getattr(node, 'module', None) or '']
    return any(n.split('.')[0] in UNSAFE_MODULES for n in names)
  if isinstance(node, (ast.Name, ast.Attribute)):
    name = node.id if isinstance(node, ast.Name) else node.attr
    return 'pickle' in name.lower() or name in ('unsafe_load', 'full_load')
  if isinstance(node, ast.Call):
    func = node.func
    if isinstance(func, ast.Name) and func.id in ('eval', 'exec', '__import__'):
      return True
    if isinstance(func, ast.Attribute) and func.attr == 'load' and isinstance(
        func.value, ast.Name) and func.value.id == 'yaml':
      return True
    return any(k.arg == 'allow_pickle' and not (
        isinstance(k.value, ast.Constant) and k.value.value is False) for k in node.keywords)
  return False


def _unsafe_lines(source: str) -> list[int]:
  return [n.lineno for n in ast.walk(ast.parse(source)) if _unsafe(n)]


def test_no_loading_path_unpickles_or_evaluates_code():
  hits = []
  for path in glob.glob(os.path.join(REPO, 'vmoe', '**', '*.py'), recursive=True):
    with open(path) as f:
      hits += [f'{path}:{line}' for line in _unsafe_lines(f.read())]
  assert not hits, hits
  # The scan finds what it looks for, and only that.
  for code in ('import pickle', 'from dill import loads', 'eval(text)', 'x = pd.read_pickle(f)',
               'np.load(f, allow_pickle=True)', 'yaml.load(f)'):
    assert _unsafe_lines(code), code
  assert not _unsafe_lines('np.load(f, allow_pickle=False)\nast.literal_eval(s)\n'
                           'print("no pickle here")')
