"""Device meshes and global batches.

The data mesh is 1-D over all devices with one axis 'data': params replicated,
batches sharded over 'data'. Its axis type is Auto: the model code is
sharding-agnostic (its group reshapes and einsums carry no sharding
annotations), and with Auto the compiler propagates the batch sharding through
them, where Explicit would demand an out_sharding at every reshape that touches
the batch axis.
"""
from typing import Mapping

import jax
import numpy as np


def make_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def global_batch(local: Mapping[str, np.ndarray], sharding) -> dict:
  """This process's rows -> global jax arrays sharded over 'data'."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}
