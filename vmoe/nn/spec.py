"""The resolved description of a model: what vmoe.nn.models.resolve makes of a config.

Frozen dataclasses; the model (vit.py, moe.py, decoders.py), its routers, the input
checks, FLOPs, the planner and the evaluator read them instead of the config. Every
default is filled in, every derived number (tokens per image, capacity, groups) computed
once, in vmoe.nn.models. `image_size` is None for a spec resolved from the config alone
(enough to validate it); a model is built from a spec resolved for its image size.
"""
import dataclasses
from typing import Any, Optional

from vmoe.nn import routers


# chosen_experts='auto' runs the chosen-experts path while the batch's image choices per
# expert (B x K / E) stay at most this; measured by benchmarks/per_image_latency.py.
CHOSEN_AUTO_MAX_IMAGES = 1


@dataclasses.dataclass(frozen=True)
class CapacityRule:
  """How many slots each expert gets: `capacity`, or `factor` x the slots a group needs
  / E, rounded up ('ceil') or to the nearest ('round'), then up to a multiple of
  `multiple_of` (dispatcher.capacity* keys; Soft MoE: its num_slots / capacity_factor)."""
  capacity: Optional[int]
  factor: Optional[float]
  ceil_or_round: str
  multiple_of: Optional[int]


@dataclasses.dataclass(frozen=True)
class MoeSpec:
  """One MoE layer (every MoE layer of a model has the same one).

  router: a class name of vmoe.nn.routers.ROUTERS; options: its options, defaults filled
  in (e.g. (('num_selected_experts', 2), ('noise_std', 1.0), ...); a super-class file is
  resolved to its class -> super-class table). dispatch: 'einsum' | 'indices' | 'ragged' |
  'soft' (vmoe.nn.routing.DISPATCHERS). bfloat16: tokens and expert outputs move through
  dispatch and combine in bfloat16 (weights and sums stay float32). split_rngs: the rng
  streams drawn per expert ('params': experts start different; 'dropout': independent
  masks), the others shared by all experts. dropout_rate: the experts' dropout (None: the
  encoder's). inert: the accepted options that have no effect here, as 'key: why'
  (vmoe.nn.routers.INERT), for the start-up log. chosen_experts (per-image routing only):
  when the layer runs each image through its K experts' gathered weights instead of
  capacity buffers (routing.Chosen): 'auto' (at inference, for batches of at most
  CHOSEN_AUTO_MAX_IMAGES images per expert, where it is faster: docs/performance.md),
  'always' (training too) or 'never'. tokens_per_image (T), class_token (token 0 of each
  image is the class token) and capacity (C slots per expert: tokens, images for
  per-image routing, mixed slots for Soft MoE) are set once the image size is known.
  ensemble_size (E3, VisionTransformerMoeEnsemble): M members, each with its own E / M
  experts and router (vmoe/nn/ensemble.py); a group holds all M copies of its images,
  so group_size counts the copies. 1 for any other model.
  """
  num_experts: int
  group_size: int
  router: str
  options: tuple[tuple[str, Any], ...]
  dispatch: str
  bfloat16: bool
  batch_priority: bool
  capacity_rule: CapacityRule
  split_rngs: tuple[str, ...] = ()
  dropout_rate: Optional[float] = None
  inert: tuple[str, ...] = ()
  shared_experts: int = 0
  chosen_experts: str = 'never'
  tokens_per_image: Optional[int] = None
  class_token: bool = False
  capacity: Optional[int] = None
  ensemble_size: int = 1

  def option(self, key: str) -> Any:
    return dict(self.options)[key]

  @property
  def num_selected_experts(self) -> int:
    """K: experts per token (per image with per-image routing); 1 for routers without K."""
    return dict(self.options).get('num_selected_experts', 1)

  @property
  def bias_balancing(self) -> bool:
    """The router balances the load with a per-expert bias (load_balancing='bias')."""
    return dict(self.options).get('load_balancing') == 'bias'

  @property
  def superclasses(self) -> Optional[tuple[int, ...]]:
    return dict(self.options).get('superclasses')

  @property
  def model_router(self) -> bool:
    """One per-image routing decision for the whole MoE part (PerImageRouter with scope
    'model', Mobile V-MoE), made by the encoder before its first MoE block."""
    return dict(self.options).get('scope') == 'model'

  def uses_chosen_experts(self, num_images: int, train: bool) -> bool:
    """Whether a layer seeing `num_images` images runs the chosen-experts path."""
    if self.chosen_experts == 'auto':
      return not train and num_images * self.num_selected_experts <= (
          CHOSEN_AUTO_MAX_IMAGES * self.num_experts)
    return self.chosen_experts == 'always'

  @property
  def slots(self) -> str:
    """What fills the slots: 'choices', 'tokens', 'images' or 'soft' (vmoe.nn.routers)."""
    return routers.ROUTERS[self.router].SLOTS

  @property
  def token_slots(self) -> int:
    """Token slots per expert in a group's buffers: C, or C x T for per-image routing."""
    return self.capacity * (self.tokens_per_image if self.slots == 'images' else 1)

  def router_kwargs(self) -> dict[str, Any]:
    """The router's attributes: its options and the resolved numbers it takes."""
    resolved = dict(num_experts=self.num_experts, capacity=self.capacity,
                    batch_priority=self.batch_priority,
                    tokens_per_image=self.tokens_per_image, class_token=self.class_token)
    fields = routers.attributes(self.router)
    return {**dict(self.options), **{k: v for k, v in resolved.items() if k in fields}}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """The encoder's blocks. feature_layers: the blocks (0-based, increasing) whose output
  tokens the encoder also returns (a segmenter's 'fpn' decoder reads them); with scan no
  segment runs past one of them (vmoe.nn.vit.Encoder.segments)."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_qk_norm: bool = False
  position_emb: str = 'learned'  # 'learned' | 'sincos2d' | 'none'.
  position_temperature: float = 10_000.
  compute_dtype: str = 'float32'  # Matmul precision (vmoe/nn/precision.py).
  scan: bool = False
  remat: str = 'none'  # A vmoe.nn.vit.REMAT policy name.
  moe_layers: tuple[int, ...] = ()
  moe: Optional[MoeSpec] = None
  feature_layers: tuple[int, ...] = ()

  def moe_at(self, i: int) -> Optional[MoeSpec]:
    """The MoE layer of block i, or None for a dense block."""
    return self.moe if i in self.moe_layers else None


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  """A segmentation head on the encoder's patch tokens (vmoe/nn/decoders.py).

  name: 'linear' (a per-patch classifier, upsampled) or 'fpn' (a feature pyramid of the
  outputs of encoder blocks `layers`, 0-based and increasing, and of the final encoder
  output, with `dim` channels); 'linear' has no layers and dim None. pool_scales
  ('fpn'): UperNet's pyramid pooling module on the final output, average-pooled into
  s x s bins for each s (1: the global context) and added to its level; () for none.
  """
  name: str
  layers: tuple[int, ...] = ()
  dim: Optional[int] = None
  pool_scales: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A ViT / V-MoE classifier, or with `decoder` a segmenter (logits per pixel,
  num_classes pixel classes); `image_size` (h, w) once resolved for an input size."""
  name: str
  num_classes: Optional[int]
  patch_size: tuple[int, int]
  hidden_size: int
  encoder: EncoderSpec
  classifier: str = 'token'
  representation_size: Optional[int] = None
  head_bias_init: float = 0.0
  head_kernel_zero_init: bool = True
  image_size: Optional[tuple[int, int]] = None
  decoder: Optional[DecoderSpec] = None

  @property
  def segmenter(self) -> bool:
    """The model labels every pixel (a decoder head) instead of the image."""
    return self.decoder is not None

  @property
  def grid(self) -> tuple[int, int]:
    """Patches per column and per row of an image."""
    (h, w), (ph, pw) = self.image_size, self.patch_size
    return h // ph, w // pw

  @property
  def ensemble_size(self) -> int:
    """M: rows per image from the first MoE block on (E3), 1 for other models."""
    return self.encoder.moe.ensemble_size if self.encoder.moe else 1

  def copies_at(self, i: int) -> int:
    """Rows per image in block i (i = num_layers: the head): M from the first MoE
    block on for E3, else 1."""
    layers = self.encoder.moe_layers
    return self.ensemble_size if layers and i >= min(layers) else 1

  @property
  def tokens_per_image(self) -> int:
    """T: the patches, plus the class token with classifier 'token'."""
    gh, gw = self.grid
    return gh * gw + (self.classifier == 'token')

  def groups(self, batch_size: int) -> int:
    """MoE groups of a batch of `batch_size` images (0 for a dense model); ValueError if
    the group size does not divide the batch's tokens."""
    moe = self.encoder.moe
    if moe is None or not self.encoder.moe_layers:
      return 0
    t, s, m = self.tokens_per_image, moe.group_size, moe.ensemble_size
    n = batch_size * m * t
    if n % s:
      copies = f' x {m} ensemble members' if m > 1 else ''
      raise ValueError(
          f'model.encoder.moe.group_size={s} does not divide the {n} tokens of a batch '
          f'({batch_size} images{copies} x {t} tokens); use a multiple of {m * t} that '
          f'divides {n}.')
    return n // s
