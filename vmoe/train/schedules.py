"""Learning-rate schedules, chosen by name.

A schedule maps the step (the number of updates done so far, starting at 0) to a
learning rate. Config: `optimizer.learning_rate = {schedule: NAME, **kwargs}`,
or a plain float for a constant rate. `decay_steps` defaults to the total
number of training steps.
"""
import math
from typing import Any, Callable, Mapping

import jax.numpy as jnp
from vmoe.utils import checks

Schedule = Callable[[Any], Any]


def constant(*, value: float) -> Schedule:
  return lambda step: jnp.full((), value, jnp.float32)


def _with_warmup(peak_value: float, warmup_steps: int,
                 decay_fn: Schedule) -> Schedule:
  """Linear warmup from 0 to `peak_value`, then `decay_fn(step - warmup)`."""
  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = peak_value * t / max(warmup_steps, 1)
    return jnp.where(t < warmup_steps, warm, decay_fn(t - warmup_steps))
  return schedule


def _decay_fraction(t, length: int):
  """Fraction of the decay phase done: [0, 1]."""
  return jnp.clip(t / max(length, 1), 0.0, 1.0)


def warmup_polynomial_decay(*, peak_value: float, warmup_steps: int,
                            decay_steps: int, end_value: float = 0.0,
                            power: float = 1.0) -> Schedule:
  _check_warmup(warmup_steps, decay_steps)
  def decay(t):
    f = _decay_fraction(t, decay_steps - warmup_steps)
    return end_value + (peak_value - end_value) * (1.0 - f) ** power
  return _with_warmup(peak_value, warmup_steps, decay)


def warmup_linear_decay(*, peak_value: float, warmup_steps: int,
                        decay_steps: int, end_value: float = 0.0) -> Schedule:
  return warmup_polynomial_decay(
      peak_value=peak_value, warmup_steps=warmup_steps,
      decay_steps=decay_steps, end_value=end_value, power=1.0)


def warmup_cosine_decay(*, peak_value: float, warmup_steps: int,
                        decay_steps: int, end_value: float = 0.0) -> Schedule:
  _check_warmup(warmup_steps, decay_steps)
  def decay(t):
    f = _decay_fraction(t, decay_steps - warmup_steps)
    return end_value + (peak_value - end_value) * 0.5 * (1 + jnp.cos(math.pi * f))
  return _with_warmup(peak_value, warmup_steps, decay)


def big_vision_rsqrt(*, peak_value: float, decay_steps: int, timescale: int,
                     warmup_steps: int = 0, cooldown_steps: int = 0) -> Schedule:
  """Warmup, then peak / sqrt(1 + t / timescale), then a linear cooldown to 0.

  The cooldown lets a run be extended: restart from a checkpoint taken before
  the cooldown with a larger decay_steps (arXiv 2106.04560).
  """
  _check_warmup(warmup_steps + cooldown_steps, decay_steps)
  if timescale <= 0:
    raise ValueError(f'big_vision_rsqrt: timescale must be > 0, got {timescale}.')
  cooldown_start = decay_steps - cooldown_steps - warmup_steps
  lr_at_cooldown = peak_value / math.sqrt(1 + cooldown_start / timescale)
  def decay(t):
    rsqrt = peak_value / jnp.sqrt(1 + t / timescale)
    frac = _decay_fraction(t - cooldown_start, cooldown_steps)
    return jnp.where(t < cooldown_start, rsqrt, lr_at_cooldown * (1 - frac))
  return _with_warmup(peak_value, warmup_steps, decay)


def _check_warmup(warmup_steps: int, decay_steps: int):
  if not 0 <= warmup_steps <= decay_steps:
    raise ValueError(
        f'Learning-rate schedule needs 0 <= warmup_steps (+ cooldown_steps) <= '
        f'decay_steps, got {warmup_steps} and decay_steps={decay_steps}; '
        f'lower warmup_steps or raise decay_steps / the number of train steps.')


SCHEDULES = {
    'constant': constant,
    'warmup_linear_decay': warmup_linear_decay,
    'warmup_polynomial_decay': warmup_polynomial_decay,
    'warmup_cosine_decay': warmup_cosine_decay,
    'big_vision_rsqrt': big_vision_rsqrt,
}


def create_schedule(config: float | Mapping[str, Any], *,
                    total_steps: int) -> Schedule:
  """Returns the schedule described by `config` (a float or a mapping)."""
  if isinstance(config, (int, float)):
    return constant(value=float(config))
  kwargs = dict(config)
  name = kwargs.pop('schedule', None)
  fn = SCHEDULES[checks.one_of(name, sorted(SCHEDULES), 'optimizer.learning_rate.schedule')]
  if 'decay_steps' in checks.signature_keys(fn)[0] and kwargs.get('decay_steps') is None:
    kwargs['decay_steps'] = total_steps
  checks.check_kwargs(fn, kwargs, what=f'learning-rate schedule {name!r}')
  return fn(**kwargs)
