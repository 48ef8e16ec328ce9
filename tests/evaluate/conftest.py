"""Shared by this folder's end-to-end tests: vmoe's commands run in a subprocess."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(module: str, *args: str, env, devices: int = 1) -> str:
  """stdout of `python -m module args` in the repository on `devices` fake CPU devices;
  the test fails with its stderr's tail if it does not exit 0."""
  env = dict(env, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                            '--xla_cpu_use_fusion_emitters=false')
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope='session')
def run_module():
  """_run: run_module('vmoe.main', '--workdir=...', ..., env=env, devices=8)."""
  return _run
