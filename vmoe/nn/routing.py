"""Routing decisions as data (who goes where, with which weight), and dispatchers.

A router (vmoe/nn/routers/) only produces one of the routing objects below; the MoE layer
(vmoe/nn/moe.py) runs the same expert code for all of them. Notation: G groups, S tokens
per group, D model width, E experts, C buffer slots per expert (capacity), K choices per
token.

`SparseRouting` is a hard assignment. Its canonical, expert-major form says, for every
buffer slot (e, c), which token of the group sits there and with which combine weight.
Routers with a fixed number K of choices per token also give the token-major form.
`DenseRouting` holds the soft dispatch/combine tensors of Soft MoE.

A dispatcher moves the tokens of a group to the experts' inputs and their outputs back
for one routing decision. Combine weights keep their dtype (float32) and so does the
weighted sum: with bfloat16 dispatch only the tokens and the expert outputs are rounded,
as in the reference's Bfloat16Dispatcher. The MoE layer picks the dispatcher once from
the resolved dispatch kind (DISPATCHERS[kind](routing, S)); all compute the same function
of the same decisions:
- 'einsum' (`OneHot`): one-hot matmuls, as the reference: dispatch [G, E*C, S] x
  [G, S, D], combine [G, S, E*C] x [G, E*C, D]. O(S^2) FLOPs and memory per group (at 1568
  tokens about a third of the experts' FLOPs, docs/performance.md).
- 'indices' (`Gather`): gathers into capacity buffers [G, E, C, D] and back (combine
  gathers the K choices of each token through `token_slot`); O(S) per group.
- 'ragged' (`Ragged`): no buffers: the G*S*K choices become rows sorted by expert
  (`sorted_by_expert`) and the experts run `jax.lax.ragged_dot`, so no padding is computed.
  Dropped choices (capacity) stay dropped; with no capacity configured nothing drops.
- 'soft' (`Soft`): Soft MoE's weighted sums (the config calls it 'einsum', as the
  reference does; vmoe.nn.models resolves it to 'soft').
- 'chosen' (`Chosen`): per-image routing (`ImageRouting`) without buffers: each image's
  tokens go through its K experts' weights, gathered per image, so an image costs K expert
  MLPs and nothing is dropped or padded (Mobile V-MoE inference; the MoE layer picks it,
  vmoe.nn.spec.MoeSpec.chosen_experts).
"""
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from vmoe.nn import precision

Array = jax.Array
# The dispatch kinds a config may name (dispatcher.name).
DISPATCH_KINDS = ('einsum', 'indices', 'ragged')


def _precision_of(x: Array) -> str:
  """One-hot matmuls of bfloat16 tokens run bf16 x bf16 -> f32 (exact for a one-hot)."""
  return 'bfloat16' if x.dtype == jnp.bfloat16 else 'float32'


def _take(x: Array, idx: Array) -> Array:
  """x[idx] along axis 0; an index past the end (an empty slot, a dropped choice) gives a
  zero row."""
  return jnp.take(x, idx, axis=0, mode='fill', fill_value=0)


