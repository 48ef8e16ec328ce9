"""Segmentation heads: the encoder's patch tokens -> logits per pixel (model.decoder).

DECODERS[name](spec)(x, features) -> float32 logits [B, H, W, num_classes] for images of
spec.image_size (H, W); x: the final encoder output (after encoder_norm) as a patch grid
[B, gh, gw, D]; features: the outputs of blocks spec.decoder.layers, as grids too.

'linear' (Segmenter's linear baseline, a DINOv2-style linear probe): Dense(num_classes)
  per patch token, then bilinear upsampling to the input size.
  Params: decoder/head.
'fpn' (a light feature pyramid: ViTDet's simple pyramid into an FPN top-down pathway):
  n = len(layers) + 1 levels, level i at 2^(n-1-i) x the patch grid: the earliest block
  finest, the final encoder output at the grid (`scales`). Each level: LayerNorm (block
  outputs only; the final output has encoder_norm), a 1x1 lateral projection to `dim`,
  then n-1-i x2 upsamplings, each a 2x2 stride-2 transposed convolution (written as a
  Dense to 4 dim channels and a pixel shuffle: the same map, fast on every backend) and a
  GELU. The final level also gets UperNet's pyramid pooling (`pool_scales`, default
  POOL_SCALES): for each s, the final tokens average-pooled into s x s bins (as adaptive
  average pooling: bin i spans rows floor(i h / s) to ceil((i + 1) h / s)), a Dense to
  `dim` and GELU, upsampled bilinearly back to the grid and added, so that every token of
  the level sees the context of its region and of the whole image. Top-down, each level
  adds the next coarser one (nearest x2), then a 3x3 conv
  and GELU smooth it; all levels are bilinearly upsampled to the finest and summed, a
  1x1 classifier gives the logits, upsampled bilinearly to the input size. The finest
  level is at most the input's resolution: 2^(n-1) must divide the patch size (`check`).
  Params: decoder/{norm_{i} (i < n-1), lateral_{i}, up_{i}_{k} (k < n-1-i), pool_{s},
  smooth_{i}, head}.
The classifier (`head`) follows model.head_kernel_zero_init and head_bias_init, as the
classifier head of a ViT; the decoders compute in float32.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vmoe.nn import spec as spec_lib

Array = jax.Array
# UperNet's pyramid pooling bins (PSPNet's), the 'fpn' default of model.decoder.pool_scales.
POOL_SCALES = (1, 2, 3, 6)


def scales(decoder: spec_lib.DecoderSpec) -> tuple[int, ...]:
  """Upsampling of each level over the patch grid, finest first (1 for 'linear')."""
  n = len(decoder.layers) + 1
  return tuple(2 ** (n - 1 - i) for i in range(n))


def check(decoder: spec_lib.DecoderSpec, patch_size: tuple[int, int]):
  """A ValueError if the finest level of `decoder` does not tile the input, i.e. is finer
  than a pixel or between pixels: its upsampling must divide the patch size."""
  finest = scales(decoder)[0]
  if all(p % finest == 0 for p in patch_size):
    return
  g = math.gcd(*patch_size)
  most = (g & -g).bit_length() - 1  # Layers: log2 of the largest power of 2 dividing g.
  fix = (f'use at most {most} layer{"s" if most > 1 else ""}' if most
         else "use model.decoder.name='linear'")
  raise ValueError(
      f"model.decoder: 'fpn' with layers={decoder.layers} has {len(decoder.layers) + 1} "
      f'levels, the finest at {finest}x the patch grid, but model.patch_size={patch_size} '
      f'is not a multiple of {finest} (the finest level must tile the input, at most one '
      f'value per pixel); {fix}, or a patch size divisible by {finest}.')


def _head(spec: spec_lib.ModelSpec) -> nn.Dense:
  kernel_init = (nn.initializers.zeros if spec.head_kernel_zero_init
                 else nn.linear.default_kernel_init)
  return nn.Dense(spec.num_classes, kernel_init=kernel_init,
                  bias_init=nn.initializers.constant(spec.head_bias_init), name='head')


def _to_input_size(logits: Array, spec: spec_lib.ModelSpec) -> Array:
  """logits: [B, h, w, C] -> float32 [B, H, W, C], bilinear (identity if h, w = H, W)."""
  b, *_, c = logits.shape
  logits = logits.astype(jnp.float32)
  if tuple(logits.shape[1:3]) == spec.image_size:
    return logits
  return jax.image.resize(logits, (b, *spec.image_size, c), 'bilinear')


class LinearDecoder(nn.Module):
  """Per-patch classifier, upsampled (see the module docstring)."""
  spec: spec_lib.ModelSpec

  @nn.compact
  def __call__(self, x: Array, features: tuple[Array, ...]) -> Array:
    """x: [B, gh, gw, D], features: () -> [B, H, W, num_classes]."""
    del features  # Only the final encoder output.
    return _to_input_size(_head(self.spec)(x), self.spec)


def _upsample2x(x: Array, dense: nn.Dense) -> Array:
  """x: [B, h, w, D] -> [B, 2h, 2w, F]: `dense` (to 4F) puts each token's 2x2 children
  side by side in its channels; the pixel shuffle lays them out."""
  y = dense(x)
  b, h, w, c4 = y.shape
  y = y.reshape(b, h, w, 2, 2, c4 // 4).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * h, 2 * w, c4 // 4)


def pool_matrix(n: int, s: int) -> np.ndarray:
  """[s, n]: row i averages the positions floor(i n / s) .. ceil((i + 1) n / s) - 1
  (adaptive average pooling of n positions into s bins)."""
  m = np.zeros((s, n), np.float32)
  for i in range(s):
    lo, hi = (i * n) // s, -(-(i + 1) * n // s)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def _pyramid_pool(x: Array, scales: tuple[int, ...], dim: int) -> Array:
  """x: [B, h, w, D] -> [B, h, w, dim]: the sum over s of x pooled into s x s bins,
  projected (Dense `pool_{s}`, GELU) and upsampled back bilinearly."""
  b, h, w, _ = x.shape
  out = 0.0
  for s in scales:
    p = jnp.einsum('ih,bhwd,jw->bijd', pool_matrix(h, s), x, pool_matrix(w, s))
    p = nn.gelu(nn.Dense(dim, name=f'pool_{s}')(p))
    out = out + jax.image.resize(p, (b, h, w, dim), 'bilinear')
  return out


def _nearest2x(x: Array) -> Array:
  """x: [B, h, w, F] -> [B, 2h, 2w, F], each value repeated 2x2."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FpnDecoder(nn.Module):
  """Feature pyramid of several blocks' outputs (see the module docstring)."""
  spec: spec_lib.ModelSpec

  @nn.compact
  def __call__(self, x: Array, features: tuple[Array, ...]) -> Array:
    """x: [B, gh, gw, D], features: the outputs of blocks decoder.layers, each
    [B, gh, gw, D] -> [B, H, W, num_classes]."""
    decoder = self.spec.decoder
    dim, n = decoder.dim, len(decoder.layers) + 1
    levels = []
    for i, f in enumerate(features + (x,)):
      if i < n - 1:  # The final output is normalised by encoder_norm already.
        f = nn.LayerNorm(name=f'norm_{i}')(f)
      f = nn.Dense(dim, name=f'lateral_{i}')(f)
      if i == n - 1 and decoder.pool_scales:
        f = f + _pyramid_pool(x, decoder.pool_scales, dim)
      for k in range(n - 1 - i):
        f = nn.gelu(_upsample2x(f, nn.Dense(4 * dim, name=f'up_{i}_{k}')))
      levels.append(f)
    # Top-down: the coarser, more semantic levels refine the finer ones.
    for i in reversed(range(n - 1)):
      levels[i] = levels[i] + _nearest2x(levels[i + 1])
    levels = [nn.gelu(nn.Conv(dim, (3, 3), padding='SAME', name=f'smooth_{i}')(f))
              for i, f in enumerate(levels)]
    b, h, w, _ = levels[0].shape
    fused = sum(jax.image.resize(f, (b, h, w, dim), 'bilinear') for f in levels[1:])
    return _to_input_size(_head(self.spec)(levels[0] + fused), self.spec)


