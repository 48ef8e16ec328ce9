"""What watches the train loop without slowing it: metric averages, non-finite steps and
the time per step, all kept on the device between reports."""
import contextlib
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
from vmoe.checkpoints import training as checkpoints


class MetricsWindow:
  """Averages the train metrics of the steps since the last report (counts
  such as 'nonfinite_steps' are summed instead).

  Sums stay on the device, so that no step waits for the previous one.
  """
  COUNTS = ('nonfinite_steps',)

  def __init__(self):
    self._sums, self._n = None, 0
    self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

  def add(self, metrics):
    self._sums = metrics if self._sums is None else self._add(self._sums, metrics)
    self._n += 1

  def __bool__(self) -> bool:
    return self._n > 0

  def pop(self, *, last: Mapping[str, Any]) -> dict[str, float]:
    means = {k: float(v) / (1 if k in self.COUNTS else self._n)
             for k, v in jax.device_get(self._sums).items()}
    means['learning_rate'] = float(last['learning_rate'])  # Not an average.
    self._sums, self._n = None, 0
    return means


class NonFiniteError(FloatingPointError):
  """A train step was not finite and config.nonfinite is 'stop'."""


class NonfiniteGuard:
  """Finds the steps whose update was not applied (a NaN/Inf loss, gradient
  norm or updated state) and acts on config.nonfinite: 'stop' raises
  NonFiniteError, 'skip' logs them.

  The first such step and their count stay on the device; `check` reads them,
  at progress reports and before checkpoint saves only, so that training
  never waits for the host in between.
  """

  def __init__(self, mode: str, ckpt: checkpoints.TrainCheckpointer, on_stop):
    self._stop, self._ckpt, self._on_stop = mode == 'stop', ckpt, on_stop
    self._first_and_count = jnp.zeros((2,), jnp.int32)
    self._logged = 0
    self._update = jax.jit(lambda fc, bad, step: jnp.stack([
        jnp.where((fc[0] == 0) & (bad > 0), step, fc[0]), fc[1] + (bad > 0)]))

  def add(self, step: int, metrics):
    self._first_and_count = self._update(self._first_and_count,
                                         metrics['nonfinite_steps'], step)

  def check(self, step: int):
    first, count = (int(x) for x in jax.device_get(self._first_and_count))
    if not count or count == self._logged:
      return
    if not self._stop:
      logging.warning('Step %d: %d step(s) of this run skipped for a NaN/Inf loss, '
                      'gradient norm or update, the first at step %d '
                      '(config.nonfinite="skip").', step, count, first)
      self._logged = count
      return
    self._ckpt.wait()
    good = self._ckpt.latest_step()
    self._ckpt.close()
    self._on_stop()
    raise NonFiniteError(
        f'Training stopped: step {first} gave a NaN or Inf loss, gradient norm '
        f'or update, so its update was not applied (config.nonfinite="stop"; '
        f'{count} such step(s) up to step {step}). '
        + (f'The last good checkpoint is step {good}: '
           f'{os.path.join(self._ckpt.directory, str(good))}; a restart resumes '
           'from it (and fails again with the same config). ' if good else
           'No checkpoint was saved before it. ')
        + 'Lower the learning rate (config.optimizer.learning_rate), clip the '
        'gradients (config.optimizer.gradient_clip.global_norm), or set '
        'config.nonfinite="skip" to skip such steps.')


class StepTimer:
  """Seconds per train step of this run, without the first step (compilation)
  and without the time spent checkpointing and evaluating."""

  def __init__(self):
    self._start, self._steps, self._excluded = None, 0, 0.0

  def step_done(self, steps_this_run: int, metrics):
    if steps_this_run == 1:
      jax.block_until_ready(metrics)
      self._start = time.perf_counter()
    self._steps = steps_this_run

  @contextlib.contextmanager
  def excluded(self):
    t = time.perf_counter()
    yield
    self._excluded += time.perf_counter() - t

  def seconds_per_step(self, state) -> float | None:
    if self._steps < 2:
      return None
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - self._start - self._excluded
    logging.info('Trained %d steps at %.1f ms per step.', self._steps,
                 1e3 * elapsed / (self._steps - 1))
    return elapsed / (self._steps - 1)


