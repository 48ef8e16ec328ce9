"""Softmax routers of V-MoE: token choice (top-K experts per token) and expert choice."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import routing as routing_lib
from vmoe.nn.routers.common import (expert_choice_metrics, gshard_loss, importance_loss,
                                    load_loss)

Array = jax.Array


class NoisyTopExpertsPerItemRouter(nn.Module):
  """V-MoE token choice (arXiv 2106.05974): top-K experts per token by noisy softmax.

  Training adds N(0, (noise_std / E)^2) noise to the logits; the noisy softmax is used to
  dispatch and combine (weights not renormalised over the K picks). Eval uses the clean one.
  Defaults follow the reference implementation (loss weights 1.0; paper configs use 0.005).
  capacity: C slots per expert, filled by the S x K choices of a group (vmoe.nn.models).
  """
  SLOTS = 'choices'
  num_experts: int
  capacity: int
  batch_priority: bool = False
  num_selected_experts: int = 1
  noise_std: float = 1.0
  importance_loss_weight: float = 1.0
  load_loss_weight: float = 1.0
  gshard_loss_weight: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels  # Only super-class guided routing learns from the labels.
    k, e = self.num_selected_experts, self.num_experts
    logits = nn.Dense(e, use_bias=False, name='dense')(x)  # [G, S, E]
    self.sow('intermediates', 'logits', logits)
    gates_clean = jax.nn.softmax(logits)
    metrics = {'importance_loss': importance_loss(gates_clean)}
    losses = [(self.importance_loss_weight, 'importance_loss')]
    gates = gates_clean
    if train and self.noise_std > 0:
      sigma = self.noise_std / e
      noisy = logits + sigma * jax.random.normal(self.make_rng('gating'), logits.shape)
      gates = jax.nn.softmax(noisy)
      metrics['load_loss'] = load_loss(logits, noisy, sigma, k)
      losses.append((self.load_loss_weight, 'load_loss'))
    metrics['gshard_loss'] = gshard_loss(gates)
    losses.append((self.gshard_loss_weight, 'gshard_loss'))
    # Losses with weight 0 are left out of the sum: some have ill-defined gradients.
    metrics['auxiliary_loss'] = sum(
        (w * metrics[n] for w, n in losses if w > 0), jnp.zeros(x.shape[0], x.dtype))
    routing = routing_lib.top_experts_per_item(gates, k, self.capacity, self.batch_priority)
    return routing, metrics


class NoisyTopItemsPerExpertRouter(nn.Module):
  """Expert choice (arXiv 2202.09368): each expert takes its top-C tokens by gate.

  Gates are the (noisy in training) softmax over experts; capacity counts the S tokens of
  a group, not S * K choices. Loads are balanced by construction, so there is no auxiliary
  loss; a token may be taken by 0..E experts.
  """
  SLOTS = 'tokens'
  num_experts: int
  capacity: int
  noise_std: float = 1.0

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels  # Only super-class guided routing learns from the labels.
    e = self.num_experts
    logits = nn.Dense(e, use_bias=False, name='dense')(x)  # [G, S, E]
    self.sow('intermediates', 'logits', logits)
    if train and self.noise_std > 0:
      logits = logits + (self.noise_std / e) * jax.random.normal(
          self.make_rng('gating'), logits.shape)
    gates = jax.nn.softmax(logits)
    routing = routing_lib.top_items_per_expert(gates, self.capacity)
    return routing, expert_choice_metrics(routing, x.shape[1], e)
