"""MLPs: the dense ViT MLP and E experts stacked on a leading axis (one code path)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

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
  """E independent dense layers. x: [E, M, D_in] -> [E, M, features]."""
  features: int
  num_experts: int
  split_rngs: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    e, d = self.num_experts, x.shape[-1]
    kernel = self.param('kernel', _stacked(KERNEL_INIT, e, self.split_rngs),
                        (e, d, self.features))
    bias = self.param('bias', _stacked(BIAS_INIT, e, self.split_rngs), (e, self.features))
    return jnp.einsum('emd,edh->emh', x, kernel) + bias[:, None, :]


class ExpertMlp(nn.Module):
  """E expert MLPs (D -> H -> D, tanh-GELU). x: [G, E, C, D] -> [G, E, C, D]."""
  mlp_dim: int
  num_experts: int
  dropout_rate: float = 0.0
  split_rngs: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    g, e, c, d = x.shape
    # [E, G*C, D]: each expert's buffer is contiguous, the layout expert parallelism
    # shards on its leading axis.
    h = jnp.swapaxes(x, 0, 1).reshape(e, g * c, d)
    h = ExpertDense(self.mlp_dim, e, self.split_rngs, name='Dense_0')(h)
    h = nn.gelu(h)
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = ExpertDense(d, e, self.split_rngs, name='Dense_1')(h)
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return jnp.swapaxes(h.reshape(e, g, c, d), 0, 1)


class MlpBlock(nn.Module):
  """Dense MLP, D -> H -> D with tanh-approximated GELU (flax's default)."""
  mlp_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    d = x.shape[-1]
    dense = lambda n, name: nn.Dense(n, kernel_init=KERNEL_INIT,
                                     bias_init=BIAS_INIT, name=name)
    x = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = dense(d, 'Dense_1')(x)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)
