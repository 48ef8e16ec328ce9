r"""Save and restore throughput of a ~1 GiB sharded train state, next to raw disk writes.

  python benchmarks/checkpoint.py [--dir /tmp] [--gib 1.0] [--repeats 3] [--json]

The state is a V-MoE-like tree on 8 devices (fake CPU devices unless the machine has 8):
two expert weights [8, D, 4D] and [8, 4D, D] of one MoE layer (the bulk, split over
the mesh axis 'expert' by vmoe.parallel's sharding rules: each device holds one
expert) and a few replicated dense arrays, float32, random (so that no compression
or sparse file can shortcut the writes). It is written by
vmoe.checkpoints.training.TrainCheckpointer (orbax, async, OCDBT) exactly as the
trainer does:

- save, blocking: how long `save()` holds the training loop (it returns once the
  arrays are copied to host memory; the files are written in the background);
- save, until done: from `save()` to `wait()` returning (every file written and
  fsynced by TensorStore, the step directory renamed into place); throughput =
  state bytes / that time. The first save of a process is reported apart: it
  also starts orbax (thread pools, the checkpoint directory), which later saves
  do not pay again;
- restore: `restore()` onto the same shardings, until every array is on its
  devices, and onto another mesh (data 8, with fsdp: arrays re-split on the
  way). The checkpoint was just written, so it is read from the page cache:
  this is the decode-and-place cost, not the disk's read speed.

Raw disk: `dd if=/dev/zero bs=64M count=N` of the same size in the same
directory, with `conv=fdatasync` (until the disk has it, as TensorStore's fsync
waits for) and without (page cache only: the most any writer can get). Each
figure is the median of --repeats. CPU time: this process's threads (and dd's),
user + system, during the operation; orbax compresses each chunk with zstd
(its default), which costs CPU on both save and restore and gains little on
trained float32 weights (random ones here: the on-disk size is printed).
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time

# 8 fake CPU devices, before JAX starts (no effect on GPU/TPU).
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from vmoe.checkpoints import training  # pylint: disable=g-import-not-at-top,wrong-import-position
from vmoe.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

E = 8
GIB = 2 ** 30

# Rows of the table, in order.
LABELS = {
    'save_blocking_first': 'first save(): blocks the train loop',
    'save_total_first': 'first save(): until written',
    'save_blocking': 'save(): blocks the train loop',
    'save_total': 'save(): until written (wait())',
    'restore_same': 'restore: same sharding (expert 8)',
    'restore_resharded': 'restore: other mesh (data 8, fsdp)',
    'dd_fdatasync': 'dd bs=64M conv=fdatasync',
    'dd_page_cache': 'dd bs=64M (page cache, no sync)',
}


def make_state(gib: float):
  """(init function, D, state bytes): the expert MLP of one MoE layer takes ~`gib` GiB."""
  # 2 expert weights of E * D * 4D float32 each: 32 E D^2 bytes.
  d = int((gib * GIB / (32 * E)) ** 0.5) // 128 * 128
  shapes = {'step': ((), jnp.int32), 'params': {'Encoder': {'encoderblock_1': {
      'Moe': {'Mlp': {'Dense_0': {'kernel': ((E, d, 4 * d), jnp.float32)},
                      'Dense_1': {'kernel': ((E, 4 * d, d), jnp.float32)}},
              'Router': {'dense': {'kernel': ((d, E), jnp.float32)}}},
      'SelfAttention': {'query': {'kernel': ((d, d), jnp.float32)}}}}}}
  leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))

  def init():
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree.unflatten(tree, [
        jnp.zeros(s, t) if t == jnp.int32 else jax.random.normal(k, s, t)
        for k, (s, t) in zip(keys, leaves)])
  nbytes = sum(jnp.dtype(t).itemsize * math.prod(s) for s, t in leaves)
  return init, d, nbytes


def abstract(shapes, sharding):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, sharding)


def clock() -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process's threads and its finished children)."""
  t = os.times()
  return time.perf_counter(), t.user + t.system + t.children_user + t.children_system


def since(t0: tuple[float, float]) -> tuple[float, float]:
  return tuple(b - a for a, b in zip(t0, clock()))


def dd(path: str, count: int, *flags: str):
  """Writes count x 64 MiB of zeros to `path` with dd; returns (wall, CPU) seconds."""
  t0 = clock()
  subprocess.run(['dd', 'if=/dev/zero', f'of={path}', 'bs=64M', f'count={count}', *flags],
                 capture_output=True, check=True)
  took = since(t0)
  os.remove(path)
  return took


