"""Matmul precision policy: 'float32', or 'bfloat16' inputs with float32 accumulation.

Params and everything outside the matmuls (activations between layers, LayerNorm, softmax,
GELU, residuals) stay float32; with 'bfloat16' each matmul rounds its two inputs to
bfloat16 and accumulates in float32 (`preferred_element_type`), forward and backward, and
returns float32. Gradients come back float32 too (not rounded to bfloat16, as JAX's own
transpose of a mixed-precision dot would do).

Why not plain bfloat16 (bfloat16 output)? On XLA:CPU only bf16 x bf16 -> f32 dots reach the
AMX kernels (YNNPACK); a bf16 -> bf16 dot, or one with a float32 operand, is computed in
float32 and runs no faster than float32 (measured in docs/performance.md). GPUs and TPUs
accumulate bfloat16 matmuls in float32 anyway.
"""
import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
COMPUTE_DTYPES = ('float32', 'bfloat16')
_BF16, _F32 = jnp.bfloat16, jnp.float32


def check(compute_dtype: str, where: str = 'compute_dtype') -> str:
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'{where}={compute_dtype!r} is not a valid precision; use one of '
                     f'{COMPUTE_DTYPES}.')
  return compute_dtype


def dot(x: Array, w: Array, compute_dtype: str = 'float32') -> Array:
  """x: [..., K] @ w: [K, N] -> [..., N], or batched x: [B, M, K] @ w: [B, K, N] -> [B, M, N]."""
  nb = w.ndim - 2  # Leading batch axes shared by x and w (0 or 1).
  if check(compute_dtype) == 'float32':
    batch = (tuple(range(nb)),) * 2
    return lax.dot_general(x, w, (((x.ndim - 1,), (nb,)), batch))
  if nb:
    return _bf16_matmul(x.astype(_F32), w.astype(_F32))
  lead, k = x.shape[:-1], x.shape[-1]
  y = _bf16_matmul(x.reshape(-1, k).astype(_F32), w.astype(_F32))
  return y.reshape(*lead, w.shape[-1])


def dot_general(compute_dtype: str):
  """A `dot_general` for flax's Dense / DenseGeneral / attention projections."""
  return lax.dot_general if check(compute_dtype) == 'float32' else _bf16_dot_general


def ragged_dot(x: Array, w: Array, group_sizes: Array, compute_dtype: str = 'float32'
               ) -> Array:
  """Rows sorted by group x: [N, K] @ w: [E, K, M] of their group -> [N, M].

  group_sizes: [E] int32, rows per group; rows past sum(group_sizes) come out 0.
  """
  if check(compute_dtype) == 'float32':
    return lax.ragged_dot(x, w, group_sizes)
  return _bf16_ragged_dot(x.astype(_F32), w.astype(_F32), group_sizes)


def _bf16_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None):
  """lax.dot_general's signature; contracts trailing axes of lhs with leading ones of rhs."""
  del precision, preferred_element_type  # Always bf16 inputs, float32 accumulation.
  (lc, rc), (lb, rb) = dimension_numbers
  n = len(lc)
  if lb or rb or tuple(lc) != tuple(range(lhs.ndim - n, lhs.ndim)) or tuple(rc) != tuple(
      range(n)):
    raise ValueError(f'bfloat16 dot_general supports trailing-by-leading contractions '
                     f'without batch axes (Dense layers), got {dimension_numbers}.')
  k = math.prod(rhs.shape[:n])
  y = _bf16_matmul(lhs.reshape(-1, k).astype(_F32), rhs.reshape(k, -1).astype(_F32))
  return y.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])


def _mm(a: Array, b: Array, contract_b: int = -2) -> Array:
  """[(B,) M, K] x [(B,) K, N] (or [(B,) N, K] with contract_b=-1) -> f32 [(B,) M, N]."""
  nb = a.ndim - 2
  return lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim + contract_b,)),
                                (tuple(range(nb)),) * 2), preferred_element_type=_F32)


def _transpose_minor(a: Array) -> Array:
  """[..., M, K] -> [..., K, M], materialised in row-major layout.

  XLA:CPU gives a bf16 dot to its AMX kernels only if the lhs contracts its minor axis in
  row-major layout. A plain transpose gets folded into the dot (lhs contracting its major
  axis), which XLA:CPU then computes in float32, ~3x slower. Going through a size-1 axis
  makes XLA write the transposed copy instead (a memory-bound pass over a bf16 array).
  """
  *b, m, k = a.shape
  return jnp.moveaxis(a[..., None], -3, -1).reshape(*b, k, m)


@jax.custom_vjp
def _bf16_matmul(x: Array, w: Array) -> Array:
  """float32 x: [(B,) M, K], w: [(B,) K, N] -> float32 [(B,) M, N] via bf16 inputs."""
  return _mm(x.astype(_BF16), w.astype(_BF16))


def _bf16_matmul_fwd(x, w):
  xb, wb = x.astype(_BF16), w.astype(_BF16)
  return _mm(xb, wb), (xb, wb)


def _bf16_matmul_bwd(res, g):
  xb, wb = res
  gb = g.astype(_BF16)
  dx = _mm(gb, wb, contract_b=-1)  # [M, N] x [K, N] -> [M, K]
  dw = _mm(_transpose_minor(xb), gb)  # [K, M] x [M, N] -> [K, N]
  return dx, dw


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


@jax.custom_vjp
def _bf16_ragged_dot(x: Array, w: Array, group_sizes: Array) -> Array:
  return lax.ragged_dot(x.astype(_BF16), w.astype(_BF16), group_sizes,
                        preferred_element_type=_F32)


def _bf16_ragged_dot_fwd(x, w, group_sizes):
  xb, wb = x.astype(_BF16), w.astype(_BF16)
  y = lax.ragged_dot(xb, wb, group_sizes, preferred_element_type=_F32)
  return y, (xb, wb, group_sizes)


def _bf16_ragged_dot_bwd(res, g):
  xb, wb, group_sizes = res
  gb = g.astype(_BF16)
  dx = lax.ragged_dot(gb, jnp.swapaxes(wb, 1, 2), group_sizes, preferred_element_type=_F32)
  # [N, K] x [N, M] contracted over the ragged rows -> one [K, M] per group.
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=(0,),
      rhs_group_dimensions=())
  dw = lax.ragged_dot_general(xb, gb, group_sizes, dims, preferred_element_type=_F32)
  return dx, dw, None


_bf16_ragged_dot.defvjp(_bf16_ragged_dot_fwd, _bf16_ragged_dot_bwd)
