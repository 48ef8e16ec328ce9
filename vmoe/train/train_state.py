"""The train state (step, params, optimizer state) and its random numbers.

Random numbers are not part of the state: the key of stream `name` at step `t`
is a pure function of (seed, name, t). A run resumed from a checkpoint at step
t therefore draws exactly the numbers an uninterrupted run draws.
"""
import zlib
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: number of updates applied so far.
  params: PyTree
  opt_state: optax.OptState


def rng_streams(seed: int, step: jax.Array | int,
                names: Sequence[str]) -> dict[str, jax.Array]:
  """One PRNG key per stream name, for the given step."""
  base = jax.random.PRNGKey(seed)
  # crc32 (not hash()) so that a stream's id is the same in every process.
  return {name: jax.random.fold_in(
      jax.random.fold_in(base, zlib.crc32(name.encode()) & 0x7FFFFFFF), step)
          for name in names}


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, *,
                 image_shape: Sequence[int], seed: int):
  """Returns init() -> TrainState, for the model's inputs of `image_shape`.

  Args:
    model: the flax module.
    tx: the optimizer.
    image_shape: [B, H, W, 3] of one (global) batch: the MoE groups depend on B.
    seed: the run's seed; params use the stream 'params'.
  """
  def init() -> TrainState:
    images = jnp.zeros(image_shape, jnp.float32)
    params = model.init(rng_streams(seed, 0, ['params']), images,
                        train=False)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params))
  return init