def disk_bytes(directory: str) -> int:
  return sum(os.stat(os.path.join(d, f)).st_blocks * 512
             for d, _, files in os.walk(directory) for f in files)


def run(directory: str, gib: float, repeats: int) -> dict:
  init, d, nbytes = make_state(gib)
  shapes = jax.eval_shape(init)
  saved_on = mesh_lib.state_sharding(mesh_lib.make_mesh({'expert': E}), shapes)
  other = mesh_lib.state_sharding(mesh_lib.make_mesh({'data': E}), shapes, fsdp=True)
  state = jax.block_until_ready(jax.jit(init, out_shardings=saved_on)())
  workdir = tempfile.mkdtemp(prefix='vmoe_ckpt_bench_', dir=directory)
  times = {k: [] for k in LABELS}
  try:
    ckpt = training.TrainCheckpointer(workdir, every_steps=1, keep_last=1)
    for step in range(repeats + 1):
      t0 = clock()
      ckpt.save(step, state)
      blocking = since(t0)
      ckpt.wait()
      total = since(t0)
      # The first save also starts orbax's threads and directories.
      first = '_first' if not step else ''
      times['save_blocking' + first].append(blocking)
      times['save_total' + first].append(total)
      if not step:
        on_disk = disk_bytes(os.path.join(ckpt.directory, '0'))
        continue
      for name, sharding in (('restore_same', saved_on), ('restore_resharded', other)):
        t0 = clock()
        restored, _ = ckpt.restore(step, abstract(shapes, sharding))
        jax.block_until_ready(restored)
        times[name].append(since(t0))
        del restored
    ckpt.close()
    count = max(1, round(nbytes / (64 * 2 ** 20)))
    for _ in range(repeats):
      times['dd_fdatasync'].append(dd(os.path.join(workdir, 'dd.tmp'), count,
                                      'conv=fdatasync'))
      times['dd_page_cache'].append(dd(os.path.join(workdir, 'dd.tmp'), count))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  dd_bytes = count * 64 * 2 ** 20
  rows = {}
  for name, ts in times.items():
    wall = statistics.median(t[0] for t in ts)
    size = dd_bytes if name.startswith('dd') else nbytes
    rows[name] = {'seconds': wall, 'cpu_seconds': statistics.median(t[1] for t in ts),
                  'gib_per_s': size / GIB / wall, 'bytes': size}
  return {'devices': jax.device_count(), 'platform': jax.devices()[0].platform,
          'hidden_size': d, 'state_bytes': nbytes, 'checkpoint_disk_bytes': on_disk,
          'repeats': repeats, 'directory': directory, 'rows': rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dir', default=tempfile.gettempdir(),
                      help='where to write (a temporary directory in it is removed)')
  parser.add_argument('--gib', type=float, default=1.0, help='state size in GiB')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', action='store_true', help='one JSON object')
  args = parser.parse_args()
  if args.gib <= 0 or args.repeats < 1:
    parser.error(f'--gib must be > 0 and --repeats >= 1, got {args.gib}, {args.repeats}.')
  if jax.device_count() != E:
    parser.error(f'needs {E} devices, found {jax.device_count()}; on CPU leave XLA_FLAGS '
                 'unset (8 fake devices are made) or set '
                 f'--xla_force_host_platform_device_count={E}.')
  r = run(os.path.abspath(args.dir), args.gib, args.repeats)
  if args.json:
    print(json.dumps(r))
    return
  print(f'{r["platform"]} x {r["devices"]}: state {r["state_bytes"] / GIB:.2f} GiB '
        f'(experts [8, {r["hidden_size"]}, {4 * r["hidden_size"]}] x 2 over \'expert\'), '
        f'{r["checkpoint_disk_bytes"] / GIB:.2f} GiB on disk, in {r["directory"]}, '
        f'median of {r["repeats"]}\n')
  print('| operation | time | GiB/s | CPU time |\n|---|---|---|---|')
  for name, row in r['rows'].items():
    print(f'| {LABELS[name]} | {row["seconds"]:.3f} s | {row["gib_per_s"]:.2f} | '
          f'{row["cpu_seconds"]:.1f} s |')


if __name__ == '__main__':
  main()
