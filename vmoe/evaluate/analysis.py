"""Routing analysis (ViMoE-style): which MoE layers specialise by class, and which do not.

Per MoE layer, over an eval split, from the routing each token actually got:
- expert load histogram (share of routed token assignments per expert),
- class x expert counts (heatmap), normalised per class,
- routing entropy: of the aggregate load (1 = perfectly balanced) and of the per-token
  router softmax (low = confident),
- fraction of tokens dropped (processed by no expert),
- specialisation: mutual information between the token's class and the expert it goes
  to, divided by the class entropy (0 = experts ignore the class, 1 = the expert
  determines the class),
- a recommendation: layers whose specialisation is below `threshold` x the best layer's
  are candidates to make dense or remove (ViMoE keeps the layers that specialise),
- for routers trained with super-classes (Mobile V-MoE), the super-class x expert counts:
  does each super-class go to its own expert?

A token's class: a classifier's image label; a segmenter's majority pixel class of the
token's patch (patch_labels; ViMoE finds that shallow MoE layers do not specialise by it),
none for its class token and for patches of ignored pixels only.
"""
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from vmoe.data import ade20k
from vmoe.data import digit_scenes
from vmoe.nn import spec as spec_lib
from vmoe.train import evaluator
from vmoe.utils import files

# Pixel class names of the segmentation datasets, by TFDS name: the heatmaps' rows.
CLASS_NAMES = {'digit_scenes': digit_scenes.CLASS_NAMES, 'ade20k': ade20k.CLASS_NAMES}
Batch = Mapping[str, np.ndarray]


class RoutingStats:
  """Accumulates routing counts of one MoE layer over batches."""

  def __init__(self, num_classes: int, num_experts: int):
    self.class_expert = np.zeros((num_classes, num_experts), np.int64)
    self.tokens = 0
    self.dropped = 0
    self.gate_entropy_sum = 0.0
    self.gate_entropy_count = 0

  def add(self, buffer_slot: np.ndarray, labels: np.ndarray, valid: np.ndarray,
          logits: Optional[np.ndarray] = None):
    """buffer_slot: [G, S, E] (-1 = not routed); valid: [B] of the batch's images;
    labels: [B] per image (every token gets its image's) or [B, T] per token (-1: no
    class, e.g. a class token: counted as routed or dropped, not by class).

    Groups hold whole images in order, so token i of the flattened [G * S] belongs to
    image i // T with T = G * S / B.
    """
    g, s, e = buffer_slot.shape
    routed = (buffer_slot >= 0).reshape(g * s, e)
    b = valid.shape[0]
    t = g * s // b
    if labels.ndim == 1:
      labels = np.repeat(labels[:, None], t, axis=1)
    if labels.shape != (b, t):
      raise ValueError(f'Per-token labels of shape {labels.shape} do not match the '
                       f'{b} images x {t} tokens of the routing.')
    img_valid = np.repeat(valid, t).astype(bool)
    routed, token_labels = routed[img_valid], labels.reshape(-1)[img_valid]
    counted = routed & (token_labels >= 0)[:, None]
    np.add.at(self.class_expert, (token_labels[:, None].repeat(e, 1)[counted],
                                  np.broadcast_to(np.arange(e), routed.shape)[counted]), 1)
    self.tokens += int(img_valid.sum())
    self.dropped += int((~routed.any(axis=1)).sum())
    if logits is not None and logits.ndim == 3:
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      ent = -(p * np.log(p + 1e-12)).sum(-1).reshape(-1)
      if ent.shape[0] == img_valid.shape[0]:  # Per-token logits.
        ent = ent[img_valid]
      elif ent.shape[0] == valid.shape[0]:  # Per-image logits (per-image routing).
        ent = ent[valid.astype(bool)]
      self.gate_entropy_sum += float(ent.sum())
      self.gate_entropy_count += int(ent.shape[0])

  def summary(self, superclasses: Optional[Sequence[int]] = None) -> dict:
    """superclasses: class -> super-class table, to also count super-class x expert."""
    counts = self.class_expert.astype(np.float64)
    e = counts.shape[1]
    total = counts.sum()
    load = counts.sum(0) / max(total, 1)
    p = counts / max(total, 1)
    pc, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pc @ pe)[nz])).sum())
    h_class = float(-(pc[pc > 0] * np.log(pc[pc > 0])).sum())
    h_load = float(-(load[load > 0] * np.log(load[load > 0])).sum())
    return {
        'expert_load': load.tolist(),
        'load_entropy': h_load / np.log(e) if e > 1 else 1.0,
        'gate_entropy': (self.gate_entropy_sum / self.gate_entropy_count
                         if self.gate_entropy_count else None),
        'dropped_fraction': self.dropped / max(self.tokens, 1),
        'mutual_information': mi,
        'specialisation': mi / h_class if h_class > 0 else 0.0,
        'class_expert_counts': self.class_expert.tolist(),
        **({'superclass_expert_counts': _group_rows(self.class_expert, superclasses).tolist()}
           if superclasses is not None else {}),
    }


