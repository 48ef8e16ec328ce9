"""Vision Transformer with optional MoE blocks; parameter tree of the released V-MoE.

Names follow google-research/vmoe and vision_transformer (embedding, cls,
Encoder/posembed_input, Encoder/encoderblock_{i}/{LayerNorm_0, SelfAttention, LayerNorm_1,
Mlp | Moe}, Encoder/encoder_norm, pre_logits, head), so released checkpoints load as is.
With encoder.scan, repeated blocks live under Encoder/scan_{a}_{p}x{r}/block_{j} with a
leading layer axis instead (vmoe/nn/scan.py converts between the two). A segmenter's
decoder (vmoe/nn/decoders.py) lives under `decoder`, in place of pre_logits and head.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmoe.nn import decoders
from vmoe.nn import moe as moe_lib
from vmoe.nn import precision
from vmoe.nn import scan as scan_lib
from vmoe.nn import spec as spec_lib
from vmoe.nn.mlp import MlpBlock
from vmoe.nn.routers import per_image

Array = jax.Array
CLASSIFIERS = ('token', 'gap', '0', 'map')
POSITION_EMBS = ('learned', 'sincos2d', 'none')
# model.encoder.remat -> what a block's backward pass keeps instead of recomputing
# ('full': only the block's input; 'dots': matmul outputs; 'dots_no_batch': those without
# batch dimensions, i.e. projections but not attention scores or expert buffers).
REMAT = {'none': None, 'full': jax.checkpoint_policies.nothing_saveable,
         'dots': jax.checkpoint_policies.checkpoint_dots,
         'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def sincos2d(h: int, w: int, d: int, temperature: float = 10_000.) -> Array:
  """[h * w, d] fixed 2D sin-cos position embedding (MoCo v3)."""
  if d % 4 or d < 8:
    raise ValueError(f'sincos2d position embedding needs hidden_size % 4 == 0 and >= 8, '
                     f'got {d}; use position_emb.name="learned".')
  y, x = jnp.mgrid[:h, :w].astype(jnp.float32)
  omega = 1.0 / temperature ** (jnp.arange(d // 4) / (d // 4 - 1))
  x = jnp.outer(x.ravel(), omega)
  y = jnp.outer(y.ravel(), omega)
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=-1)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + Mlp(LN(x)) or x + Moe(LN(x)).

  spec: the encoder's; moe: this block's MoE layer, or None for a dense block.
  """
  spec: spec_lib.EncoderSpec
  moe: Optional[spec_lib.MoeSpec] = None
  moe_sharding: Optional[moe_lib.Sharding] = None

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array], routing, train: bool):
    """x: [B, T, D] -> ([B, T, D], metrics or None). routing: the encoder's per-image
    decision (routing.ImageRouting) or None. Positional: nn.remat needs train static
    (static_argnums)."""
    spec = self.spec
    y = nn.LayerNorm(name='LayerNorm_0')(x)
    dot_general = precision.dot_general(spec.compute_dtype)  # Projections; softmax in f32.
    y = nn.MultiHeadDotProductAttention(
        num_heads=spec.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        broadcast_dropout=False, dropout_rate=spec.attention_dropout_rate,
        normalize_qk=spec.attention_qk_norm, deterministic=not train,
        qkv_dot_general=dot_general, out_dot_general=dot_general,
        name='SelfAttention')(y, y)
    x = x + nn.Dropout(spec.dropout_rate, deterministic=not train)(y)
    y = nn.LayerNorm(name='LayerNorm_1')(x)
    if self.moe is None:
      return x + MlpBlock(spec.mlp_dim, spec.dropout_rate, spec.compute_dtype,
                          name='Mlp')(y, train=train), None
    rate = spec.dropout_rate if self.moe.dropout_rate is None else self.moe.dropout_rate
    y, metrics = moe_lib.MoeLayer(self.moe, spec.mlp_dim, rate,
                                  spec.compute_dtype, self.moe_sharding, name='Moe')(
                                      y, train=train, labels=labels, routing=routing)
    return x + y, metrics


