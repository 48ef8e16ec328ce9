"""Losses and precision@1."""
import jax.numpy as jnp
import numpy as np
import optax
from vmoe.train import losses


def test_softmax_xent_matches_optax():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  labels = jnp.asarray(np.eye(7)[[0, 3, 6, 2, 2]], jnp.float32)
  np.testing.assert_allclose(losses.softmax_xent(logits, labels),
                             optax.softmax_cross_entropy(logits, labels), rtol=1e-6)


def test_sigmoid_xent_sums_over_classes():
  logits = jnp.array([[0.0, 0.0], [2.0, -2.0]])
  labels = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  log2 = np.log(2.0)
  sp = lambda x: np.log1p(np.exp(x))  # softplus
  np.testing.assert_allclose(losses.sigmoid_xent(logits, labels),
                             [2 * log2, sp(-2.0) + sp(2.0)], rtol=1e-6)


def test_precision_at_1_counts_any_positive_label():
  logits = jnp.array([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 1.0]])
  labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
  np.testing.assert_array_equal(losses.precision_at_1(logits, labels), [1, 0, 1])
