"""Where a checkpoint's params are, for everything that only reads them (inference,
evaluation, export, fine-tuning): a released legacy prefix (PREFIX.index +
PREFIX.data-NNNNN-of-NNNNN, as Google released V-MoE), one of our checkpoint directories
(WORKDIR/checkpoints/<step>), or a WORKDIR (its latest complete checkpoint)."""
import os
from typing import Any

from vmoe.checkpoints import legacy
from vmoe.checkpoints import training


def locate(path: str) -> tuple[str, str]:
  """('legacy', prefix) or ('orbax', WORKDIR/checkpoints/<step>) of `path`."""
  if os.path.exists(path + '.index'):
    return 'legacy', path
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'state')):
    return 'orbax', path
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    step = training.latest_step(path)
    if step is None:
      raise ValueError(f'No complete checkpoint in {path}/checkpoints; train first with '
                       f'python -m vmoe.main --workdir={path}.')
    return 'orbax', os.path.join(path, 'checkpoints', str(step))
  raise ValueError(f'No checkpoint at {path!r}: expected a legacy prefix with '
                   f'{path}.index next to its {path}.data-NNNNN-of-NNNNN files, a checkpoint '
                   'directory WORKDIR/checkpoints/<step>, or a WORKDIR.')


def load_params(path: str) -> tuple[str, Any]:
  """(where they were read, params as numpy) of the checkpoint at `path` (see `locate`).
  A latest checkpoint that cannot be read is an error, never a silent fallback."""
  kind, where = locate(path)
  if kind == 'legacy':
    return where, legacy.restore(where)
  try:
    return where, training.load_step_params(where)
  except Exception as e:  # pylint: disable=broad-except  # Orbax raises bare Exceptions.
    step, directory = os.path.basename(where), os.path.dirname(where)
    raise ValueError(f'Checkpoint step {step} in {directory} cannot be read: '
                     f'{training.read_error(e)}. Resuming the training with the same '
                     '--workdir falls back to the previous step.') from None