@flax.struct.dataclass
class SparseRouting:
  """Hard routing of one MoE layer, per group.

  slot_token: [G, E, C] int32, token held by buffer slot (e, c); S marks an empty slot.
  slot_weight: [G, E, C], combine weight of that slot (0 where empty).
  token_slot: [G, S, K] int32 or None, flat buffer position e * C + c of each token's
    k-th choice; E * C marks a dropped choice.
  token_weight: [G, S, K] or None, combine weight of each choice (0 where dropped).
  """
  slot_token: Array
  slot_weight: Array
  token_slot: Optional[Array] = None
  token_weight: Optional[Array] = None

  def sorted_by_expert(self) -> 'RaggedRouting':
    """The same decisions as rows sorted by expert, for kind 'ragged'."""
    g, e, c = self.slot_token.shape
    _, s, k = self.token_slot.shape
    expert = (self.token_slot // c).reshape(-1)  # [N] in (g, s, k) order; E if dropped.
    n = expert.shape[0]
    order = jnp.argsort(expert, stable=True)  # Row -> choice.
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return RaggedRouting(
        row_token=(order // k).astype(jnp.int32),
        group_sizes=jnp.bincount(expert, length=e).astype(jnp.int32),
        token_row=jnp.where(expert < e, rank, n).reshape(g, s, k),
        token_weight=self.token_weight)

  def per_token(self, num_tokens: int):
    """Dense view for analysis and tests: (slot [G, S, E] (-1 if not routed), weight [G, S, E])."""
    g, e, c = self.slot_token.shape
    gi = jnp.arange(g)[:, None, None]
    ei = jnp.arange(e)[None, :, None]
    ci = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (g, e, c))
    slot = jnp.full((g, num_tokens, e), -1, jnp.int32)
    slot = slot.at[gi, self.slot_token, ei].set(ci, mode='drop')
    weight = jnp.zeros((g, num_tokens, e), self.slot_weight.dtype)
    weight = weight.at[gi, self.slot_token, ei].set(self.slot_weight, mode='drop')
    return slot, weight


@flax.struct.dataclass
class RaggedRouting:
  """Token choice without buffers: the N = G*S*K choices as rows sorted by expert.

  row_token: [N] int32, flat token g * S + s of each row; rows of dropped choices come
    last and belong to no expert.
  group_sizes: [E] int32, rows per expert (the first group_sizes[0] rows are expert 0's).
  token_row: [G, S, K] int32, row of each choice; N where the choice was dropped.
  token_weight: [G, S, K], combine weight of each choice (0 where dropped).
  """
  row_token: Array
  group_sizes: Array
  token_row: Array
  token_weight: Array


@flax.struct.dataclass
class DenseRouting:
  """Soft routing (Soft MoE): every slot is a convex combination of tokens.

  dispatch: [G, S, E, P], sums to 1 over S for every slot (e, p).
  combine: [G, S, E, P], sums to 1 over (E, P) for every token s.
  """
  dispatch_weights: Array
  combine_weights: Array


@flax.struct.dataclass
class ImageRouting:
  """Per-image routing (Mobile V-MoE): every token of image b goes to its K experts.

  expert: [B, K] int32, the experts of each image of the batch (groups of whole images,
    in order); weight: [B, K] their combine weights, capacity aside (nothing dropped).
  tokens: the same decisions at token level with the expert capacity applied (images
    past an expert's C_img image slots dropped), for the buffer and ragged dispatchers.
  """
  expert: Array
  weight: Array
  tokens: SparseRouting

  def per_token(self, num_tokens: int):
    """Dense view as SparseRouting.per_token: (rank k of the expert among the image's
    choices, -1 if not chosen; weight), both [G, S, E]."""
    g = self.tokens.slot_token.shape[0]
    b, k = self.expert.shape
    e = self.tokens.slot_token.shape[1]
    onehot = jax.nn.one_hot(self.expert, e, dtype=jnp.int32)  # [B, K, E]
    rank = jnp.max(onehot * (jnp.arange(k, dtype=jnp.int32)[:, None] + 1), axis=1) - 1
    weight = jnp.einsum('bke,bk->be', onehot.astype(self.weight.dtype), self.weight)
    t = g * num_tokens // b
    tile = lambda v: jnp.repeat(v, t, axis=0).reshape(g, num_tokens, e)
    return tile(rank), tile(weight)


class Buffers:
  """Dispatch into buffers [G, E, C, D] (on a mesh, the MoE layer moves them to the
  experts' devices and back). What the experts take besides the tokens: `group_sizes`
  (ragged rows) or `experts` (chosen experts per image), None here."""
  group_sizes = None
  experts = None

  def __init__(self, routing, num_tokens: int):
    self.routing, self.num_tokens = routing, num_tokens


class OneHot(Buffers):
  """'einsum': x [G, S, D] -> buffers [G, E, C, D] by one-hot matmuls, and back."""

  def dispatch(self, x: Array) -> Array:
    """x: [G, S, D] -> expert inputs [G, E, C, D] in x's dtype (zeros in empty slots)."""
    g, s, d = x.shape
    _, e, c = self.routing.slot_token.shape
    onehot = self.routing.slot_token.reshape(g, e * c, 1) == jnp.arange(s)  # [G, E*C, S]
    y = precision.dot(onehot.astype(x.dtype), x, _precision_of(x))
    return y.astype(x.dtype).reshape(g, e, c, d)

  def combine(self, y: Array) -> Array:
    """y: [G, E, C, D] expert outputs -> [G, S, D] weighted by the combine weights, in
    the weights' dtype (float32 for bfloat16 outputs, as the reference)."""
    g, e, c, d = y.shape
    w = self.routing.slot_weight
    # Weights go on the slots, not into the one-hot: their gradient is then a dot product
    # per slot instead of one more [G, S, E*C] matmul in the backward pass.
    onehot = (self.routing.slot_token.reshape(g, 1, e * c)
              == jnp.arange(self.num_tokens)[:, None])
    wy = y.reshape(g, e * c, d) * w.reshape(g, e * c, 1)
    return precision.dot(onehot.astype(wy.dtype), wy, _precision_of(wy)).astype(wy.dtype)


class Gather(Buffers):
  """'indices': x [G, S, D] -> buffers [G, E, C, D] by gathers, and back."""

  def dispatch(self, x: Array) -> Array:
    g, _, d = x.shape
    _, e, c = self.routing.slot_token.shape
    return jax.vmap(_take)(x, self.routing.slot_token.reshape(g, e * c)).reshape(g, e, c, d)

  def combine(self, y: Array) -> Array:
    g, e, c, d = y.shape
    y = y.reshape(g, e * c, d)
    r = self.routing
    if r.token_slot is not None:
      # K choices per token: gather them and sum, no scatter needed.
      yk = jax.vmap(_take)(y, r.token_slot)  # [G, S, K, D]
      return jnp.einsum('gskd,gsk->gsd', yk, r.token_weight)
    w = r.slot_weight
    seg = lambda yg, tg: jax.ops.segment_sum(yg, tg, num_segments=self.num_tokens)
    return jax.vmap(seg)(y * w.reshape(g, e * c, 1), r.slot_token.reshape(g, e * c))


class Ragged:
  """'ragged': x [G, S, D] -> rows [N, D] sorted by expert (`group_sizes` [E] rows per
  expert, for jax.lax.ragged_dot), and back. Needs K choices per token (token choice)."""

  experts = None

  def __init__(self, routing: SparseRouting, num_tokens: int):
    del num_tokens  # The rows and token_row say everything.
    self.rows = routing.sorted_by_expert()
    self.group_sizes = self.rows.group_sizes

  def dispatch(self, x: Array) -> Array:
    """x: [G, S, D] -> rows [N, D]."""
    return jnp.take(x.reshape(-1, x.shape[-1]), self.rows.row_token, axis=0)

  def combine(self, y: Array) -> Array:
    """y: [N, D] expert outputs per row -> [G, S, D] weighted by the combine weights."""
    # Row N (dropped) is out of range: a zero row. Rows past the groups are never read.
    yk = _take(y, self.rows.token_row)  # [G, S, K, D]
    return jnp.einsum('gskd,gsk->gsd', yk, self.rows.token_weight)


class Soft(Buffers):
  """'soft': every slot [G, E, P, D] a weighted sum of the group's tokens, every output a
  weighted sum of the slots (DenseRouting), in the weights' dtype."""

  def dispatch(self, x: Array) -> Array:
    return jnp.einsum('gsep,gsd->gepd', self.routing.dispatch_weights, x)

  def combine(self, y: Array) -> Array:
    return jnp.einsum('gsep,gepd->gsd', self.routing.combine_weights, y)


class Chosen:
  """'chosen': x [G, S, D] of whole images -> images [B, T, D]; the experts apply each
  image's K experts (`experts` [B, K]) to it, [B, K, T, D], and combine sums them with
  the image's weights. No capacity: nothing is dropped."""
  group_sizes = None

  def __init__(self, routing: ImageRouting, num_tokens: int):
    self.routing, self.num_tokens = routing, num_tokens
    self.experts = routing.expert

  def dispatch(self, x: Array) -> Array:
    """x: [G, S, D] -> [B, T, D]."""
    g, s, d = x.shape
    b = self.experts.shape[0]
    return x.reshape(b, g * s // b, d)

  def combine(self, y: Array) -> Array:
    """y: [B, K, T, D] -> [G, S, D], in the weights' dtype."""
    out = jnp.einsum('bktd,bk->btd', y, self.routing.weight)
    return out.reshape(-1, self.num_tokens, out.shape[-1])


DISPATCHERS = {'einsum': OneHot, 'indices': Gather, 'ragged': Ragged, 'soft': Soft,
               'chosen': Chosen}


def top_experts_per_item(gates: Array, num_selected_experts: int, capacity: int,
                         batch_priority: bool, weights: Optional[Array] = None,
                         drop_zero: bool = False) -> SparseRouting:
  """Token choice: each token picks its top-K experts; slots go first come first served.

  gates: [G, S, E] scores that choose the experts; also the combine weights (not
    renormalised) unless `weights` [G, S, E] is given (e.g. Sinkhorn plans choose,
    softmax gates weigh).
  All tokens' 1st choices are placed before any 2nd choice (K-major); within a tier
  tokens go in order, or by decreasing top-1 score with batch_priority (BPR).
  drop_zero: a choice of score <= 0 (outside a sparse plan's support) keeps its place in
    the buffer order but is not dispatched: its slot stays empty (the reference's).
  """
  weights = gates if weights is None else weights
  return jax.vmap(lambda g, w: _top_experts_per_item(
      g, w, num_selected_experts, capacity, batch_priority, drop_zero))(gates, weights)


def _top_experts_per_item(gates, weights, k, capacity, batch_priority, drop_zero):
  """gates, weights: [S, E] -> SparseRouting of one group (no G axis)."""
  s, e = gates.shape
  score, expert = jax.lax.top_k(gates, k)  # [S, K]
  weight = jnp.take_along_axis(weights, expert, axis=1)
  order = jnp.argsort(-score[:, 0], stable=True) if batch_priority else jnp.arange(s)
  # [K * S] choices in priority order; the position of a choice in its expert's buffer
  # is the number of earlier choices of the same expert.
  flat = expert[order].T.reshape(-1)
  onehot = jax.nn.one_hot(flat, e, dtype=jnp.int32)
  pos = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1
  slot = jnp.zeros((s, k), jnp.int32).at[order].set(pos.reshape(k, s).T)
  kept = slot < capacity
  if drop_zero:
    kept &= score > 0
  token_slot = jnp.where(kept, expert * capacity + slot, e * capacity)
  token_weight = jnp.where(kept, weight, 0)
  tokens = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, k))
  slot_token = jnp.full((e * capacity,), s, jnp.int32).at[token_slot].set(tokens, mode='drop')
  slot_weight = jnp.zeros((e * capacity,), weights.dtype).at[token_slot].set(
      token_weight, mode='drop')
  return SparseRouting(slot_token.reshape(e, capacity), slot_weight.reshape(e, capacity),
                       token_slot.astype(jnp.int32), token_weight)


def top_items_per_expert(gates: Array, capacity: int, weights: Optional[Array] = None,
                         drop_zero: bool = False) -> SparseRouting:
  """Expert choice: each expert takes the `capacity` tokens with the largest gates.

  gates: [G, S, E] scores; combine weight = the gate, or `weights` [G, S, E] if given.
  A token may be taken by 0..E experts. drop_zero: a pick of score <= 0 (outside a
  sparse plan's support) leaves its slot empty (the reference's).
  """
  score, token = jax.lax.top_k(jnp.swapaxes(gates, 1, 2), capacity)  # [G, E, C]
  weight = score
  if weights is not None:
    weight = jnp.take_along_axis(jnp.swapaxes(weights, 1, 2), token, axis=2)
  if drop_zero:
    token = jnp.where(score > 0, token, gates.shape[1])
    weight = jnp.where(score > 0, weight, 0)
  return SparseRouting(token.astype(jnp.int32), weight)
