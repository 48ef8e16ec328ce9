"""Forward FLOPs per image of a (V-MoE) ViT, from its resolved spec and actual capacity.

One multiply-add counts as 2 FLOPs. Counted: patch embedding, attention (projections,
scores, weighted sum), dense MLPs, routers, the expert MLPs of MoE layers (every buffer
slot an expert processes, filled or not, so it follows the capacity actually used), shared
experts, Soft MoE's dispatch and combine (weighted sums that are part of its algorithm),
MAP head, pre-logits and head, or a segmenter's decoder instead (its dense layers and
convolutions: vmoe.nn.decoders.flops_per_image). Not counted: LayerNorm, softmax, GELU,
residual adds, resizes and the sparse dispatch/combine data movement, whose cost depends
on the dispatch kind and the hardware (with 'indices' dispatch it is a gather, no
multiply-adds). E3 (ensemble_size M):
every block from the first MoE block on, and the head, run once per member, M times.
"""
from vmoe.nn import decoders
from vmoe.nn import spec as spec_lib


def _attention(t: int, d: int, t_kv: int = None) -> int:
  t_kv = t if t_kv is None else t_kv
  proj = 2 * t * d * d + 2 * 2 * t_kv * d * d + 2 * t * d * d  # q; k, v; out
  return proj + 2 * 2 * t * t_kv * d  # scores and weighted values


def moe_slots_per_image(spec: spec_lib.ModelSpec) -> float:
  """E * C token buffer slots per image of every MoE layer (the same for all layers); the
  K x T tokens of its chosen experts for per-image routing that always runs them. E3:
  per image copy (one member's)."""
  moe = spec.encoder.moe
  if moe.slots == 'images' and moe.chosen_experts == 'always':
    return moe.num_selected_experts * spec.tokens_per_image
  copies_per_group = moe.group_size / spec.tokens_per_image
  return moe.num_experts * moe.token_slots / copies_per_group


def flops_per_image(spec: spec_lib.ModelSpec) -> float:
  """Forward FLOPs of one image of a model resolved for its image size (see the module
  docstring for what is counted)."""
  (ph, pw), (gh, gw) = spec.patch_size, spec.grid
  d, enc, t = spec.hidden_size, spec.encoder, spec.tokens_per_image
  total = 2 * gh * gw * ph * pw * 3 * d  # Patch embedding.
  mlp = 2 * 2 * d * enc.mlp_dim  # Per token: D -> H -> D.
  m, copies = spec.ensemble_size, spec.copies_at
  for i in range(enc.num_layers):
    total += _attention(t, d) * copies(i)
    moe = enc.moe_at(i)
    if moe is None:
      total += mlp * t * copies(i)
      continue
    slots = moe_slots_per_image(spec)
    if moe.slots == 'soft':
      # Logits, then the dispatch and combine weighted sums: each token meets every slot
      # of its group, i.e. E * P slots (= slots per image x images per group).
      router = 3 * 2 * t * d * (slots * moe.group_size / t)
    elif moe.slots == 'images':  # One router for all MoE layers with scope 'model'.
      first = i == min(enc.moe_layers)
      router = 2 * d * moe.num_experts if first or not moe.model_router else 0
    else:  # E3: each copy's router scores its member's E / M experts.
      router = 2 * t * d * moe.num_experts // m
    total += (router + mlp * slots + moe.shared_experts * mlp * t) * m
  if spec.segmenter:
    return float(total + decoders.flops_per_image(spec.decoder, spec))
  head = 0
  if spec.classifier == 'map':
    head += _attention(1, d, t) + mlp
  if spec.representation_size:
    head += 2 * d * spec.representation_size
    d = spec.representation_size
  if spec.num_classes:
    head += 2 * d * spec.num_classes
  return float(total + head * copies(enc.num_layers))
