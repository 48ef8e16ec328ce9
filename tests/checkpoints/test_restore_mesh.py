"""A train state saved on one mesh restores onto others with equal values.

On 8 fake CPU devices (restore_mesh_worker.py, in subprocesses so that the rest
of the suite keeps its single device): a tiny V-MoE's Adam train state is saved
with TrainCheckpointer on data 2 x expert 4, then restored, in a new process,
onto expert 8, data 8 with fsdp, and one device.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
EXPERT = 'Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel'
MU, EXPERT, DENSE = (f'opt_state/0/mu/{EXPERT}', f'params/{EXPERT}',
                     'params/Encoder/encoderblock_0/Mlp/Dense_0/kernel')


def _worker(*args) -> dict:
  env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                                    ' --xla_force_host_platform_device_count=8'),
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.join(HERE, 'restore_mesh_worker.py'),
                        *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def saved_and_restored(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('mesh_ckpt'))
  saved = _worker('save', workdir)
  return workdir, saved, _worker('restore', workdir)


def test_saved_sharded_as_one_ocdbt_database(saved_and_restored):
  workdir, saved, _ = saved_and_restored
  assert saved[EXPERT][:2] == [['expert'], [2, 16, 32]]
  assert saved[MU][:2] == [['expert'], [2, 16, 32]]
  assert saved[DENSE][:2] == [[], [16, 32]]
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['7']
  assert os.path.exists(os.path.join(workdir, 'checkpoints', '7', 'state',
                                     'manifest.ocdbt'))


@pytest.mark.parametrize('target', ['expert8', 'data8_fsdp', 'single_device'])
def test_restored_values_equal_the_saved_ones(saved_and_restored, target):
  _, saved, restored = saved_and_restored
  got = restored[target]
  assert got['step'] == 7
  assert sorted(got['leaves']) == sorted(saved)
  for path, (_, _, data) in saved.items():
    assert got['leaves'][path][2] == data, path


def test_restored_onto_the_asked_shardings(saved_and_restored):
  _, _, restored = saved_and_restored
  expert8, data8 = restored['expert8']['leaves'], restored['data8_fsdp']['leaves']
  assert expert8[EXPERT][:2] == [['expert'], [1, 16, 32]]
  assert expert8[MU][:2] == [['expert'], [1, 16, 32]]
  assert expert8[DENSE][:2] == [[], [16, 32]]
  # No expert axis: fsdp splits the largest dimension divisible by 8 over 'data'.
  assert data8[EXPERT][:2] == [[None, None, 'data'], [8, 16, 4]]
  assert data8[DENSE][:2] == [[None, 'data'], [16, 4]]
  single = restored['single_device']
  assert single['devices'] == [3]
  assert all(spec is None for spec, _, _ in single['leaves'].values())
  assert single['leaves'][EXPERT][1] == [8, 16, 32]