DECODERS = {'linear': LinearDecoder, 'fpn': FpnDecoder}


def flops_per_image(decoder: spec_lib.DecoderSpec, spec: spec_lib.ModelSpec) -> float:
  """Forward FLOPs (multiply-adds x 2) of `decoder` on one image of the model `spec`
  resolved for its image size: its dense layers and convolutions (3x3 convs with 9 taps
  at every position); the layer norms, GELUs, additions and the interpolations of the
  resizes are not counted, like the encoder's (vmoe/evaluate/flops.py)."""
  gh, gw = spec.grid
  g, d, c = gh * gw, spec.hidden_size, spec.num_classes
  if decoder.name == 'linear':
    return float(2 * g * d * c)
  dim, ups = decoder.dim, scales(decoder)
  total = sum(2 * k * k * d * dim for k in decoder.pool_scales)  # Pyramid pooling.
  for s in ups:
    total += 2 * g * d * dim  # Lateral, at the grid.
    # x2 upsamplings from the grid to s x the grid: a Dense to 4 dim per input position.
    total += sum(2 * g * 4 ** k * dim * 4 * dim for k in range(int(math.log2(s))))
    total += 2 * g * s * s * 9 * dim * dim  # Smoothing.
  return float(total + 2 * g * ups[0] ** 2 * dim * c)  # Classifier at the finest level.


def activations_per_image(spec: spec_lib.ModelSpec) -> float:
  """An estimate of the float32 values of one image that a train step keeps for the
  decoder's backward pass (vmoe/plan.py): the logits at the input size and their
  softmax, plus 'linear': the per-patch logits; 'fpn': per level its LayerNorm, lateral,
  upsampling outputs and GELUs, top-down sum, smoothing output and GELU, resized copy;
  at the finest level the sum and the classifier's logits."""
  (h, w), (gh, gw) = spec.image_size, spec.grid
  g, d, c, decoder = gh * gw, spec.hidden_size, spec.num_classes, spec.decoder
  total = 2 * h * w * c
  if decoder.name == 'linear':
    return float(total + g * c)
  dim, ups = decoder.dim, scales(decoder)
  total += sum(k * k * (d + 2 * dim) + 2 * g * dim for k in decoder.pool_scales)
  for s in ups:
    total += g * (d + dim)
    total += sum(2 * g * 4 ** (k + 1) * dim for k in range(int(math.log2(s))))
    total += 4 * g * s * s * dim
  return float(total + g * ups[0] ** 2 * (dim + c))
