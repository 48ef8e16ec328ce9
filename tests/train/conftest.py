"""End-to-end runs of `python -m vmoe.main` on digits with a tiny V-MoE, shared
by test_main.py and test_reliability.py: every run of the session uses one
persistent compilation cache (only the first run of a program compiles), and
the uninterrupted reference run is made once."""
import glob
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_STEPS = 40
CONFIG = 'configs/digits.py:num_experts=4'
TINY = [
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
TIMEOUT = 300  # Guards against a hung run, not a speed check.


class Runs:
  """Starts tiny training runs and watches their checkpoints."""
  train_steps = TRAIN_STEPS
  config = CONFIG

  def __init__(self, env):
    self.env = env

  def start(self, workdir: str, *flags: str, config: str = CONFIG) -> subprocess.Popen:
    """A run of `config` (FILE.py:ARG) with the TINY overrides and `flags`."""
    return subprocess.Popen(
        [sys.executable, '-m', 'vmoe.main', f'--workdir={workdir}',
         f'--config={config}', *TINY, *flags],
        cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)

  @staticmethod
  def finish(proc: subprocess.Popen) -> tuple[str, str]:
    """(stdout, stderr) of a run that must exit 0."""
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    return out, err

  @staticmethod
  def steps(workdir: str) -> list[int]:
    """The complete checkpoints."""
    d = os.path.join(workdir, 'checkpoints')
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []

  @staticmethod
  def _poll(proc, what: str, deadline: float):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    if time.time() > deadline:
      pytest.fail(f'Timed out waiting for {what}.')

  def wait_for_checkpoint(self, proc, workdir: str, min_step: int = 1) -> int:
    """Waits until a complete checkpoint of step >= min_step exists."""
    deadline = time.time() + TIMEOUT
    while not [s for s in self.steps(workdir) if s >= min_step]:
      self._poll(proc, f'a checkpoint >= {min_step} in {workdir}', deadline)
      time.sleep(0.02)
    return max(self.steps(workdir))

  def kill_during_checkpoint_write(self, proc, workdir: str, min_step: int = 1) -> int:
    """SIGKILLs `proc` while it writes a checkpoint of step >= min_step.

    As soon as orbax's temporary directory of such a step appears, the process
    is frozen (SIGSTOP); if the directory is still temporary once every thread
    has stopped, the process is killed mid-write, else (the write finished in
    between) it resumes and the next checkpoint is tried. Returns the step.
    """
    d = os.path.join(workdir, 'checkpoints')
    deadline = time.time() + TIMEOUT
    while True:
      tmp = [os.path.join(d, n) for n in (os.listdir(d) if os.path.isdir(d) else ())
             if '.orbax-checkpoint-tmp' in n and int(n.split('.')[0]) >= min_step]
      if tmp:
        proc.send_signal(signal.SIGSTOP)
        _wait_stopped(proc.pid)
        if os.path.exists(tmp[0]):
          proc.kill()
          proc.communicate(timeout=TIMEOUT)
          assert os.path.exists(tmp[0])  # Left half-written.
          return int(os.path.basename(tmp[0]).split('.')[0])
        proc.send_signal(signal.SIGCONT)
      self._poll(proc, f'a checkpoint write >= {min_step} in {workdir}', deadline)
      time.sleep(0.002)

  def final_params(self, workdir: str) -> dict:
    from vmoe.checkpoints import sources  # pylint: disable=g-import-not-at-top
    where, params = sources.load_params(workdir)
    assert where.endswith(f'/checkpoints/{self.train_steps}')
    return params

  @staticmethod
  def assert_bit_equal(a, b):
    import jax  # pylint: disable=g-import-not-at-top
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  @staticmethod
  def scalars(workdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the run's TensorBoard events."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    out = {}
    for path in glob.glob(os.path.join(workdir, 'events.out.tfevents*')):
      for event in tf.compat.v1.train.summary_iterator(path):
        for v in event.summary.value:
          value = (float(tf.make_ndarray(v.tensor)) if v.HasField('tensor')
                   else v.simple_value)
          out.setdefault(v.tag, {})[event.step] = value
    return out


def _wait_stopped(pid: int):
  """Until every thread of `pid` is stopped (state 'T' in /proc)."""
  deadline = time.time() + 10
  while time.time() < deadline:
    states = []
    for task in glob.glob(f'/proc/{pid}/task/*/stat'):
      try:
        with open(task) as f:
          states.append(f.read().rsplit(')', 1)[1].split()[0])
      except FileNotFoundError:  # A thread that just ended.
        pass
    if states and all(s in 'Tt' for s in states):
      return
    time.sleep(0.001)
  pytest.fail(f'Process {pid} did not stop.')


@pytest.fixture(scope='session')
def runs(digits_data_dir, tmp_path_factory) -> Runs:
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  # The runs inherit conftest's JAX_DISABLE_MOST_OPTIMIZATIONS (fast compiles
  # of these tiny programs); all use the same flags, so bit-equality holds.
  return Runs(dict(os.environ, TFDS_DATA_DIR=digits_data_dir,
                   JAX_COMPILATION_CACHE_DIR=cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0'))


@pytest.fixture(scope='session')
def reference(runs, tmp_path_factory) -> types.SimpleNamespace:
  """The uninterrupted run: its workdir, stdout and stderr. Tests must not change it."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  stdout, stderr = runs.finish(runs.start(workdir))
  return types.SimpleNamespace(workdir=workdir, stdout=stdout, stderr=stderr)
