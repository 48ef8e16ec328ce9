"""E3, Efficient Ensembles of Experts (Allingham et al., arXiv 2110.03360): M members in one
sparse MoE.

From the first MoE block on, every image is M rows of the batch (jnp.repeat, axis 0: row
b*M + m is member m of image b); the E experts are split into M disjoint sets of E/M and
member m's tokens can only reach its own set (expert e of member m is global expert
m*E/M + e). As in google-research/vmoe:
- a group of S tokens holds whole images with all their copies, tokens in the order
  [B, M, T] -> [B, T, M] (image, then token, member fastest), so member m's tokens of a
  group are those with s % M == m (`to_groups` / `from_groups`);
- the router runs once per member on its S/M tokens, over its E/M experts, with its own
  weights (nn.vmap over members: `Router/dense/kernel` is [D, M, E/M]) and its own noise;
  its losses are averaged over the members;
- the capacity is the same as the whole group's: (S/M) K cf / (E/M) = S K cf / E.
The members' decisions are merged into one routing of the group over all E experts
(`merge`), so every dispatch kind and the one expert code path run E3 unchanged.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import routing as routing_lib

Array = jax.Array


def to_groups(x: Array, m: int, s: int) -> Array:
  """x: [B*M, T, D] (row b*M + m) -> [G, S, D], tokens of a group in [B, T, M] order."""
  bm, t, d = x.shape
  if m > 1:
    x = x.reshape(bm // m, m, t, d).transpose(0, 2, 1, 3)
  return x.reshape(bm * t // s, s, d)


def from_groups(x: Array, m: int, t: int) -> Array:
  """The inverse of to_groups: [G, S, D] -> [B*M, T, D]."""
  d = x.shape[-1]
  if m > 1:
    return x.reshape(-1, t, m, d).transpose(0, 2, 1, 3).reshape(-1, t, d)
  return x.reshape(-1, t, d)


def route(router_cls, kwargs: dict, x: Array, m: int, *, train: bool):
  """Routes each member's tokens with its own router over its E/M experts.

  kwargs: the router's attributes with num_experts = E (the whole layer's); x: [G, S, D].
  Called in the MoE layer's compact __call__: the router is its child `Router`.
  Returns (SparseRouting of the group over all E experts, metrics of [G] arrays averaged
  over the members; a per-expert metric [G, E/M] of each member becomes [G, E] / M).
  """
  g, s, d = x.shape
  e = kwargs['num_experts']
  member_kwargs = {**kwargs, 'num_experts': e // m}

  # params: axis 1 ([D, E/M] -> [D, M, E/M], the reference's layout); intermediates
  # (the router's logits [G, S/M, E/M]) get M at axis 2: [G, S/M, M, E/M] is token order.
  members = nn.vmap(_with_train(router_cls), variable_axes={'params': 1, 'intermediates': 2},
                    split_rngs={'params': True, 'gating': True}, in_axes=2, out_axes=1)
  routing, metrics = members(**member_kwargs, train=train, name='Router')(
      x.reshape(g, s // m, m, d))
  return merge(routing, m, s // m), jax.tree.map(lambda v: _merge_metric(v, m), metrics)


@functools.cache
def _with_train(router_cls):
  """router_cls called as router(x) with `train` an attribute: nn.vmap passes positional
  arguments only."""
  class Member(router_cls):
    train: bool = False

    def __call__(self, x: Array):
      return super().__call__(x, train=self.train)

  Member.__name__ = Member.__qualname__ = router_cls.__name__
  return Member


def _merge_metric(v: Array, m: int) -> Array:
  """[G, M] -> [G] (mean over members); [G, M, E/M] -> [G, E] / M (share of the group)."""
  if v.ndim == 3:
    return v.reshape(v.shape[0], -1) / m
  return jnp.mean(v, axis=1)


def merge(r: routing_lib.SparseRouting, m: int, sm: int) -> routing_lib.SparseRouting:
  """The M members' routings of sm = S/M tokens each (member axis 1: slot_token
  [G, M, E/M, C], token_slot [G, M, S/M, K] or None) -> one routing of the group's S
  tokens over its E experts: member token s' is group token s'*M + m, member expert e is
  global expert m*E/M + e."""
  g, _, em, c = r.slot_token.shape
  member = jnp.arange(m, dtype=jnp.int32)[None, :, None, None]
  # An empty slot holds sm (no token of the member); S = sm*M for the group.
  slot_token = jnp.where(r.slot_token < sm, r.slot_token * m + member, sm * m)
  out = routing_lib.SparseRouting(slot_token.reshape(g, m * em, c),
                                  r.slot_weight.reshape(g, m * em, c))
  if r.token_slot is None:  # Expert choice: no token-major form.
    return out
  k = r.token_slot.shape[-1]
  # Flat slot e*C + c of the member's buffers, em*C for a dropped choice -> the group's.
  token_slot = jnp.where(r.token_slot < em * c, r.token_slot + member * em * c, m * em * c)
  tokens = lambda v: jnp.swapaxes(v, 1, 2).reshape(g, sm * m, k)  # [G, S/M, M, K] order.
  return out.replace(token_slot=tokens(token_slot), token_weight=tokens(r.token_weight))


def members(logits: Array, m: int) -> Array:
  """The E3 model's logits [B*M, C] (row b*M + m) -> [B, M, C]."""
  return logits.reshape(-1, m, logits.shape[-1])


def log_mean(log_p: Array) -> Array:
  """[B, M, C] members' log-probabilities -> [B, C] log of their mean probability."""
  return jax.nn.logsumexp(log_p, axis=1) - jnp.log(log_p.shape[1])
