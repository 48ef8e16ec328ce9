"""Expected calibration error (ECE) with equal-width confidence bins.

The confidence of a prediction is the probability it gives its top class; ECE is the
mean over examples of |accuracy - confidence| taken per bin: sum_b n_b / N |acc_b -
conf_b|, 15 bins of [0, 1] (Guo et al. 2017; the E3 paper's). The sums per bin add up
over batches, devices and processes, so ECE is computed once over the whole split.
"""
import jax
import jax.numpy as jnp
import numpy as np

NUM_BINS = 15


def bin_sums(log_probs: jax.Array, correct: jax.Array, valid: jax.Array) -> jax.Array:
  """log_probs: [..., B, C], correct: [..., B] (1.0 where the top class is right), valid:
  [B] -> [..., 3, NUM_BINS]: examples, summed confidence and summed correct per bin."""
  confidence = jnp.exp(jnp.max(log_probs, axis=-1))
  b = jnp.clip(jnp.floor(confidence * NUM_BINS).astype(jnp.int32), 0, NUM_BINS - 1)
  onehot = jax.nn.one_hot(b, NUM_BINS) * valid[:, None]  # [..., B, NUM_BINS]
  return jnp.stack([jnp.sum(onehot, axis=-2),
                    jnp.einsum('...bn,...b->...n', onehot, confidence),
                    jnp.einsum('...bn,...b->...n', onehot, correct)], axis=-2)


def ece(sums: np.ndarray) -> np.ndarray:
  """[..., 3, NUM_BINS] bin sums (bin_sums, added up) -> [...] ECE."""
  sums = np.asarray(sums, np.float64)
  count, confidence, correct = sums[..., 0, :], sums[..., 1, :], sums[..., 2, :]
  return np.sum(np.abs(correct - confidence), axis=-1) / np.maximum(count.sum(-1), 1)