def _group_rows(class_expert: np.ndarray, superclasses: Sequence[int]) -> np.ndarray:
  table = np.asarray(superclasses)
  out = np.zeros((table.max() + 1, class_expert.shape[1]), np.int64)
  np.add.at(out, table, class_expert)
  return out


def moe_intermediates(inter: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """Sown tree -> {'encoderblock_i': {'buffer_slot', 'combine_weight', 'logits'}}."""
  out = {}
  encoder = inter.get('Encoder') or {}
  # One per-image router for the whole MoE part (Mobile V-MoE): its logits are every
  # MoE layer's.
  shared = (encoder.get('image_router') or {}).get('logits')
  for name, block in encoder.items():
    moe = block.get('Moe') if isinstance(block, Mapping) else None
    if not moe:
      continue
    layer = {k: v[0] for k, v in moe.items() if isinstance(v, tuple)}
    logits = (moe.get('Router') or {}).get('logits', shared)
    if logits is not None:
      logits = logits[0]
      # E3: each member's router logits [G, S/M, M, E/M], in token order -> [G, S, E/M].
      layer['logits'] = logits.reshape(logits.shape[0], -1, logits.shape[-1])
    out[name] = layer
  return dict(sorted(out.items(), key=lambda kv: int(kv[0].rsplit('_', 1)[-1])))


def patch_labels(labels: np.ndarray, patch_size: tuple[int, int], ignore_label: int
                 ) -> np.ndarray:
  """The majority pixel class of each patch: labels [B, H, W] int -> [B, gh * gw] int, in
  the patch embedding's (row-major) token order, -1 for a patch of ignored pixels only.

  Pixels equal to ignore_label are not counted; a tie goes to the smallest class id.
  Rows and columns past the last whole patch (H % ph, W % pw) are not in any token.
  """
  labels = np.asarray(labels)
  (b, h, w), (ph, pw) = labels.shape, patch_size
  gh, gw = h // ph, w // pw
  # [B, gh, ph, gw, pw] -> one row of ph * pw pixels per patch.
  pixels = labels[:, :gh * ph, :gw * pw].reshape(b, gh, ph, gw, pw)
  pixels = pixels.transpose(0, 1, 3, 2, 4).reshape(b * gh * gw, ph * pw)
  keep = pixels != ignore_label
  if not keep.any():
    return -np.ones((b, gh * gw), np.int64)
  k = int(pixels[keep].max()) + 1
  patch = np.broadcast_to(np.arange(pixels.shape[0])[:, None], pixels.shape)
  counts = np.bincount(patch[keep] * k + pixels[keep], minlength=pixels.shape[0] * k)
  counts = counts.reshape(pixels.shape[0], k)
  return np.where(keep.any(axis=1), counts.argmax(axis=1), -1).reshape(b, gh * gw)


def token_labels(labels: np.ndarray, spec: spec_lib.ModelSpec, ignore_label: int
                 ) -> np.ndarray:
  """A segmenter's per-token classes [B, T] from its pixel labels [B, H, W]: the patches'
  (patch_labels), after -1 for the class token if the model has one."""
  out = patch_labels(labels, spec.patch_size, ignore_label)
  if spec.classifier == 'token':  # Token 0.
    out = np.concatenate([-np.ones_like(out[:, :1]), out], axis=1)
  return out


def collect(forward, params, iterable, num_classes: int,
            labels_of: Callable[[Batch], np.ndarray] = evaluator.labels_of
            ) -> dict[str, RoutingStats]:
  """One pass of `forward` (evaluator.Forward with intermediates) over an eval set ->
  {'encoderblock_i': RoutingStats} for every sparse MoE layer. labels_of: batch -> the
  classes of its images [B] (default: the one-hot 'labels') or of its tokens [B, T]
  (token_labels for a segmenter)."""
  stats = {}
  for batch, _, inter in forward.batches(params, iterable):
    labels, valid = labels_of(batch), batch['__valid__']
    for layer, out in moe_intermediates(inter).items():
      if 'buffer_slot' not in out:
        continue  # Soft MoE: no token-to-expert assignment to count.
      if layer not in stats:
        stats[layer] = RoutingStats(num_classes, out['buffer_slot'].shape[-1])
      stats[layer].add(out['buffer_slot'], labels, valid, out.get('logits'))
  return stats


def recommend(summaries: Mapping[str, dict], threshold: float = 0.5) -> dict:
  """Layers that specialise (keep as MoE) and those that do not (make dense)."""
  if not summaries:
    return {'keep_moe': [], 'make_dense': [], 'threshold': threshold}
  best = max(s['specialisation'] for s in summaries.values())
  cut = threshold * best
  keep = [k for k, s in summaries.items() if s['specialisation'] >= cut]
  return {'keep_moe': keep, 'make_dense': [k for k in summaries if k not in keep],
          'threshold': threshold, 'best_specialisation': best}


def plot_layers(summaries: Mapping[str, dict], path: str, class_names=None):
  """PNG: per layer, the load histogram and the class x expert heatmap (row-normalised)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(summaries)
  fig, axes = plt.subplots(2, n, figsize=(3.2 * n + 1, 6.5), squeeze=False)
  for j, (layer, s) in enumerate(summaries.items()):
    load = np.asarray(s['expert_load'])
    axes[0, j].bar(range(len(load)), load)
    axes[0, j].set_title(f'{layer}\nspec. {s["specialisation"]:.2f}, '
                         f'dropped {s["dropped_fraction"]:.1%}', fontsize=9)
    axes[0, j].set_xlabel('expert')
    axes[0, j].set_ylabel('share of assignments')
    counts = np.asarray(s['class_expert_counts'], np.float64)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    im = axes[1, j].imshow(rates, aspect='auto', cmap='magma', vmin=0)
    axes[1, j].set_xlabel('expert')
    axes[1, j].set_ylabel('class')
    if class_names:
      axes[1, j].set_yticks(range(len(class_names)), class_names, fontsize=6)
    fig.colorbar(im, ax=axes[1, j], fraction=0.046)
  fig.tight_layout()
  files.save_figure(fig, path)


def plot_summary(summaries: Mapping[str, dict], path: str):
  """PNG: per layer, specialisation, load and gate entropy, and fraction dropped."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  layers = list(summaries)
  keys = ('specialisation', 'load_entropy', 'gate_entropy', 'dropped_fraction')
  fig, ax = plt.subplots(figsize=(2 + 1.6 * len(layers), 3.5))
  width = 0.8 / len(keys)
  for i, key in enumerate(keys):
    values = [summaries[layer][key] or 0.0 for layer in layers]
    ax.bar(np.arange(len(layers)) + (i - 1.5) * width, values, width, label=key)
  ax.set_xticks(range(len(layers)), layers, fontsize=8)
  ax.legend(fontsize=7)
  ax.set_title('Routing per MoE layer (gate entropy in nats)', fontsize=9)
  fig.tight_layout()
  files.save_figure(fig, path)


def plot_superclasses(summaries: Mapping[str, dict], path: str):
  """PNG: per layer, the share of each super-class's images sent to each expert."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(summaries), figsize=(3.4 * len(summaries) + 1, 3.2),
                           squeeze=False)
  for ax, (layer, s) in zip(axes[0], summaries.items()):
    counts = np.asarray(s['superclass_expert_counts'], np.float64)
    im = ax.imshow(counts / np.maximum(counts.sum(1, keepdims=True), 1), cmap='magma',
                   vmin=0, vmax=1, aspect='auto')
    ax.set_title(layer, fontsize=9)
    ax.set_xlabel('expert')
    ax.set_ylabel('super-class')
    fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  files.save_figure(fig, path)
