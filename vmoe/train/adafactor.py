"""Adafactor-style scaling whose second moments are never factored across experts.

The factored estimate of E[g^2] for a matrix keeps a row mean and a column
mean instead of the full matrix (Shazeer & Stern, 2018). Expert params carry a
leading expert axis E (paths matching `expert_pattern`, e.g.
`Moe/Mlp/Dense_0/kernel: [E, D, H]`); averaging statistics across E would mix
different experts, so for them axis 0 is a batch axis: `[E, D, H]` keeps
`v_row: [E, D]` and `v_col: [E, H]`, and `[E, H]` (a bias) is not factored.
This is the optimizer V-MoE-15B was trained with (arXiv 2106.05974).
"""
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from vmoe.nn import moe
from vmoe.utils import paths


class ScaleByAdafactorState(NamedTuple):
  count: jax.Array  # [] int32
  v_row: optax.Params  # Factored leaves: g^2 averaged over the column axis.
  v_col: optax.Params  # Factored leaves: g^2 averaged over the row axis.
  v: optax.Params  # Unfactored leaves: full second moment.
  m: optax.Params  # First moment (EMA of the scaled updates).


def factored_dims(shape: tuple[int, ...], is_expert: bool,
                  min_dim_size_to_factor: int) -> tuple[int, int] | None:
  """Returns (row axis, col axis) to factor over, or None for a full moment.

  The two largest axes are factored (col = the largest), never axis 0 of an
  expert param.
  """
  axes = list(range(1 if is_expert else 0, len(shape)))
  if len(axes) < 2:
    return None
  row, col = sorted(axes, key=lambda a: (shape[a], a))[-2:]
  if shape[row] < min_dim_size_to_factor:
    return None
  return row, col


def scale_by_adafactor(
    *,
    decay_rate: float = 0.8,
    decay_rate_max: float = 0.999,
    decay_offset: int = 0,
    eps: float = 1e-30,
    min_dim_size_to_factor: int = 32,
    momentum: float | None = 0.9,
    momentum_dtype: str = 'float32',
    expert_pattern: str = moe.EXPERT_PARAMS,
) -> optax.GradientTransformation:
  """Adafactor scaling (big_vision variant: bounded decay, EMA momentum).

  Args:
    decay_rate: exponent c of the second-moment decay 1 - (t + 1)^-c.
    decay_rate_max: upper bound of that decay.
    decay_offset: step at which the decay schedule restarts (fine-tuning).
    eps: added to g^2.
    min_dim_size_to_factor: factor only if both factored axes are this large.
    momentum: EMA decay of the scaled updates (None or 0: no momentum).
    momentum_dtype: dtype of the momentum buffer.
    expert_pattern: regex on '/'-joined param paths marking expert params.
  """
  def leaf_dims(params) -> list[tuple[int, int] | None]:
    dims = paths.map_with_paths(
        lambda path, p: _Dims(factored_dims(
            p.shape, bool(re.search(expert_pattern, path)),
            min_dim_size_to_factor)), params)
    return [d.dims for d in jax.tree.leaves(
        dims, is_leaf=lambda x: isinstance(x, _Dims))]

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    v_row, v_col, v = zip(*(_zero_moments(p.shape, d)
                            for p, d in zip(leaves, leaf_dims(params))))
    m = (jax.tree.map(lambda p: jnp.zeros(p.shape, momentum_dtype), params)
         if momentum else optax.EmptyState())
    unflat = lambda xs: jax.tree.unflatten(treedef, list(xs))
    return ScaleByAdafactorState(
        count=jnp.zeros((), jnp.int32), v_row=unflat(v_row),
        v_col=unflat(v_col), v=unflat(v), m=m)

  def update_fn(updates, state, params=None):
    del params
    dims = leaf_dims(updates)
    t = (state.count - decay_offset + 1).astype(jnp.float32)
    beta = jnp.minimum(decay_rate_max, 1.0 - t ** (-decay_rate))
    leaves, treedef = jax.tree.flatten(updates)
    flat = lambda tree: treedef.flatten_up_to(tree)
    out, v_row, v_col, v = zip(*(
        _scale(g, d, vr, vc, vf, beta, eps) for g, d, vr, vc, vf in zip(
            leaves, dims, flat(state.v_row), flat(state.v_col), flat(state.v))))
    unflat = lambda xs: jax.tree.unflatten(treedef, list(xs))
    out = unflat(out)
    m = state.m
    if momentum:
      m = jax.tree.map(
          lambda mu, u: (momentum * mu + (1 - momentum) * u).astype(mu.dtype),
          state.m, out)
      out = jax.tree.map(lambda mu, u: mu.astype(u.dtype), m, out)
    new_state = ScaleByAdafactorState(
        count=optax.safe_increment(state.count), v_row=unflat(v_row),
        v_col=unflat(v_col), v=unflat(v), m=m)
    return out, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _zero_moments(shape, dims):
  """(v_row, v_col, v) of a new leaf: factored moments, or the full one (the others are
  placeholders)."""
  placeholder = jnp.zeros((1,), jnp.float32)
  if dims is None:
    return placeholder, placeholder, jnp.zeros(shape, jnp.float32)
  row, col = dims
  return (jnp.zeros(_drop(shape, col), jnp.float32),
          jnp.zeros(_drop(shape, row), jnp.float32), placeholder)


def _scale(g, dims, vr, vc, vf, beta, eps):
  """One leaf's gradient g scaled by its updated second moment -> (update, vr, vc, vf)."""
  g2 = jnp.square(g.astype(jnp.float32)) + eps
  if dims is None:
    vf = beta * vf + (1 - beta) * g2
    return (g * jax.lax.rsqrt(vf)).astype(g.dtype), vr, vc, vf
  row, col = dims
  vr = beta * vr + (1 - beta) * jnp.mean(g2, axis=col)
  vc = beta * vc + (1 - beta) * jnp.mean(g2, axis=row)
  # v_row's axes are g's minus `col`, so `row` moves left if after col.
  row_in_vr = row - 1 if row > col else row
  vr_norm = vr / jnp.mean(vr, axis=row_in_vr, keepdims=True)
  v_est = jnp.expand_dims(vr_norm, col) * jnp.expand_dims(vc, row)
  return (g * jax.lax.rsqrt(v_est)).astype(g.dtype), vr, vc, vf


class _Dims(NamedTuple):
  """Wraps a leaf's factored dims so that the tuple is not taken as a subtree."""
  dims: tuple[int, int] | None


def _drop(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
  return shape[:axis] + shape[axis + 1:]
