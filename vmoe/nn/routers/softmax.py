"""Softmax routers of V-MoE: token choice (top-K experts per token) and expert choice."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import routing as routing_lib
from vmoe.nn.routers.common import (Router, expert_choice_metrics, gshard_loss,
                                    importance_loss, load_loss)

Array = jax.Array
LOAD_BALANCING = ('losses', 'bias')
# The per-expert bias of load_balancing='bias' (vmoe.train.optimizers updates it).
BALANCE_BIAS = 'balance_bias'


class NoisyTopExpertsPerItemRouter(Router):
  """V-MoE token choice (arXiv 2106.05974): top-K experts per token by noisy softmax.

  Training adds N(0, (noise_std / E)^2) noise to the logits; the noisy softmax is used to
  dispatch and combine (weights not renormalised over the K picks). Eval uses the clean one.
  Defaults follow the reference implementation (loss weights 1.0; paper configs use 0.005).
  capacity: C slots per expert, filled by the S x K choices of a group (vmoe.nn.models).

  load_balancing: 'losses' (the reference: only the weighted auxiliary losses balance the
  experts) or 'bias' (auxiliary-loss-free balancing, DeepSeek-V3, arXiv 2408.15664): a
  per-expert bias, param `balance_bias` [E], is added to the gates only to choose the
  experts (never to the combine weights) and moves by `bias_update_rate` per step against
  the sign of each expert's load error (vmoe.train.optimizers.balance_update); the loss
  weights still apply, set them to 0 for bias balancing alone.
  """
  SLOTS = 'choices'
  batch_priority: bool = False
  num_selected_experts: int = 1
  importance_loss_weight: float = 1.0
  load_loss_weight: float = 1.0
  gshard_loss_weight: float = 0.0
  load_balancing: str = 'losses'
  bias_update_rate: float = 1e-3

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels  # Only super-class guided routing learns from the labels.
    k, e = self.num_selected_experts, self.num_experts
    logits = self.gating_logits(x)  # [G, S, E]
    gates_clean = jax.nn.softmax(logits)
    metrics = {'importance_loss': importance_loss(gates_clean)}
    losses = [(self.importance_loss_weight, 'importance_loss')]
    gates = gates_clean
    if self.noisy(train):
      sigma = self.noise_std / e
      noisy = logits + self.noise(logits.shape, sigma)
      gates = jax.nn.softmax(noisy)
      metrics['load_loss'] = load_loss(logits, noisy, sigma, k)
      losses.append((self.load_loss_weight, 'load_loss'))
    metrics['gshard_loss'] = gshard_loss(gates)
    losses.append((self.gshard_loss_weight, 'gshard_loss'))
    # Losses with weight 0 are left out of the sum: some have ill-defined gradients.
    metrics['auxiliary_loss'] = sum(
        (w * metrics[n] for w, n in losses if w > 0), jnp.zeros(x.shape[0], jnp.float32))
    scores = gates
    if self.load_balancing == 'bias':
      scores, metrics = self.balance(gates, metrics)
    routing = routing_lib.top_experts_per_item(scores, k, self.capacity, self.batch_priority,
                                               weights=gates)
    return routing, self.with_z_loss(metrics, logits)

  @nn.nowrap
  def balance(self, gates: Array, metrics: dict) -> tuple[Array, dict]:
    """(gates + bias: the scores that choose, metrics + the bias's pseudo-gradient term).

    The term is t - stop_gradient(t), zero in value, with t = <bias, sg(r * sign(load -
    1/E))> per group: the trainer's mean over groups makes the gradient of `bias` the
    mean over groups of r * sign(load error), and vmoe.train.optimizers applies it as
    plain descent (no learning rate, momentum, decay or clipping).
    load: the fraction of the group's S x K choices (before capacity) per expert.
    """
    e, k = self.num_experts, self.num_selected_experts
    bias = self.param(BALANCE_BIAS, nn.initializers.zeros, (e,), jnp.float32)
    scores = gates + bias
    chosen = jax.lax.top_k(jax.lax.stop_gradient(scores), k)[1]  # [G, S, K]
    load = jnp.mean(jnp.sum(jax.nn.one_hot(chosen, e), axis=2), axis=1) / k  # [G, E]
    step = jax.lax.stop_gradient(self.bias_update_rate * jnp.sign(load - 1 / e))
    t = jnp.sum(bias * step, axis=-1)
    metrics['auxiliary_loss'] = metrics['auxiliary_loss'] + t - jax.lax.stop_gradient(t)
    metrics['balance_bias_max'] = jnp.broadcast_to(jnp.max(jnp.abs(bias)), t.shape)
    return scores, metrics


class NoisyTopItemsPerExpertRouter(Router):
  """Expert choice (arXiv 2202.09368): each expert takes its top-C tokens by gate.

  Gates are the (noisy in training) softmax over experts; capacity counts the S tokens of
  a group, not S * K choices. Loads are balanced by construction, so there is no auxiliary
  loss; a token may be taken by 0..E experts.
  """
  SLOTS = 'tokens'

  @nn.compact
  def __call__(self, x: Array, *, train: bool, labels: Optional[Array] = None):
    """x: [G, S, D] -> (SparseRouting, metrics of [G] arrays)."""
    del labels  # Only super-class guided routing learns from the labels.
    logits = self.gating_logits(x)  # [G, S, E]
    noisy = logits
    if self.noisy(train):
      noisy = logits + self.noise(logits.shape, self.noise_std / self.num_experts)
    routing = routing_lib.top_items_per_expert(jax.nn.softmax(noisy), self.capacity)
    metrics = expert_choice_metrics(routing, x.shape[1], self.num_experts)
    return routing, self.with_z_loss(metrics, logits)
