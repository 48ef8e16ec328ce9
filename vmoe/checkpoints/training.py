"""Orbax checkpoints of the train state, in WORKDIR/checkpoints/<step>/.

Each checkpoint holds `state` (any pytree of jax.Arrays: step, params,
optimizer state) and `meta` (JSON: the step and whatever the trainer adds).
Saving is asynchronous: `save()` returns once the arrays are copied to host
memory, and the files are written in the background.

A half-written checkpoint is never loaded: orbax writes each step into
`<step>.orbax-checkpoint-tmp-<id>/` and renames it to `<step>/` only once every
file is complete (the rename is atomic on a local file system); the step list
ignores the temporary names, and `cleanup_tmp_directories` deletes the ones a
crash left behind.
"""
import os
from typing import Any

from absl import logging
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

  def wait(self):
    """Blocks until the checkpoints being written are complete on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()



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
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state
  manager.close()
  return step, state['params']


def load_step_params(step_dir: str) -> PyTree:
  """Params of one checkpoint directory, WORKDIR/checkpoints/<step>."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(os.path.abspath(step_dir), 'state'))['params']
