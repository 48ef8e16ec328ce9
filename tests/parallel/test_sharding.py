"""Expert parallelism on 8 fake CPU devices: meshes give one device's loss and gradients,
experts are split over 'expert', tokens move by all-to-all (tests/parallel/sharding_worker.py,
run once in a subprocess so that the rest of the suite keeps its single device)."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUTERS = ('top_k', 'expert_choice', 'soft')
# Mesh name -> size of its expert axis.
MESHES = {'data8': 1, 'data2_expert4': 4, 'expert8': 8}
E = 8  # Experts of the worker's model.
TOL = 1e-5


@pytest.fixture(scope='module')
def worker() -> dict:
  # The legacy CPU emitters compile these programs 3x faster than the fusion emitters
  # (5 s -> 1.7 s each); the comparisons are within one process, so both sides use them.
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS='--xla_force_host_platform_device_count=8 '
                       '--xla_cpu_use_fusion_emitters=false')
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'tests/parallel/sharding_worker.py')],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_meshes_give_one_devices_loss_and_gradients(worker):
  # One test per worker fixture: pytest-xdist (-n 2) could otherwise run it in each worker.
  for router in ROUTERS:
    for mesh, experts in MESHES.items():
      r = worker[f'{router}/{mesh}']
      assert abs(r['loss'] - r['ref_loss']) <= TOL * max(1.0, abs(r['ref_loss'])), (
          router, mesh, r)
      assert r['grads_max_rel_diff'] <= TOL, (router, mesh, r)
      assert r['grads_follow_params'], (router, mesh, r)
      # The distinct (bytes on each device, bytes of the whole weight) of the expert
      # weights: kernels [E, D, H] and [E, H, D] (same size), biases [E, H] and [E, D].
      assert len(r['expert_bytes']) == 3, (router, mesh, r)
      for per_device, total in r['expert_bytes']:
        assert per_device == total // experts, (router, mesh, r)
      # Tokens to their experts' devices and back, forward and backward.
      if experts > 1:
        assert r['all_to_all'] >= 2, (router, mesh, r)
      else:
        assert r['all_to_all'] == 0, (router, mesh, r)
  # The scanned encoder: expert weights [L, E, ...] split on E alike.
  r = worker['scanned_top_k/data2_expert4']
  assert abs(r['loss'] - r['ref_loss']) <= TOL * max(1.0, abs(r['ref_loss'])), r
  assert r['grads_max_rel_diff'] <= TOL and r['grads_follow_params'], r
  assert len(r['expert_bytes']) == 3 and r['all_to_all'] >= 2, r
  assert all(per_device == total // 4 for per_device, total in r['expert_bytes']), r
  # Per-image routing on the expert mesh: the buffers move by all-to-all, the chosen
  # experts' weights come to the images instead.
  for path in ('buffers', 'chosen'):
    r = worker[f'per_image_{path}/data2_expert4']
    assert abs(r['loss'] - r['ref_loss']) <= TOL * max(1.0, abs(r['ref_loss'])), r
    assert r['grads_max_rel_diff'] <= TOL and r['grads_follow_params'], r
    assert all(per_device == total // 4 for per_device, total in r['expert_bytes']), r
  assert worker['per_image_buffers/data2_expert4']['all_to_all'] >= 2
  # E3: the members' experts split over 'expert' alike.
  r = worker['e3/data2_expert4']
  assert abs(r['loss'] - r['ref_loss']) <= TOL * max(1.0, abs(r['ref_loss'])), r
  assert r['grads_max_rel_diff'] <= TOL and r['grads_follow_params'], r
  assert all(per_device == total // 4 for per_device, total in r['expert_bytes']), r
  assert r['all_to_all'] >= 2, r
  check_train_step(worker['train_step'])


def check_train_step(r: dict):
  """A train step (Adam) on data 2 x expert 4 keeps the experts' weights and their
  mu and nu split over 'expert', the rest replicated."""
  assert math.isfinite(r['loss']), r['loss']
  expert_paths = [k for k in r['specs'] if "['Moe']['Mlp']" in k]
  # Params, Adam's mu and nu: 4 weights (2 kernels, 2 biases) each.
  for kind in ('.params', '.opt_state[0].mu', '.opt_state[0].nu'):
    assert len([k for k in expert_paths if k.startswith(kind)]) == 4, expert_paths
  for k in expert_paths:
    assert r['specs'][k] == "P('expert',)", (k, r['specs'][k])
    assert r['shard_shapes'][k][0] == E // 4, (k, r['shard_shapes'][k])  # data 2 x expert 4.
  for k, spec in r['specs'].items():
    if k not in expert_paths:
      assert spec == 'P()', (k, spec)
