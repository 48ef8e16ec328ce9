"""Orbax checkpoints of the train state, in WORKDIR/checkpoints/<step>/.

Each checkpoint holds `state` (any pytree of jax.Arrays: step, params,
optimizer state) and `meta` (JSON: the step, the run's seed and whatever the
trainer adds). Saving is asynchronous: `save()` returns once the arrays are
copied to host memory, and the files are written in the background.

What a checkpoint restores: the trainer's data position and random numbers are
functions of (seed, step) (the batch read at step t is batch t of the seeded
input order; the key of each random stream at step t is folded from the seed
and t), so the checkpoint's step restores both exactly. The seed is stored in
`meta`, and resuming with a different config.seed is refused (it would
silently change both).

At scale: arrays are written by TensorStore into one OCDBT database per
checkpoint (orbax's default, `use_ocdbt=True`: a few large files instead of one
per array chunk; `manifest.ocdbt` marks it; chunks are zstd-compressed, orbax's
default). Each process writes only the shards its own devices hold (a
replicated array once, not per copy), and `restore` reads onto whatever
shardings the abstract state asks for, so a state saved on one mesh (e.g.
experts over a 4-way axis) restores onto another (tests/checkpoints/
test_restore_mesh.py; throughput: benchmarks/checkpoint.py). Retention: the
last `keep_last` checkpoints, plus every step that is a multiple of
`keep_every` (save_checkpoint.keep_every), are kept.

A half-written checkpoint is never loaded: orbax writes each step into
`<step>.orbax-checkpoint-tmp-<id>/` and renames it to `<step>/` only once every
file is complete (the rename is atomic on a local file system); the step list
ignores the temporary names, and `cleanup_tmp_directories` deletes the ones a
crash left behind. A complete checkpoint that cannot be read (a truncated or
lost file) is skipped for the previous one by `restore_latest`.

Loading never executes code: arrays are read by TensorStore (zarr chunks in an
OCDBT database) and the rest is JSON; nothing is unpickled.
"""
import os
import time
from typing import Any

from absl import logging
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from vmoe.nn import models
from vmoe.nn import scan as scan_lib
from vmoe.utils import files

PyTree = Any