def remat_block(remat: str):
  """EncoderBlock, or it under nn.remat: the backward pass recomputes what the policy
  does not save (REMAT), trading compute for activation memory."""
  if remat == 'none':
    return EncoderBlock
  return nn.remat(EncoderBlock, policy=REMAT[remat], static_argnums=(4,))  # self=0.


class _Unit(nn.Module):
  """One step of a scanned segment: blocks `block_{j}` in turn (vmoe/nn/scan.py); with
  remat, the whole unit is rematerialised.

  __call__(x [B, T, D], labels, routing) -> (x, tuple of each block's metrics or None).
  """
  spec: spec_lib.EncoderSpec
  moe: tuple[Optional[spec_lib.MoeSpec], ...]  # Of each block of the unit.
  moe_sharding: Optional[moe_lib.Sharding]
  train: bool

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array], routing):
    metrics = []
    for j, moe in enumerate(self.moe):
      x, m = EncoderBlock(self.spec, moe, self.moe_sharding, name=f'block_{j}')(
          x, labels, routing, self.train)
      metrics.append(m)
    return x, tuple(metrics)


class Encoder(nn.Module):
  """Position embedding, blocks, final LayerNorm. MoE blocks at `spec.moe_layers`.

  spec.scan: run repeated units of blocks with nn.scan (vmoe/nn/scan.py: names, layout);
  spec.remat: a REMAT policy name applied to every block (every unit when scanned).
  With one per-image router for the whole MoE part (spec.moe.model_router, Mobile V-MoE)
  the encoder routes the images once, `image_router` reading the tokens entering the
  first MoE block (after `image_router_norm`), and hands the decision to every MoE block;
  its metrics are metrics['image_router']. E3 (spec.moe.ensemble_size M > 1) repeats
  every image M times (jnp.repeat, axis 0) before the first MoE block, as the reference:
  from there on x is [B*M, T, D] (vmoe/nn/ensemble.py). It also returns the outputs of
  blocks spec.feature_layers (a segmenter's 'fpn' decoder reads them).
  """
  spec: spec_lib.EncoderSpec
  moe_sharding: Optional[moe_lib.Sharding] = None

  def segments(self) -> tuple[scan_lib.Segment, ...]:
    """The scanned segments (none without scan); MoE blocks differ from dense ones."""
    if not self.spec.scan:
      return ()
    n = self.spec.num_layers
    kinds = [i in self.spec.moe_layers for i in range(n)]
    # No segment spans a cut: the image router reads the input of the first MoE block
    # and E3 repeats it; a feature layer's output must exist outside the scan.
    cuts = {i + 1 for i in self.spec.feature_layers} | {self._first_moe_block()}
    bounds = [0, *sorted(c for c in cuts if c is not None and 0 < c < n), n]
    return tuple(s._replace(start=s.start + a) for a, b in zip(bounds, bounds[1:])
                 for s in scan_lib.layout(kinds[a:b]))

  def _first_moe_block(self) -> Optional[int]:
    """The block before which the encoder routes the images (model router) or repeats
    the batch for the ensemble members (E3); None if it does neither."""
    moe = self.spec.moe
    if moe is None or not (moe.model_router or moe.ensemble_size > 1):
      return None
    return min(self.spec.moe_layers)

  @nn.compact
  def __call__(self, x: Array, grid: tuple[int, int], *, train: bool,
               labels: Optional[Array] = None):
    """x: [B, T, D] (T = h*w, or h*w + 1 with a class token) -> ([B, T, D], metrics,
    features: the [B, T, D] outputs of blocks spec.feature_layers, in order)."""
    spec = self.spec
    if spec.position_emb == 'learned':
      x = _AddPositionEmbs(name='posembed_input')(x)
    elif spec.position_emb == 'sincos2d':
      emb = sincos2d(*grid, x.shape[-1], spec.position_temperature).astype(x.dtype)
      # A class token, if any, is first and gets no position embedding.
      emb = jnp.pad(emb, ((x.shape[1] - emb.shape[0], 0), (0, 0)))
      x = x + emb[None]
    x = nn.Dropout(spec.dropout_rate, deterministic=not train)(x)
    metrics, routing, features = {}, None, []
    segments = {s.start: s for s in self.segments()}
    i = 0
    while i < spec.num_layers:
      if i == self._first_moe_block() and spec.moe.model_router:
        routing, metrics['image_router'] = self._route_images(x, train, labels)
      elif i == self._first_moe_block():  # E3: M rows per image from here on.
        x = jnp.repeat(x, spec.moe.ensemble_size, axis=0)
        labels = None if labels is None else jnp.repeat(labels, spec.moe.ensemble_size)
      seg = segments.get(i)
      if seg is None:
        x, m = remat_block(spec.remat)(spec, spec.moe_at(i), self.moe_sharding,
                                       name=f'encoderblock_{i}')(x, labels, routing, train)
        if m is not None:
          metrics[f'encoderblock_{i}'] = m
        i += 1
      else:
        x, ms = self._scan(seg, train)(x, labels, routing)
        for k in range(seg.repeats):  # Per-layer metrics keep their unscanned keys.
          for j, m in enumerate(ms):
            if m is not None:
              metrics[f'encoderblock_{seg.layer(k, j)}'] = jax.tree.map(lambda v: v[k], m)
        self._unscan_intermediates(seg)
        i += seg.period * seg.repeats
      if i - 1 in spec.feature_layers:  # No segment runs past one (segments).
        features.append(x)
    layers = sorted((k for k in metrics if k.startswith('encoderblock_')),
                    key=lambda k: int(k.rsplit('_', 1)[1]))
    aux = [metrics[k]['auxiliary_loss'] for k in layers + ['image_router']
           if 'auxiliary_loss' in metrics.get(k, {})]
    metrics['auxiliary_loss'] = sum(aux[1:], aux[0]) if aux else jnp.zeros((), x.dtype)
    return nn.LayerNorm(name='encoder_norm')(x), metrics, tuple(features)

  @nn.nowrap
  def _route_images(self, x: Array, train: bool, labels: Optional[Array]):
    """x: [B, T, D] entering the first MoE block -> (ImageRouting, [G] metrics)."""
    moe = self.spec.moe
    b, t, d = x.shape
    xg = nn.LayerNorm(name='image_router_norm')(x).reshape(b * t // moe.group_size,
                                                           moe.group_size, d)
    if self.moe_sharding is not None:
      xg = self.moe_sharding.groups(xg)
    return per_image.PerImageRouter(**moe.router_kwargs(), name='image_router')(
        xg, train=train, labels=labels)

  def _scan(self, seg: scan_lib.Segment, train: bool) -> nn.Module:
    remat = self.spec.remat
    # prevent_cse=False: inside a scan, CSE cannot move the recomputation forward.
    unit = nn.scan(
        _Unit if remat == 'none' else nn.remat(_Unit, policy=REMAT[remat],
                                               prevent_cse=False),
        variable_axes={'params': 0, 'intermediates': 0},
        split_rngs={'params': True, 'dropout': True, 'gating': True},
        in_axes=nn.broadcast, length=seg.repeats)
    moe = tuple(self.spec.moe_at(seg.start + j) for j in range(seg.period))
    return unit(self.spec, moe, self.moe_sharding, train, name=seg.name)

  def _unscan_intermediates(self, seg: scan_lib.Segment):
    """Also sow the segment's intermediates (e.g. routing) per block under
    `encoderblock_{i}`, as unscanned, so that tools reading them need not know scan."""
    if not self.is_mutable_collection('intermediates'):
      return
    inter = self.variables.get('intermediates', {}).get(seg.name, {})
    for j in range(seg.period):
      for k in range(seg.repeats):
        tree = jax.tree.map(lambda v: v[k], inter.get(f'block_{j}', {}))
        if tree:
          self.sow('intermediates', f'encoderblock_{seg.layer(k, j)}', tree,
                   init_fn=dict, reduce_fn=lambda _, new: new)


