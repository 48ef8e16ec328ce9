"""`python -m vmoe.main` with expert parallelism, in one and in two processes.

Runs of a tiny V-MoE on digits, all on 8 devices with the mesh data 2 x expert 4 (one
on a single device for comparison):
  one    1 process,  1 device;
  single 1 process,  8 fake CPU devices, --config.mesh.expert=4;
  multi  2 processes x 4 fake CPU devices each (jax.distributed on 127.0.0.1), the same.
The processes of `multi` read disjoint halves of the train split, so its batches hold
other examples in another order than a one-process run's. Each batch is therefore the
whole (64-image) train split, and the model is made blind to the order of the examples:
no token dropped (capacity factor E/K), no router noise, no auxiliary losses (they are
computed per group), no mixup. All three runs must then agree step by step.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 40
TINY = [
    '--config=configs/digits.py:num_experts=4,fewshot=False,mixup=0,capacity_factor=2.0',
    f'--config.train_steps={STEPS}',
    '--config.optimizer.learning_rate.warmup_steps=5',
    '--config.optimizer.learning_rate.peak_value=0.01',
    '--config.dataset.train.split=train[:64]',
    '--config.dataset.train.batch_size=64',
    '--config.dataset.test.split=test[:64]',
    '--config.dataset.test.batch_size=64',
    '--config.model.hidden_size=16',
    '--config.model.encoder.num_layers=2',
    '--config.model.encoder.mlp_dim=32',
    '--config.model.encoder.num_heads=2',
    '--config.model.encoder.moe.layers=(1,)',
    '--config.model.encoder.moe.router.noise_std=0',
    '--config.model.encoder.moe.router.importance_loss_weight=0',
    '--config.model.encoder.moe.router.load_loss_weight=0',
    '--config.report_progress.every_steps=1',
]
EXPERT = ['--config.mesh.expert=4']
TIMEOUT = 400  # Guards against a hung run, not a speed check.
LOSS = re.compile(r'\[(\d+)\] .*(?:^|[ ,])train/loss=([-+.\deE]+|nan|inf)')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Run:
  """The processes of one training run (one, or one per jax.distributed process)."""

  def __init__(self, workdir: str, env: dict, *, processes: int, devices: int,
               flags=()):
    self.workdir = workdir
    env = dict(env, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                              '--xla_cpu_use_fusion_emitters=false')
    cmd = [sys.executable, '-m', 'vmoe.main', f'--workdir={workdir}', *TINY, *flags]
    if processes > 1:
      cmd += [f'--coordinator_address=127.0.0.1:{free_port()}',
              f'--num_processes={processes}']
    # Logs go to files: a full pipe would stall a process that nobody reads yet.
    self.logs = [f'{workdir}_process{i}.log' for i in range(processes)]
    self.procs = []
    for i, log in enumerate(self.logs):
      with open(log, 'w') as f:
        self.procs.append(subprocess.Popen(
            cmd + ([f'--process_id={i}'] if processes > 1 else []), cwd=REPO, env=env,
            stdout=f, stderr=subprocess.STDOUT))

  def log(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def finish(self):
    """Waits for every process, which must exit 0."""
    for i, p in enumerate(self.procs):
      assert p.wait(timeout=TIMEOUT) == 0, self.log(i)[-3000:]
    with open(os.path.join(self.workdir, 'final_metrics.json')) as f:
      self.final = json.load(f)

  def losses(self) -> dict[int, float]:
    """{step: train loss} in process 0's log file."""
    with open(os.path.join(self.workdir, 'logs', 'main.log')) as f:
      return {int(m[1]): float(m[2]) for m in map(LOSS.search, f) if m}

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(scope='module')
def env(digits_data_dir, tmp_path_factory) -> dict:
  # One persistent compilation cache: the kill test's run compiles what `multi` did.
  return dict(os.environ, TFDS_DATA_DIR=digits_data_dir, JAX_PLATFORMS='cpu',
              JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


@pytest.fixture(scope='module')
def runs(env, tmp_path_factory) -> dict[str, Run]:
  """The three runs, started together (the two processes of `multi` must be)."""
  runs = {'one': Run(str(tmp_path_factory.mktemp('one')), env, processes=1, devices=1),
          'single': Run(str(tmp_path_factory.mktemp('single')), env, processes=1,
                        devices=8, flags=EXPERT),
          'multi': Run(str(tmp_path_factory.mktemp('multi')), env, processes=2,
                       devices=4, flags=EXPERT)}
  try:
    for r in runs.values():
      r.finish()
  finally:
    for r in runs.values():
      r.kill()
  return runs


def _close(a: float, b: float, rtol: float) -> bool:
  return abs(a - b) <= rtol * max(1.0, abs(b))


def test_expert_parallel_runs_match_one_device(runs):
  # One test of the `runs` fixture: pytest-xdist (-n 2) could otherwise run it twice.
  # multi: the same program on the same 8 devices (float rounding only); one: another
  # program on 1 device, whose rounding differences grow over the 40 Adam steps.
  ref = runs['single'].losses()
  assert sorted(ref) == list(range(2, STEPS + 1)), sorted(ref)  # Reports start at 2.
  assert ref[STEPS] < ref[2] - 0.5  # It learns.
  ref_final = runs['single'].final['test']
  assert ref_final['prec@1'] > 0.2  # Chance: 0.1 (40 steps on 64 images).
  for name, rtol in (('multi', 1e-5), ('one', 1e-3)):
    got = runs[name].losses()
    assert sorted(got) == sorted(ref), name
    bad = {s: (got[s], ref[s]) for s in ref if not _close(got[s], ref[s], rtol)}
    assert not bad, (name, bad)
    final = runs[name].final['test']
    assert final['num_examples'] == ref_final['num_examples'] == 64
    assert _close(final['loss'], ref_final['loss'], rtol), (name, final, ref_final)
    # The same predictions, up to one test image whose top two logits are within rounding.
    assert abs(final['prec@1'] - ref_final['prec@1']) <= 1 / 64, (name, final, ref_final)
  check_processes_and_checkpoint(runs['multi'])


def check_processes_and_checkpoint(multi: Run):
  """Both processes joined one run and wrote its checkpoint together."""
  for i in range(2):
    assert f'Process {i} of 2 (jax.distributed)' in multi.log(i)
  d = os.path.join(multi.workdir, 'checkpoints')
  assert os.listdir(d) == [str(STEPS)]  # Complete: no temporary directory left.
  step = os.path.join(d, str(STEPS))
  assert os.path.exists(os.path.join(step, 'commit_success.txt'))
  assert os.path.isdir(os.path.join(step, 'state', 'ocdbt.process_0'))


def test_killed_process_makes_the_other_exit(env, tmp_path):
  """SIGKILL one process mid-run: the other notices within the heartbeat timeout and
  exits with an error instead of waiting forever in a collective."""
  # `multi`'s flags (its compiled programs); a checkpoint every 5 of the 40 steps.
  run = Run(str(tmp_path), env, processes=2, devices=4,
            flags=EXPERT + ['--config.save_checkpoint.every_steps=5',
                            '--heartbeat_timeout=5'])
  try:
    ckpt = os.path.join(str(tmp_path), 'checkpoints', '5')
    deadline = time.time() + TIMEOUT
    while not os.path.exists(os.path.join(ckpt, 'commit_success.txt')):
      for i, p in enumerate(run.procs):
        assert p.poll() is None, run.log(i)[-3000:]
      assert time.time() < deadline, 'no checkpoint of step 5'
      time.sleep(0.1)
    run.procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    try:
      status = run.procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
      pytest.fail('Process 0 still runs 60 s after process 1 was killed.')
    assert status != 0, run.log(0)[-3000:]
    print(f'Process 0 exited {time.time() - start:.1f} s after the kill, status '
          f'{run.procs[0].returncode}.')
  finally:
    run.kill()