class TrainCheckpointer:
  """Saves every `every_steps` (and when forced); keeps the last `keep_last`
  and every multiple of `keep_every`; refuses to resume a different `seed`."""

  def __init__(self, workdir: str, *, every_steps: int | None,
               keep_last: int | None = 1, keep_every: int | None = None,
               seed: int | None = None, asynchronous: bool = True):
    for name, value in (('every_steps', every_steps), ('keep_every', keep_every)):
      if value is not None and value <= 0:
        raise ValueError(f'save_checkpoint.{name} must be > 0 or None, got {value}.')
    if keep_last is not None and keep_last <= 0:
      raise ValueError(f'save_checkpoint.keep_last must be > 0 or None (keep '
                       f'all), got {keep_last}.')
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    files.check_writable(workdir, os.path.abspath(workdir), self.directory)
    self.every_steps = every_steps
    self.seed = seed
    self._last_saved = None
    keep = [ocp.checkpoint_managers.LatestN(n=keep_last)]
    if keep_every:
      keep.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_every))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=asynchronous,
            # Which steps to save is decided in `should_save`, not by orbax's
            # default policies (which would also save the very first step).
            save_decision_policy=ocp.checkpoint_managers.SpecificStepsPolicy(
                steps=()),
        ))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return bool(self.every_steps) and step % self.every_steps == 0

  def save(self, step: int, state: PyTree, meta: dict[str, Any] | None = None):
    """Starts writing `state` as checkpoint `step` (returns before it is done)."""
    if step == self._last_saved or step in self._manager.all_steps():
      return  # E.g. the final step, already saved by the periodic rule.
    self._last_saved = step
    # Safe although the next train step donates (reuses) the state's buffers:
    # orbax copies the arrays to host memory before save() returns.
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({'step': step, **(meta or {}), **(
                {} if self.seed is None else {'seed': self.seed})})),
        force=True)
    logging.info('Saving checkpoint for step %d in %s', step, self.directory)

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict]:
    """Restores checkpoint `step` onto the shardings of `abstract_state`.

    Args:
      step: the checkpoint to read (e.g. `latest_step()`).
      abstract_state: the state's tree of jax.ShapeDtypeStruct with shardings.

    Returns:
      (state, meta).
    """
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree] | None:
    """(step, state) of the latest checkpoint that can be read; None if none.

    A checkpoint that fails to load (e.g. a truncated file) is logged and the
    previous one tried. Once one loads, the unreadable newer ones are moved to
    WORKDIR/checkpoints_unreadable/ (kept for inspection, and out of the way
    of the steps about to be saved again). If none loads, nothing is moved
    (e.g. a changed model config fails every step alike) and the ValueError
    lists each step's error. A checkpoint of another seed is a ValueError.
    """
    errors = {}
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # Orbax raises bare Exceptions.
        errors[step] = read_error(e)
        logging.warning('Checkpoint step %d in %s cannot be read, so it is not '
                        'used (trying the previous one): %s', step,
                        self.directory, errors[step])
        continue
      self._check_seed(step, meta)
      if errors:
        self._move_aside(sorted(errors))
        logging.warning('Resuming from step %d, the latest readable checkpoint; '
                        'unreadable steps %s moved to %s.', step, sorted(errors),
                        self._unreadable_dir)
      return step, state
    if errors:
      self._check_scan_layout(max(errors), abstract_state)
      raise ValueError(
          f'No checkpoint in {self.directory} can be read: '
          + '; '.join(f'step {s}: {e}' for s, e in errors.items())
          + '. If the config changed since they were written, restore it; to '
          'start from scratch, move that directory away.')
    return None

  def _check_scan_layout(self, step: int, abstract_state: PyTree):
    """The scan-layout error (vmoe.nn.scan), or the per-image router layout's
    (vmoe.nn.models.router_layout_hint), if that is why `step` cannot be read.

    Only called once every step failed: a changed model.encoder.scan or router scope
    fails them all alike, and orbax's own error (a tree structure mismatch) does not say
    so.
    """
    params = getattr(abstract_state, 'params', None)
    if params is None:
      return
    try:
      saved = params_metadata(os.path.join(self.directory, str(step)))
    except Exception:  # pylint: disable=broad-except  # Unreadable: the caller's error says why.
      return
    want = traverse_util.flatten_dict(params, sep='/')
    scan_lib.check_same_layout(saved, want, f'Checkpoint step {step} in {self.directory}')
    hint = models.router_layout_hint(set(want) - set(saved), set(saved) - set(want))
    if hint:
      raise ValueError(f'Checkpoint step {step} in {self.directory} does not fit the '
                       f'model.{hint}')

  def _check_seed(self, step: int, meta: dict):
    # Checkpoints written before the seed was stored have none: nothing to check.
    saved = meta.get('seed')
    if None not in (saved, self.seed) and saved != self.seed:
      raise ValueError(
          f'Checkpoint step {step} in {self.directory} was written with '
          f'config.seed={saved}, but this run has config.seed={self.seed}: the '
          f'data order and random numbers of a resumed run follow the seed. '
          f'Resume with --config.seed={saved}, or start the new seed in another '
          f'--workdir.')

  @property
  def _unreadable_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), 'checkpoints_unreadable')

  def _move_aside(self, steps: list[int]):
    if jax.process_index() == 0:
      os.makedirs(self._unreadable_dir, exist_ok=True)
      for step in steps:
        os.replace(os.path.join(self.directory, str(step)),
                   os.path.join(self._unreadable_dir, f'{step}-{time.time_ns()}'))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('TrainCheckpointer._move_aside')
    self._manager.reload()
    if self._last_saved in steps:
      self._last_saved = None

  def wait(self):
    """Blocks until the checkpoints being written are complete on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def latest_step(workdir: str) -> int | None:
  """The latest complete (finalized) checkpoint step of WORKDIR/checkpoints, read-only:
  for tools that read a workdir another process may be writing."""
  steps = ocp.utils.checkpoint_steps(os.path.join(os.path.abspath(workdir), 'checkpoints'))
  return max(steps) if steps else None


def read_error(e: BaseException) -> str:
  """The root cause of a failed restore, in one line (orbax wraps TensorStore's
  error, which names the array and the file or database, in one naming neither)."""
  while e.__cause__ or e.__context__:
    e = e.__cause__ or e.__context__
  first_line = (str(e).strip().splitlines() or [''])[0]
  return f'{type(e).__name__}: {first_line.split(" [tensorstore_spec=")[0][:500]}'


def params_metadata(directory: str) -> dict[str, jax.ShapeDtypeStruct]:
  """{'/'-joined param name: shape and dtype} of checkpoint `directory`
  (WORKDIR/checkpoints/<step>), from its metadata only (no array is read)."""
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(os.path.join(directory, 'state')).item_metadata.tree
  flat = traverse_util.flatten_dict(tree['params'], sep='/')
  return {n: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for n, m in flat.items()}


def load_step_params(directory: str, names=None) -> PyTree:
  """Params of checkpoint `directory` (WORKDIR/checkpoints/<step>) as numpy:
  all, or only the '/'-joined `names` (only their arrays are read)."""
  state = os.path.join(os.path.abspath(directory), 'state')
  if names is None:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(state)['params']
  specs = params_metadata(directory)
  item = {'params': traverse_util.unflatten_dict({n: specs[n] for n in names}, sep='/')}
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(state, args=ocp.args.PyTreeRestore(
        item=item, partial_restore=True, restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)))['params']
