"""Per-image routing (Mobile V-MoE, arXiv 2309.04354).

One decision per image: the router reads one vector per image (its class token, or the
mean of its patch tokens), picks K experts, and every token of the image goes to them.
Capacity counts images (C_img slots of T tokens each). Optional super-class guidance
replaces the balancing losses by a cross-entropy between the router's softmax and the
image's super-class (one super-class per expert).

scope 'model' (the paper's, the default): one router for the whole MoE part, at
`Encoder/image_router`, reads the representation entering the first MoE block (after a
LayerNorm, `Encoder/image_router_norm`), and every MoE layer sends the image to the same
K experts (expert e of every layer); its losses count once. scope 'layer': each MoE layer
has its own router (`Moe/Router`) reading that layer's input, so an image may use
different experts in different layers (kept for comparison, docs/routers.md).
"""
import json
import os
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import routing as routing_lib
from vmoe.nn.routers.common import Router, importance_loss, load_loss

Array = jax.Array
IMAGE_REPRS = ('mean', 'token')
SCOPES = ('model', 'layer')


def load_superclasses(spec: Union[str, Sequence[int]], num_classes: int,
                      num_experts: int) -> tuple[int, ...]:
  """Class -> super-class table from a list or a JSON file of vmoe.tools.superclasses."""
  table = spec
  if isinstance(spec, str):
    if not os.path.exists(spec):
      raise ValueError(f'Super-class file {spec!r} does not exist; derive one from a trained '
                       'dense model with python -m vmoe.tools.superclasses.')
    with open(spec) as f:
      table = json.load(f)['superclass_of_class']
  table = tuple(int(v) for v in table)
  if len(table) != num_classes:
    raise ValueError(f'The super-class table {spec if isinstance(spec, str) else ""} has '
                     f'{len(table)} classes but the model has num_classes={num_classes}; '
                     'derive it again for this dataset with python -m vmoe.tools.superclasses.')
  bad = sorted({v for v in table if not 0 <= v < num_experts})
  if bad:
    raise ValueError(f'Super-classes {bad} are outside [0, num_experts={num_experts}); '
                     'use one super-class per expert.')
  return table


def expand_to_tokens(r: routing_lib.SparseRouting, t: int) -> routing_lib.SparseRouting:
  """Image-level routing (S_img images, C_img slots) -> token level (S = S_img * T, C_img * T)."""
  g, e, c_img = r.slot_token.shape
  s_img = r.token_slot.shape[1]
  ti = jnp.arange(t, dtype=jnp.int32)
  slot_token = jnp.where(r.slot_token[..., None] < s_img,
                         r.slot_token[..., None] * t + ti, s_img * t)  # [G, E, C_img, T]
  slot_weight = jnp.repeat(r.slot_weight, t, axis=-1)
  token_slot = r.token_slot[:, :, None, :] * t + ti[None, None, :, None]  # [G, S_img, T, K]
  token_slot = jnp.where(r.token_slot[:, :, None, :] < e * c_img, token_slot, e * c_img * t)
  token_weight = jnp.repeat(r.token_weight[:, :, None, :], t, axis=2)
  k = r.token_slot.shape[-1]
  return routing_lib.SparseRouting(
      slot_token.reshape(g, e, c_img * t), slot_weight,
      token_slot.reshape(g, s_img * t, k), token_weight.reshape(g, s_img * t, k))


class PerImageRouter(Router, kw_only=True):
  """K experts per image. labels (int [B]) are needed in training with superclasses.

  capacity: C_img image slots per expert, filled by the n x K choices of the n = S / T
  images of a group (vmoe.nn.models); tokens_per_image: T; class_token: token 0 of each
  image is the class token (classifier 'token'). image_repr: 'token' (the class token)
  or 'mean' (of the patch tokens). superclasses: the class -> super-class table (the
  config's file or list, resolved by vmoe.nn.models), or None. scope: see above (read by
  the encoder; the router itself decides the same way in both).
  """
  SLOTS = 'images'
  tokens_per_image: int
  class_token: bool = False
  batch_priority: bool = False
  num_selected_experts: int = 1
  image_repr: str = 'mean'
  scope: str = 'model'
  importance_loss_weight: float = 0.005
  load_loss_weight: float = 0.005
  superclasses: Optional[tuple[int, ...]] = None
  superclass_loss_weight: float = 0.3

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D], S = n images x T tokens -> (ImageRouting, metrics of [G] arrays)."""
    g, s, d = x.shape
    t, k, e = self.tokens_per_image, self.num_selected_experts, self.num_experts
    n = s // t
    xi = x.reshape(g, n, t, d)
    if self.image_repr == 'token':
      xi = xi[:, :, 0]
    else:
      xi = jnp.mean(xi[:, :, int(self.class_token):], axis=2)
    logits = self.gating_logits(xi)  # [G, n, E]
    gates_clean = jax.nn.softmax(logits)
    gates, metrics = gates_clean, {}
    if self.noisy(train):
      noisy = logits + self.noise(logits.shape, self.noise_std / e)
      gates = jax.nn.softmax(noisy)
      metrics['load_loss'] = load_loss(logits, noisy, self.noise_std / e, k)
    metrics['importance_loss'] = importance_loss(gates_clean)
    if self.superclasses is not None:
      aux = jnp.zeros((g,), jnp.float32)
      if labels is not None:
        table = jnp.asarray(self.superclasses)
        target = jax.nn.one_hot(table[labels.reshape(g, n)], e)
        xent = -jnp.sum(target * jax.nn.log_softmax(logits), axis=-1)  # [G, n]
        metrics['superclass_loss'] = jnp.mean(xent, axis=1)
        aux = self.superclass_loss_weight * metrics['superclass_loss']
        metrics['superclass_accuracy'] = jnp.mean(
            jnp.argmax(logits, -1) == table[labels.reshape(g, n)], axis=1)
    else:
      aux = self.importance_loss_weight * metrics['importance_loss']
      if 'load_loss' in metrics:
        aux = aux + self.load_loss_weight * metrics['load_loss']
    metrics['auxiliary_loss'] = aux
    routing = routing_lib.top_experts_per_item(gates, k, self.capacity, self.batch_priority)
    weight, expert = jax.lax.top_k(gates, k)  # The same choices, capacity aside.
    return routing_lib.ImageRouting(
        expert.reshape(g * n, k).astype(jnp.int32), weight.reshape(g * n, k),
        expand_to_tokens(routing, t)), self.with_z_loss(metrics, logits)
