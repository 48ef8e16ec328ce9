"""Classification losses (config.loss.name) and precision@1.

All take logits: [B, C] and labels: [B, C] (one-hot, multi-hot or mixed-up)
and return one value per example: [B].
"""
import jax
import jax.numpy as jnp
import optax


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  # Summed over classes (not averaged) so that it is on the scale of the
  # softmax loss and of the auxiliary MoE losses it is added to.
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


LOSSES = {'softmax_xent': softmax_xent, 'sigmoid_xent': sigmoid_xent}


def precision_at_1(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the top-scoring class is a positive label, else 0.0: [B]."""
  top1 = jnp.argmax(logits, axis=-1)
  return (jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
          ).astype(jnp.float32)
