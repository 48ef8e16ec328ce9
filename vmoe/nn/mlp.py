"""MLPs: the dense ViT MLP and E experts stacked on a leading axis (one code path).

`compute_dtype` is the matmul precision policy of vmoe/nn/precision.py ('float32', or
'bfloat16' inputs with float32 accumulation); params are float32 either way.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import precision

Array = jax.Array

# Dense MLP initialisers of ViT (vit_jax MlpBlock), used for dense and expert MLPs alike.
KERNEL_INIT = nn.initializers.xavier_uniform()
BIAS_INIT = nn.initializers.normal(stddev=1e-6)


def _stacked(init, num_experts: int, split: bool):
  """Initialiser of [E, ...] params: E draws (split) or one draw shared by all experts."""
  def f(key, shape, dtype=jnp.float32):
    if split:
      return jax.vmap(lambda k: init(k, shape[1:], dtype))(jax.random.split(key, num_experts))
    return jnp.broadcast_to(init(key, shape[1:], dtype), shape)
  return f


class ExpertDense(nn.Module):
  """E independent dense layers, kernel [E, D_in, F], bias [E, F].

  __call__(x [E, M, D_in]) -> [E, M, F]: expert e's buffer is x[e].
  __call__(x [N, D_in], group_sizes [E]) -> [N, F]: rows sorted by expert, the first
    group_sizes[0] rows are expert 0's, and so on (jax.lax.ragged_dot); rows past
    sum(group_sizes) belong to no expert and carry garbage.
  __call__(x [B, K, T, D_in], experts [B, K]) -> [B, K, T, F]: x[b, k] goes through
    expert experts[b, k], whose weights are gathered for it (per-image routing).
  """
  features: int
  num_experts: int
  split_rngs: bool  # Experts start from different draws.
  compute_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: Array, group_sizes=None, experts=None) -> Array:
    e, d = self.num_experts, x.shape[-1]
    kernel = self.param('kernel', _stacked(KERNEL_INIT, e, self.split_rngs),
                        (e, d, self.features))
    bias = self.param('bias', _stacked(BIAS_INIT, e, self.split_rngs), (e, self.features))
    if experts is not None:
      (b, k, t, _), f = x.shape, self.features
      y = precision.dot(x.reshape(b * k, t, d), kernel[experts].reshape(b * k, d, f),
                        self.compute_dtype)
      return y.reshape(b, k, t, f) + bias[experts][:, :, None, :]
    if group_sizes is None:
      return precision.dot(x, kernel, self.compute_dtype) + bias[:, None, :]
    row_expert = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=x.shape[0])
    return precision.ragged_dot(x, kernel, group_sizes, self.compute_dtype) + bias[row_expert]


class ExpertMlp(nn.Module):
  """E expert MLPs (D -> H -> D, tanh-GELU) on capacity buffers or on ragged rows.

  __call__(x [G, E, C, D]) -> [G, E, C, D] (dispatch kinds 'einsum' and 'indices').
  __call__(x [N, D], group_sizes [E]) -> [N, D] (rows sorted by expert, kind 'ragged').
  __call__(x [B, T, D], experts [B, K]) -> [B, K, T, D] (each image through its K
    experts, kind 'chosen').
  split_rngs: the rng streams drawn per expert, of 'params' (experts start different)
  and 'dropout' (each expert's buffer its own mask; otherwise one [G*C, H] mask shared by
  all experts, as the reference's vmap without split dropout).
  """
  mlp_dim: int
  num_experts: int
  dropout_rate: float = 0.0
  split_rngs: tuple[str, ...] = ()
  compute_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: Array, *, train: bool, group_sizes=None, experts=None) -> Array:
    dense = lambda n, name: ExpertDense(n, self.num_experts, 'params' in self.split_rngs,
                                        self.compute_dtype, name=name)
    d = x.shape[-1]
    h, buffers = x, group_sizes is None and experts is None
    if buffers:
      g, e, c, _ = x.shape
      # [E, G*C, D]: each expert's buffer is contiguous, the layout expert parallelism
      # shards on its leading axis.
      h = jnp.swapaxes(x, 0, 1).reshape(e, g * c, d)
    elif experts is not None:
      h = jnp.broadcast_to(x[:, None], (x.shape[0], experts.shape[1], *x.shape[1:]))
    # One mask shared by the experts (axis 0 of the buffers, K of the chosen experts);
    # ragged rows have no expert axis to share it over: each row draws its own.
    shared = ()
    if 'dropout' not in self.split_rngs:
      shared = (0,) if buffers else (1,) if experts is not None else ()
    dropout = nn.Dropout(self.dropout_rate, broadcast_dims=shared, deterministic=not train)
    h = nn.gelu(dense(self.mlp_dim, 'Dense_0')(h, group_sizes, experts))
    h = dropout(h)
    h = dense(d, 'Dense_1')(h, group_sizes, experts)
    h = dropout(h)
    if buffers:
      h = jnp.swapaxes(h.reshape(e, g, c, d), 0, 1)
    return h


class MlpBlock(nn.Module):
  """Dense MLP, D -> H -> D with tanh-approximated GELU (flax's default)."""
  mlp_dim: int
  dropout_rate: float = 0.0
  compute_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    d = x.shape[-1]
    dense = lambda n, name: nn.Dense(n, kernel_init=KERNEL_INIT, bias_init=BIAS_INIT,
                                     dot_general=precision.dot_general(self.compute_dtype),
                                     name=name)
    x = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = dense(d, 'Dense_1')(x)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)
