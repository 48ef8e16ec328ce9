"""The bfloat16 policy: bf16 inputs, float32 accumulation, float32 gradients."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax

from vmoe.nn import mlp
from vmoe.nn import models
from vmoe.nn import moe
from vmoe.nn import precision

pytestmark = pytest.mark.xla_defaults

# Documented in docs/performance.md: with compute_dtype='bfloat16' a layer's output is
# within this relative (Frobenius) error of float32 (each matmul input is rounded to 8
# significant bits; the sums stay float32).
REL_TOL = 1e-2

_key = lambda i: jax.random.PRNGKey(i)
X = jax.random.normal(_key(0), (6, 5, 32))
W = jax.random.normal(_key(1), (32, 24))
G = jax.random.normal(_key(2), (6, 5, 24))
_bf16 = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # Rounded, held in float32.
_hi = lambda a, b, dims: lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_check_names_the_bad_value():
  with pytest.raises(ValueError, match=r"model.encoder.compute_dtype='float16'.*'bfloat16'"):
    precision.check('float16', 'model.encoder.compute_dtype')


def test_bfloat16_dot_and_its_gradients_are_float32_sums_of_rounded_inputs():
  def f(x, w, dtype):
    y = precision.dot(x, w, dtype)
    return jnp.sum(y * G), y
  (_, y), (dx, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True),
                             static_argnums=2)(X, W, 'bfloat16')
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  xb, wb, gb = _bf16(X), _bf16(W), _bf16(G)
  # The same products, summed in float32: equal up to summation order.
  np.testing.assert_allclose(y, _hi(xb, wb, (((2,), (0,)), ((), ()))), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, _hi(gb, wb, (((2,), (1,)), ((), ()))), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, _hi(xb, gb, (((0, 1), (0, 1)), ((), ()))), rtol=1e-5,
                             atol=1e-4)
  (_, y32), (dx32, dw32) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True),
                                   static_argnums=2)(X, W, 'float32')
  for a, b in ((y, y32), (dx, dx32), (dw, dw32)):
    assert 0 < _rel(a, b) < REL_TOL


def test_batched_dot_matches_per_batch_dot():
  x, w = X[:2], jax.random.normal(_key(3), (2, 32, 24))
  y = jax.jit(precision.dot, static_argnums=2)(x, w, 'bfloat16')
  for i in range(2):
    np.testing.assert_allclose(y[i], precision.dot(x[i], w[i], 'bfloat16'), rtol=1e-6,
                               atol=1e-6)


def test_bfloat16_ragged_dot_and_its_gradients_match_per_group_dots():
  sizes = jnp.array([3, 0, 5, 2], jnp.int32)  # 10 of 12 rows belong to a group.
  x, w = jax.random.normal(_key(4), (12, 16)), jax.random.normal(_key(5), (4, 16, 8))
  g = jax.random.normal(_key(6), (12, 8)).at[10:].set(0)  # Rows past the groups unused.

  def f(x, w):
    return jnp.sum(precision.ragged_dot(x, w, sizes, 'bfloat16') * g)
  dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
  # Reference: rows of expert e times w[e], on rounded inputs.
  expert = np.repeat(np.arange(4), np.asarray(sizes))
  xb, wb, gb = _bf16(x)[:10], _bf16(w), _bf16(g)[:10]
  np.testing.assert_allclose(dx[:10], jnp.einsum('nm,nkm->nk', gb, wb[expert]), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(dx[10:], 0)
  dw_ref = jnp.stack([xb[expert == e].T @ gb[expert == e] for e in range(4)])
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
  assert dx.dtype == dw.dtype == jnp.float32


def test_dot_general_rejects_batch_axes():
  dims = (((2,), (2,)), ((0,), (0,)))
  with pytest.raises(ValueError, match='trailing-by-leading'):
    precision.dot_general('bfloat16')(X, X, dims)


def test_mlp_block_bfloat16_within_tolerance_of_float32():
  block = lambda dt: mlp.MlpBlock(mlp_dim=64, compute_dtype=dt)
  params = block('float32').init(_key(7), X, train=False)
  y32, y16 = (jax.jit(lambda p, b=block(dt): b.apply(p, X, train=False))(params)
              for dt in ('float32', 'bfloat16'))
  assert y16.dtype == jnp.float32 and 0 < _rel(y16, y32) < REL_TOL


@pytest.fixture(scope='module')
def moe_runs():
  """kind -> dtype -> (output, grads w.r.t. params and x) of one MoE layer."""
  x = jax.random.normal(_key(8), (4, 6, 16))
  layer = lambda kind, dt: moe.MoeLayer(models.resolve_moe(
      dict(layers=(0,), num_experts=4, group_size=12, split_rngs=True,
           router={'num_selected_experts': 2,
                   'dispatcher': {'name': kind, 'capacity_factor': 1.0}}),
      tokens_per_image=6), mlp_dim=32, compute_dtype=dt)
  params = layer('indices', 'float32').init(_key(9), x, train=False)
  out = {}
  for kind in ('einsum', 'indices', 'ragged'):
    for dt in ('float32', 'bfloat16'):
      def loss(p, x, m=layer(kind, dt)):
        y, _ = m.apply(p, x, train=False)
        return jnp.sum(y * jnp.cos(x)), y
      (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
          params, x)
      out.setdefault(kind, {})[dt] = (y, grads)
  return out


def test_moe_bfloat16_within_tolerance_of_float32_on_every_path(moe_runs):
  for kind, runs in moe_runs.items():
    (y16, g16), (y32, g32) = runs['bfloat16'], runs['float32']
    assert y16.dtype == jnp.float32
    assert 0 < _rel(y16, y32) < REL_TOL, kind
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
      assert a.dtype == jnp.float32 and _rel(a, b) < REL_TOL, kind


def test_moe_bfloat16_paths_agree(moe_runs):
  # Same roundings on every path; only the float32 summation order differs.
  y, g = moe_runs['einsum']['bfloat16']
  for kind in ('indices', 'ragged'):
    y2, g2 = moe_runs[kind]['bfloat16']
    np.testing.assert_allclose(y2, y, atol=1e-5, err_msg=kind)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=kind),
                 g2, g)
