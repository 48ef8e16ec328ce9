"""Pieces of the train loop: RNG streams, mixup, metric summaries, train steps."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe.configs import common
from vmoe.train import config as config_lib
from vmoe.train import mixup
from vmoe.train import monitors
from vmoe.train import step
from vmoe.train import train_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_rng_streams_depend_only_on_seed_name_and_step():
  a = train_state.rng_streams(0, 5, ['dropout', 'gating'])
  b = train_state.rng_streams(0, jnp.int32(5), ['gating', 'dropout'])
  np.testing.assert_array_equal(a['gating'], b['gating'])
  np.testing.assert_array_equal(a['dropout'], b['dropout'])
  keys = [train_state.rng_streams(0, 5, ['gating'])['gating'],
          train_state.rng_streams(0, 6, ['gating'])['gating'],
          train_state.rng_streams(1, 5, ['gating'])['gating'],
          a['dropout']]
  assert len({tuple(np.asarray(k).tolist()) for k in keys}) == 4


@pytest.mark.parametrize('granularity', mixup.GRANULARITIES)
def test_mixup_keeps_each_example_dominant(granularity):
  b, c = 8, 5
  images = jnp.arange(b, dtype=jnp.float32)[:, None, None, None] * jnp.ones((b, 2, 2, 3))
  labels = jax.nn.one_hot(jnp.arange(b) % c, c)
  x, y = mixup.mixup(jax.random.PRNGKey(0), images, labels, num_shards=2,
                     concentration=0.5, granularity=granularity)
  assert x.shape == images.shape and y.shape == labels.shape
  np.testing.assert_allclose(jnp.sum(y, axis=-1), 1.0, rtol=1e-6)
  # Example i is mixed with the next one (i+1), cyclic per shard (half) with 'device',
  # over the whole batch otherwise; it keeps the larger weight.
  partner = np.array([1, 2, 3, 0, 5, 6, 7, 4] if granularity == 'device' else
                     [1, 2, 3, 4, 5, 6, 7, 0])
  w = np.asarray(x[:, 0, 0, 0]) - partner
  w = w / (np.arange(b) - partner)  # x = w * i + (1 - w) * partner.
  assert np.all(w >= 0.5 - 1e-5) and np.all(w <= 1 + 1e-5)
  if granularity == 'batch':
    np.testing.assert_allclose(w, w[0], rtol=1e-5)
  if granularity != 'device':  # The mesh does not matter.
    x1, y1 = mixup.mixup(jax.random.PRNGKey(0), images, labels, num_shards=1,
                         concentration=0.5, granularity=granularity)
    np.testing.assert_array_equal(x1, x)
    np.testing.assert_array_equal(y1, y)


def test_mixup_rejects_bad_options():
  with pytest.raises(ValueError, match='mixup.granularity'):
    mixup.check_config(0.2, granularity='pixel')
  with pytest.raises(ValueError, match='mixup.concentration'):
    mixup.check_config(0.0)


def test_summarize_metrics():
  metrics = {'auxiliary_loss': jnp.array([1.0, 3.0]),
             'encoderblock_1': {'importance_loss': jnp.array([2.0, 4.0]),
                                'expert_load': jnp.array([[0.1, 0.9], [0.3, 0.7]])}}
  out = {k: float(v) for k, v in step.summarize_metrics(metrics).items()}
  assert out == pytest.approx({'auxiliary_loss': 2.0,
                               'encoderblock_1/importance_loss': 3.0,
                               'encoderblock_1/expert_load_max': 0.8})


def test_metrics_window_averages_and_keeps_last_learning_rate():
  window = monitors.MetricsWindow()
  assert not window
  for i in range(3):
    window.add({'loss': jnp.float32(i), 'learning_rate': jnp.float32(10 * i)})
  assert window.pop(last={'learning_rate': jnp.float32(20)}) == {
      'loss': 1.0, 'learning_rate': 20.0}
  assert not window


def test_train_steps_from_epochs_rounds_up(digits_data_dir, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', digits_data_dir)
  config = common.load_config(os.path.join(REPO, 'configs', 'digits.py')).to_dict()
  config.update(train_steps=None, train_epochs=2)
  config['optimizer']['learning_rate']['warmup_steps'] = 10
  run = config_lib.resolve(config)
  assert run.train_steps is None  # Not known before the dataset's size.
  assert config_lib.with_data(run).train_steps == 23  # 2 x 1437 / 128 = 22.45.
