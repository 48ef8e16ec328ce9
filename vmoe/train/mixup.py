"""Mixup (arXiv 1710.09412) of images and labels inside the train step.

    config.mixup = {concentration: float > 0, size: int >= 2 (default 2),
                    granularity: 'batch' | 'device' (default) | 'example'}

Each output example is sum_i alpha_i * example_{b+i}, alpha ~
Dirichlet(concentration), with the largest weight on the example itself so that
no example is lost from the batch. 'device' (the reference's default): one alpha
per shard of the batch (device), b+i taken cyclically within the shard, so
mixing needs no communication, but the result depends on the number of devices.
'batch' (one alpha for the batch) and 'example' (one per example) take b+i
cyclically over the whole batch: the same mixed batch on any mesh (a shard
sends size-1 examples to its neighbour), so a run on 8 devices follows the run
on 1 device.
"""
import jax
import jax.numpy as jnp
from vmoe.utils import checks

GRANULARITIES = ('batch', 'device', 'example')


def check_config(concentration: float, size: int = 2,
                 granularity: str = 'device'):
  if not concentration > 0:
    raise ValueError(f'mixup.concentration must be > 0, got {concentration!r}; '
                     f'remove config.mixup to train without mixup.')
  if not isinstance(size, int) or size < 2:
    raise ValueError(f'mixup.size must be an integer >= 2, got {size!r}.')
  checks.one_of(granularity, GRANULARITIES, 'mixup.granularity')


def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, *,
          num_shards: int, concentration: float, size: int = 2,
          granularity: str = 'device') -> tuple[jax.Array, jax.Array]:
  """images: [B, H, W, 3], labels: [B, C] -> mixed, same shapes.

  num_shards: how many shards the batch axis is split into (devices); only
    granularity 'device' depends on it.
  """
  check_config(concentration, size, granularity)
  b = images.shape[0]
  s = num_shards if granularity == 'device' else 1
  alpha_shape = {'batch': (1, 1, size), 'device': (s, 1, size),
                 'example': (s, b // s, size)}[granularity]
  alpha = jax.random.dirichlet(rng, jnp.full(alpha_shape, concentration))
  alpha = -jnp.sort(-alpha, axis=-1)  # [S, 1 or B/S, size], largest first.

  def mix(x):  # [B, ...] -> [S, B/S, ...], mixed along axis 1.
    x = x.reshape((s, b // s) + x.shape[1:])
    a = alpha.reshape(alpha.shape + (1,) * (x.ndim - 2)).astype(x.dtype)
    y = sum(a[:, :, i] * jnp.roll(x, -i, axis=1) for i in range(size))
    return y.reshape((b,) + x.shape[2:])

  return mix(images), mix(labels)
