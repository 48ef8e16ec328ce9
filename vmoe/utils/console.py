"""What a person reads on the terminal: one progress line, and the lines that matter.

Everything is also logged (absl, INFO), so the log file (vmoe.cli) has the full story;
the terminal gets only these lines, the warnings and the errors. Multi-process runs
print from process 0 only.

On a terminal the progress line is a tqdm bar rewritten in place; anywhere else (a file,
a pipe, CI) it is one plain line per report, so that logs stay readable.
"""
import sys
import time

from absl import logging
import tqdm

_FORMAT = '{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]'


def _shown() -> bool:
  import jax  # pylint: disable=g-import-not-at-top  # Tools that never start JAX need not.
  return jax.process_index() == 0


def say(line: str):
  """Logs `line` and prints it to stdout (above a progress bar, if one is shown)."""
  logging.info('%s', line)
  if _shown():
    tqdm.tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


class Progress:
  """Progress of a loop over `total` steps, resumed at `initial`: steps done, steps/s,
  ETA and the latest reported values (e.g. the train loss)."""

  def __init__(self, total: int, *, initial: int = 0, desc: str = 'train',
               unit: str = 'step', stream=None):
    self._stream = stream or sys.stderr
    self._live = _shown() and self._stream.isatty()
    self._desc, self._unit, self._total, self._initial = desc, unit, total, initial
    self._n, self._start, self._postfix = initial, time.perf_counter(), ''
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit,
                          file=self._stream, dynamic_ncols=True, mininterval=0.5,
                          disable=not self._live, leave=True)

  def advance(self, n: int = 1):
    """n more steps done (cheap: no device sync, the bar redraws at most twice a second)."""
    self._n += n
    self._bar.update(n)

  def report(self, **values: float):
    """Shows `values` next to the counts: on a terminal in the bar, else in a new line
    (also logged)."""
    self._postfix = ', '.join(f'{k}={v:.4g}' for k, v in values.items())
    self._bar.set_postfix_str(self._postfix, refresh=True)
    line = tqdm.tqdm.format_meter(
        self._n, self._total, time.perf_counter() - self._start, prefix=self._desc,
        unit=self._unit, postfix=self._postfix or None, initial=self._initial,
        bar_format=_FORMAT)
    logging.info('%s', line)
    if _shown() and not self._live:
      print(line, file=self._stream, flush=True)

  def close(self):
    self._bar.close()