class _AddPositionEmbs(nn.Module):
  """Learned position embedding, param `pos_embedding` [1, T, D]."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x + self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                          (1,) + x.shape[1:])


class MapHead(nn.Module):
  """Multihead attention pooling with a learned probe (big_vision's MAP head); qk_norm:
  LayerNorm on its queries and keys (the encoder's attention_qk_norm, as the reference)."""
  num_heads: int
  mlp_dim: int
  qk_norm: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, T, D] -> [B, D]."""
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
    probe = jnp.tile(probe, (x.shape[0], 1, 1))
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        normalize_qk=self.qk_norm, name='MultiHeadDotProductAttention')(probe, x)
    y = MlpBlock(self.mlp_dim, name='Mlp')(nn.LayerNorm(name='LayerNorm')(x), train=False)
    return (x + y)[:, 0]


class VisionTransformerMoe(nn.Module):
  """ViT classifier; with MoE layers (spec.encoder.moe_layers) it is a V-MoE; with a
  decoder (spec.segmenter) a segmenter.

  __call__(images [B, H, W, 3], train, labels) -> (logits [B, num_classes], metrics);
  a segmenter's logits are float32 [B, H, W, num_classes], from its decoder on the patch
  tokens (the class token, if any, dropped; vmoe/nn/decoders.py), and its labels are not
  read (no router of a segmenter learns from them: models.resolve). E3
  (VisionTransformerMoeEnsemble, spec.ensemble_size M > 1): logits [B*M, num_classes],
  row b*M + m member m of image b, as the reference (vmoe.train.losses combines them).
  spec: the resolved model (vmoe.nn.models.resolve(config, image_size=(H, W))).
  metrics['auxiliary_loss'] is [G] (summed over MoE layers) and metrics[block] holds each
  MoE layer's [G] metrics. In training, rngs 'dropout' and 'gating' are needed; labels
  (int [B]) only feed routers that learn from them (super-class guided per-image routing).
  moe_sharding: where the MoE layers' groups and experts live on a device mesh (set by
  the trainer from config.mesh, vmoe.parallel.mesh.moe_sharding), or None.
  """
  spec: spec_lib.ModelSpec
  moe_sharding: Optional[moe_lib.Sharding] = None

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False, labels: Optional[Array] = None):
    spec = self.spec
    if tuple(images.shape[1:3]) != spec.image_size:
      raise ValueError(f'The model was resolved for {spec.image_size} images, got images '
                       f'of shape {images.shape}; resolve it for this size '
                       '(vmoe.nn.models.resolve(config, image_size=...)).')
    spec.groups(images.shape[0])  # A ValueError if the groups do not tile the batch.
    x = nn.Conv(spec.hidden_size, spec.patch_size, strides=spec.patch_size,
                padding='VALID', name='embedding')(images)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    if spec.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d))
      x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], axis=1)
    x, metrics, features = Encoder(spec.encoder, self.moe_sharding, name='Encoder')(
        x, (h, w), train=train, labels=None if spec.segmenter else labels)
    if spec.segmenter:
      grid = lambda y: y[:, y.shape[1] - h * w:].reshape(b, h, w, d)  # No class token.
      decoder = decoders.DECODERS[spec.decoder.name](spec, name='decoder')
      return decoder(grid(x), tuple(map(grid, features))), metrics
    if spec.classifier in ('token', '0'):
      x = x[:, 0]
    elif spec.classifier == 'gap':
      x = jnp.mean(x, axis=1)
    else:  # 'map'
      x = MapHead(spec.encoder.num_heads, spec.encoder.mlp_dim,
                  spec.encoder.attention_qk_norm, name='MapHead')(x)
    if spec.representation_size is not None:
      x = jnp.tanh(nn.Dense(spec.representation_size, name='pre_logits')(x))
    # The representation, for few-shot probes of this model (vmoe.train.fewshot).
    self.sow('intermediates', 'representation', x)
    if not spec.num_classes:
      return x, metrics
    kernel_init = (nn.initializers.zeros if spec.head_kernel_zero_init
                   else nn.linear.default_kernel_init)
    logits = nn.Dense(spec.num_classes, kernel_init=kernel_init,
                      bias_init=nn.initializers.constant(spec.head_bias_init),
                      name='head')(x)
    return logits, metrics
