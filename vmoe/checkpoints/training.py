"""Orbax checkpoints of the train state, in WORKDIR/checkpoints/<step>/.

Each checkpoint holds `state` (any pytree of jax.Arrays: step, params,
optimizer state) and `meta` (JSON: the step and whatever the trainer adds).
Saving is asynchronous: `save()` returns once the arrays are copied to host
memory, and the files are written in the background.

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
import tempfile
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

PyTree = Any


class TrainCheckpointer:
  """Saves every `every_steps` (and when forced), keeps the last `keep_last`."""

  def __init__(self, workdir: str, *, every_steps: int | None,
               keep_last: int | None = 1, asynchronous: bool = True):
    if every_steps is not None and every_steps <= 0:
      raise ValueError(f'save_checkpoint.every_steps must be > 0 or None, got '
                       f'{every_steps}.')
    if keep_last is not None and keep_last <= 0:
      raise ValueError(f'save_checkpoint.keep_last must be > 0 or None (keep '
                       f'all), got {keep_last}.')
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    check_writable(workdir, os.path.abspath(workdir), self.directory)
    self.every_steps = every_steps
    self._last_saved = None
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
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
            meta=ocp.args.JsonSave({'step': step, **(meta or {})})),
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
    lists each step's error.
    """
    errors = {}
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, _ = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # Orbax raises bare Exceptions.
        errors[step] = read_error(e)
        logging.warning('Checkpoint step %d in %s cannot be read, so it is not '
                        'used (trying the previous one): %s', step,
                        self.directory, errors[step])
        continue
      if errors:
        self._move_aside(sorted(errors))
        logging.warning('Resuming from step %d, the latest readable checkpoint; '
                        'unreadable steps %s moved to %s.', step, sorted(errors),
                        self._unreadable_dir)
      return step, state
    if errors:
      raise ValueError(
          f'No checkpoint in {self.directory} can be read: '
          + '; '.join(f'step {s}: {e}' for s, e in errors.items())
          + '. If the config changed since they were written, restore it; to '
          'start from scratch, move that directory away.')
    return None

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


def check_writable(workdir: str, *dirs: str):
  """Creates `dirs` and writes a file in each: a workdir that cannot be written
  fails at the start, not at the first checkpoint hours later."""
  for d in dirs:
    try:
      os.makedirs(d, exist_ok=True)
      tempfile.TemporaryFile(dir=d).close()
    except OSError as e:
      raise ValueError(f'--workdir={workdir!r} cannot be written ({d}: '
                       f'{e.strerror}); give a directory this process can '
                       f'create and write, or fix its permissions.') from None


def load_latest_params(workdir: str) -> tuple[int, PyTree]:
  """(step, params) of the latest complete checkpoint in WORKDIR/checkpoints,
  for tools that only need the weights (no train state or config needed)."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise ValueError(f'No complete checkpoint in {directory}; train first with '
                     f'python -m vmoe.main --workdir={workdir}.')
  try:
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  except Exception as e:  # pylint: disable=broad-except  # Orbax raises bare Exceptions.
    raise ValueError(f'Checkpoint step {step} in {directory} cannot be read: '
                     f'{read_error(e)}. Resuming the training with the same '
                     f'--workdir falls back to the previous step.') from None
  finally:
    manager.close()
  return step, state['params']


def read_error(e: BaseException) -> str:
  """The root cause of a failed restore, in one line (orbax wraps TensorStore's
  error, which names the array and the file or database, in one naming neither)."""
  while e.__cause__ or e.__context__:
    e = e.__cause__ or e.__context__
  first_line = (str(e).strip().splitlines() or [''])[0]
  return f'{type(e).__name__}: {first_line.split(" [tensorstore_spec=")[0][:500]}'


def load_step_params(step_dir: str) -> PyTree:
  """Params of one checkpoint directory, WORKDIR/checkpoints/<step>."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(os.path.abspath(step_dir), 'state'))['params']
