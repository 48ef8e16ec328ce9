"""Forward FLOPs per image of a (V-MoE) ViT, from its config and the actual capacity.

One multiply-add counts as 2 FLOPs. Counted: patch embedding, attention (projections,
scores, weighted sum), dense MLPs, routers, the expert MLPs of MoE layers (every buffer
slot an expert processes, filled or not, so it follows the capacity actually used), shared
experts, Soft MoE's dispatch and combine (weighted sums that are part of its algorithm),
MAP head, pre-logits and head. Not counted: LayerNorm, softmax, GELU, residual adds and the
sparse dispatch/combine data movement, whose cost depends on the dispatch kind and the
hardware (with 'indices' dispatch it is a gather, no multiply-adds).
"""
from typing import Any, Sequence

from vmoe.nn import models
from vmoe.nn import routing


def _attention(t: int, d: int, t_kv: int = None) -> int:
  t_kv = t if t_kv is None else t_kv
  proj = 2 * t * d * d + 2 * 2 * t_kv * d * d + 2 * t * d * d  # q; k, v; out
  return proj + 2 * 2 * t * t_kv * d  # scores and weighted values


def moe_slots_per_image(config: Any, batch_size: int, image_size: Sequence[int]) -> float:
  """E * C buffer slots per image of every MoE layer (the same for all layers)."""
  c = models.validate(config)
  tokens = _tokens(c, image_size)
  moe = c['encoder']['moe']
  s, e, router = moe['group_size'], moe['num_experts'], moe['router']
  images_per_group = s / tokens
  name = router['name']
  if name == 'SoftRouter':
    slots = router.get('num_slots') or routing.compute_capacity(
        s, e, router.get('capacity_factor', 1.0), 'round', 1)
  else:
    disp = router['dispatcher']
    k = router.get('num_selected_experts', 1)
    if name == 'PerImageRouter':
      need = int(images_per_group) * k
    elif 'TopItems' in name:
      need = s
    else:
      need = s * k
    if disp.get('capacity') is not None:
      slots = disp['capacity']
    else:
      slots = routing.compute_capacity(
          need, e, disp['capacity_factor'], disp.get('capacity_ceil_or_round', 'ceil'),
          disp.get('capacity_multiple_of', 1 if name == 'PerImageRouter' else 4))
    if name == 'PerImageRouter':
      slots *= tokens  # Capacity counts images; each image brings all its tokens.
  del batch_size  # Groups hold whole images: the count per image does not depend on B.
  return e * slots / images_per_group


def _tokens(c: dict, image_size: Sequence[int]) -> int:
  (ph, pw), (h, w) = c['patch_size'], tuple(image_size)[:2]
  return (h // ph) * (w // pw) + (c.get('classifier', 'token') == 'token')


def flops_per_image(config: Any, image_size: Sequence[int], batch_size: int = 1) -> float:
  """Forward FLOPs of one image (see the module docstring for what is counted)."""
  c = models.validate(config)
  (ph, pw), (h, w) = c['patch_size'], tuple(image_size)[:2]
  d = c['hidden_size']
  enc = c['encoder']
  hdim = enc['mlp_dim']
  t = _tokens(c, image_size)
  total = 2 * (h // ph) * (w // pw) * ph * pw * 3 * d  # Patch embedding.
  moe = enc.get('moe') or {}
  moe_layers = set(moe.get('layers') or ())
  mlp = 2 * 2 * d * hdim  # Per token: D -> H -> D.
  for i in range(enc['num_layers']):
    total += _attention(t, d)
    if i in moe_layers:
      e = moe['num_experts']
      name = moe['router']['name']
      if name == 'SoftRouter':
        # Logits, then the dispatch and combine weighted sums: each token meets every slot
        # of its group, i.e. E * P slots (= slots per image x images per group).
        slots_per_group = moe_slots_per_image(c, batch_size, image_size) * moe['group_size'] / t
        router = 3 * 2 * t * d * slots_per_group
      elif name == 'PerImageRouter':
        router = 2 * d * e
      else:
        router = 2 * t * d * e
      total += router + mlp * moe_slots_per_image(c, batch_size, image_size)
      total += moe.get('shared_experts', 0) * mlp * t
    else:
      total += mlp * t
  if c.get('classifier') == 'map':
    total += _attention(1, d, t) + mlp
  if c.get('representation_size'):
    total += 2 * d * c['representation_size']
    d = c['representation_size']
  if c.get('num_classes'):
    total += 2 * d * c['num_classes']
  return float(total)
