"""Learning-rate schedules: values at given steps, and bad configs."""
import math

import numpy as np
import pytest
from vmoe.train import schedules


def values(config, steps, total_steps=100):
  fn = schedules.create_schedule(config, total_steps=total_steps)
  return np.array([float(fn(s)) for s in steps])


def test_constant():
  np.testing.assert_allclose(values(0.1, [0, 50, 1000]), [0.1] * 3, rtol=1e-6)


def test_warmup_linear_decay():
  cfg = dict(schedule='warmup_linear_decay', peak_value=1.0, end_value=0.1,
             warmup_steps=10)
  # decay_steps defaults to the 100 train steps: linear from 1.0 at step 10
  # to 0.1 at step 100, constant after.
  np.testing.assert_allclose(
      values(cfg, [0, 5, 10, 55, 100, 150]),
      [0.0, 0.5, 1.0, 1.0 - 0.9 * 45 / 90, 0.1, 0.1], rtol=1e-6, atol=1e-7)


def test_warmup_cosine_decay():
  cfg = dict(schedule='warmup_cosine_decay', peak_value=2.0, warmup_steps=4,
             decay_steps=24)
  expected = [0.0, 1.0, 2.0, 1.0 + math.cos(math.pi * 5 / 20), 1.0, 0.0, 0.0]
  np.testing.assert_allclose(values(cfg, [0, 2, 4, 9, 14, 24, 30]), expected,
                             rtol=1e-5, atol=1e-6)


def test_warmup_polynomial_decay():
  cfg = dict(schedule='warmup_polynomial_decay', peak_value=1.0, warmup_steps=0,
             decay_steps=10, end_value=0.0, power=2.0)
  np.testing.assert_allclose(values(cfg, [0, 5, 10]), [1.0, 0.25, 0.0],
                             atol=1e-7)


def test_big_vision_rsqrt():
  cfg = dict(schedule='big_vision_rsqrt', peak_value=1.0, warmup_steps=10,
             timescale=10, cooldown_steps=20, decay_steps=100)
  at_cooldown = 1.0 / math.sqrt(1 + 70 / 10)
  np.testing.assert_allclose(
      values(cfg, [5, 10, 20, 80, 90, 100]),
      [0.5, 1.0, 1 / math.sqrt(2), at_cooldown, at_cooldown / 2, 0.0],
      rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('config, match', [
    (dict(schedule='nope', peak_value=1.0), "optimizer.learning_rate.schedule='nope' is unknown"),
    (dict(schedule='warmup_cosine_decay', peak_value=1.0, warmup_steps=1,
          peak=2.0), r"Unknown key\(s\) \['peak'\].*valid keys"),
    (dict(schedule='warmup_cosine_decay', warmup_steps=1),
     r"Missing key\(s\) \['peak_value'\]"),
    (dict(schedule='warmup_linear_decay', peak_value=1.0, warmup_steps=200),
     'warmup_steps'),
])
def test_bad_schedule_config(config, match):
  with pytest.raises(ValueError, match=match):
    schedules.create_schedule(config, total_steps=100)
