"""Build models from configs in the reference's schema, validating them first.

The schema is the `model_kwargs` of google-research/vmoe (see
../shared/fixtures/vmoe_reference/*_config.json), with an optional `name`. Every bad value
is reported with one ValueError naming the key and the fix, before anything is traced.
"""
import copy
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn

from vmoe.nn import precision
from vmoe.nn import routers as routers_lib
from vmoe.nn import routing as routing_lib
from vmoe.nn import vit

MODELS = {'VisionTransformerMoe': vit.VisionTransformerMoe,
          'VisionTransformer': vit.VisionTransformerMoe}
MODEL_KEYS = ('name', 'num_classes', 'patch_size', 'hidden_size', 'encoder', 'classifier',
              'representation_size', 'head_bias_init', 'head_kernel_zero_init')
ENCODER_KEYS = ('num_layers', 'mlp_dim', 'num_heads', 'dropout_rate',
                'attention_dropout_rate', 'attention_qk_norm', 'moe', 'position_emb',
                'compute_dtype', 'scan', 'remat')
MOE_KEYS = ('layers', 'num_experts', 'group_size', 'split_rngs', 'router', 'shared_experts')


def every_n(n: int, num_layers: int) -> tuple[int, ...]:
  """'Every-n' placement: blocks n-1, 2n-1, ... (every other block for n=2)."""
  return tuple(range(n - 1, num_layers, n))


def last_n(n: int, num_layers: int) -> tuple[int, ...]:
  """'Last-n' placement: the last n odd blocks, e.g. (5, 7) for n=2 of 8 layers."""
  return tuple(range(1, num_layers, 2))[-n:]


def to_dict(config: Any) -> dict:
  """A deep plain-dict copy of a dict or ml_collections.ConfigDict."""
  if hasattr(config, 'to_dict'):
    config = config.to_dict()
  return copy.deepcopy(dict(config))


def _check_keys(d: Mapping[str, Any], valid: Sequence[str], where: str):
  unknown = sorted(set(d) - set(valid))
  if unknown:
    raise ValueError(f'Unknown key(s) {unknown} in {where}; valid keys: {sorted(valid)}.')


def _require(d: Mapping[str, Any], key: str, where: str):
  if d.get(key) is None:
    raise ValueError(f'{where}.{key} is required.')
  return d[key]


def _positive_int(d, key, where):
  v = _require(d, key, where)
  if not isinstance(v, int) or isinstance(v, bool) or v < 1:
    raise ValueError(f'{where}.{key}={v!r} must be a positive integer.')
  return v


def validate(config: Any) -> dict:
  """Checks a model config and returns it as a normalised plain dict."""
  c = to_dict(config)
  _check_keys(c, MODEL_KEYS, 'model')
  name = c.pop('name', 'VisionTransformerMoe')
  if name not in MODELS:
    raise ValueError(f'model.name={name!r} is unknown; valid: {sorted(MODELS)}.')
  patch = _require(c, 'patch_size', 'model')
  if (not isinstance(patch, (list, tuple)) or len(patch) != 2
      or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)):
    raise ValueError(f'model.patch_size={patch!r} must be two positive integers (height, '
                     'width), e.g. (16, 16).')
  c['patch_size'] = tuple(patch)
  _positive_int(c, 'hidden_size', 'model')
  classifier = c.get('classifier', 'token')
  if classifier not in vit.CLASSIFIERS:
    raise ValueError(f'model.classifier={classifier!r} is unknown; valid: {vit.CLASSIFIERS}.')
  enc = c['encoder'] = dict(_require(c, 'encoder', 'model'))
  _check_keys(enc, ENCODER_KEYS, 'model.encoder')
  num_layers = _positive_int(enc, 'num_layers', 'model.encoder')
  _positive_int(enc, 'mlp_dim', 'model.encoder')
  heads = _positive_int(enc, 'num_heads', 'model.encoder')
  if c['hidden_size'] % heads:
    raise ValueError(f'model.hidden_size={c["hidden_size"]} is not divisible by '
                     f'model.encoder.num_heads={heads}.')
  for key in ('dropout_rate', 'attention_dropout_rate'):
    rate = enc.get(key, 0.0)
    if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate < 1):
      raise ValueError(f'model.encoder.{key}={rate!r} must be a number in [0, 1).')
  pos = dict(enc.get('position_emb') or {'name': 'learned'})
  if pos.get('name', 'learned') not in vit.POSITION_EMBS:
    raise ValueError(f'model.encoder.position_emb.name={pos.get("name")!r} is unknown; '
                     f'valid: {vit.POSITION_EMBS}.')
  enc['position_emb'] = pos
  if 'compute_dtype' in enc:
    precision.check(enc['compute_dtype'], 'model.encoder.compute_dtype')
  _validate_scan_remat(enc)
  if enc.get('moe') is not None:
    enc['moe'] = _validate_moe(dict(enc['moe']), num_layers, c.get('num_classes'))
  return {'name': name, **c}


def _validate_scan_remat(enc: dict):
  """scan: a bool; remat: a vit.REMAT name, or a bool (True: 'full', False: 'none')."""
  scan = enc.get('scan', False)
  if not isinstance(scan, bool):
    raise ValueError(f'model.encoder.scan={scan!r} must be True (run repeated blocks with '
                     'nn.scan) or False.')
  remat = enc.get('remat', 'none')
  if remat is None or isinstance(remat, bool):
    remat = 'full' if remat else 'none'
  if not isinstance(remat, str) or remat not in vit.REMAT:
    raise ValueError(f'model.encoder.remat={remat!r} is unknown; valid: '
                     f'{sorted(vit.REMAT)} (or True for \'full\', False for \'none\').')
  if 'scan' in enc or 'remat' in enc:
    enc['scan'], enc['remat'] = scan, remat


def _validate_moe(moe: dict, num_layers: int, num_classes: Optional[int]) -> dict:
  where = 'model.encoder.moe'
  _check_keys(moe, MOE_KEYS, where)
  layers = tuple(moe.get('layers') or ())
  bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
  if bad:
    raise ValueError(f'{where}.layers={layers} has indices {bad} outside [0, {num_layers}) '
                     f'(num_layers={num_layers}).')
  moe['layers'] = layers
  if not layers:
    return moe
  e = _positive_int(moe, 'num_experts', where)
  _positive_int(moe, 'group_size', where)
  shared = moe.get('shared_experts', 0)
  if not isinstance(shared, int) or shared < 0:
    raise ValueError(f'{where}.shared_experts={shared!r} must be an integer >= 0.')
  router = moe['router'] = dict(moe.get('router') or {})
  name = router.setdefault('name', 'NoisyTopExpertsPerItemRouter')
  if name not in routers_lib.ROUTERS:
    raise ValueError(f'{where}.router.name={name!r} is unknown; valid: '
                     f'{sorted(routers_lib.ROUTERS)}.')
  where = f'{where}.router'
  if 'num_classes' in router and router['num_classes'] == num_classes:
    del router['num_classes']  # Set below by validation itself: validating twice is fine.
  _check_keys(router, routers_lib.router_fields(name), where)
  k = router.get('num_selected_experts', 1)
  if 'num_selected_experts' in router and (not isinstance(k, int) or not 1 <= k <= e):
    raise ValueError(f'{where}.num_selected_experts={k!r} must be in [1, num_experts={e}]; '
                     'lower it or add experts.')
  disp = router['dispatcher'] = dict(router.get('dispatcher') or {})
  _check_keys(disp, routers_lib.DISPATCHER_KEYS, f'{where}.dispatcher')
  kind = disp.setdefault('name', 'einsum')
  if kind not in routing_lib.DISPATCH_KINDS:
    raise ValueError(f'{where}.dispatcher.name={kind!r} is unknown; valid: '
                     f'{routing_lib.DISPATCH_KINDS}.')
  if name in routers_lib.HARD_ROUTERS:
    if kind == 'ragged':
      _validate_ragged(router, disp, e, where)
    _validate_capacity(disp, f'{where}.dispatcher')
  else:
    _validate_soft(router, disp, where)
  if name == 'PerImageRouter':
    if router.get('image_repr', 'mean') not in routers_lib.per_image.IMAGE_REPRS:
      raise ValueError(f'{where}.image_repr={router["image_repr"]!r} is unknown; valid: '
                       f'{routers_lib.per_image.IMAGE_REPRS}.')
    if router.get('superclasses') is not None:
      routers_lib.per_image.load_superclasses(router['superclasses'], num_classes, e)
      router['num_classes'] = num_classes
  return moe


def _validate_ragged(router: dict, disp: dict, num_experts: int, where: str):
  """Ragged dispatch sorts each token's K choices by expert: token-choice routers only."""
  if 'num_selected_experts' not in routers_lib.router_fields(router['name']):
    raise ValueError(f"{where}.dispatcher.name='ragged' needs a router where each token "
                     f"picks K experts; {router['name']} fills expert slots instead: use "
                     "'indices' (or 'einsum').")
  if disp.get('capacity') is None and disp.get('capacity_factor') is None:
    # Dropless: room in every expert for every token (each token picks distinct experts).
    disp['capacity_factor'] = num_experts / router.get('num_selected_experts', 1)


def _validate_capacity(disp: dict, where: str):
  cap, cf = disp.get('capacity'), disp.get('capacity_factor')
  if (cap is None) == (cf is None):
    raise ValueError(f'{where} needs exactly one of capacity and capacity_factor, got '
                     f'capacity={cap!r}, capacity_factor={cf!r}.')
  if cap is not None and (not isinstance(cap, int) or cap < 1):
    raise ValueError(f'{where}.capacity={cap!r} must be an integer >= 1.')
  if cf is not None and not cf > 0:
    raise ValueError(f'{where}.capacity_factor={cf!r} must be > 0.')
  if disp.get('capacity_ceil_or_round', 'ceil') not in ('ceil', 'round'):
    raise ValueError(f'{where}.capacity_ceil_or_round={disp["capacity_ceil_or_round"]!r} '
                     'must be "ceil" or "round".')


def _validate_soft(router: dict, disp: dict, where: str):
  if disp['name'] != 'einsum':
    raise ValueError(f'{where}.dispatcher.name={disp["name"]!r}: Soft MoE mixes every token '
                     "into every slot, so only 'einsum' dispatch applies.")
  extra = sorted(set(disp) - {'name', 'bfloat16'})
  if extra:
    raise ValueError(f'{where}.dispatcher keys {extra} do not apply to SoftRouter; size its '
                     f'slots with {where}.num_slots or {where}.capacity_factor.')
  slots, cf = router.get('num_slots'), router.get('capacity_factor', 1.0)
  if slots is not None and (not isinstance(slots, int) or slots < 1):
    raise ValueError(f'{where}.num_slots={slots!r} must be an integer >= 1 (slots per '
                     'expert).')
  if slots is None and not (cf or 0) > 0:
    raise ValueError(f'{where}.capacity_factor={cf!r} must be > 0 when num_slots is not set.')


def check_input(config: Any, batch_size: int, image_size: Sequence[int]) -> None:
  """Checks what depends on the input shape: patches tile the image, groups the tokens."""
  c = validate(config)
  (ph, pw), (h, w) = c['patch_size'], tuple(image_size)[:2]
  if h % ph or w % pw:
    raise ValueError(f'model.patch_size={c["patch_size"]} does not tile images of '
                     f'{h}x{w}; choose a patch size that divides the image size.')
  tokens = (h // ph) * (w // pw) + (c.get('classifier', 'token') == 'token')
  moe = c['encoder'].get('moe') or {}
  if moe.get('layers'):
    s = moe['group_size']
    if (batch_size * tokens) % s:
      raise ValueError(
          f'model.encoder.moe.group_size={s} does not divide the {batch_size * tokens} '
          f'tokens of a batch ({batch_size} images x {tokens} tokens); use a multiple of '
          f'{tokens} that divides {batch_size * tokens}.')
    router, e = moe['router'], moe['num_experts']
    if router['name'] == 'PerImageRouter':
      # Per-image capacity counts images: images per group x K.
      routers_lib.capacity_from_config(
          router['dispatcher'], s // tokens * router.get('num_selected_experts', 1), e)
    elif router['name'] == 'SoftRouter':
      if router.get('num_slots') is None:
        routing_lib.compute_capacity(s, e, router.get('capacity_factor', 1.0), 'round', 1)
    else:
      # Token choice fills S * K slots, expert choice S (its K is implicit).
      routers_lib.capacity_from_config(
          router['dispatcher'], s * router.get('num_selected_experts', 1), e)


def build_model(config: Any, overrides: Optional[Mapping[str, Any]] = None) -> nn.Module:
  """Model from a config dict/ConfigDict; overrides maps dotted keys to new values."""
  c = validate(apply_overrides(config, overrides or {}))
  name = c.pop('name')
  return MODELS[name](**c)


def apply_overrides(config: Any, overrides: Mapping[str, Any]) -> dict:
  """Copy of config with e.g. {'encoder.moe.router.dispatcher.capacity_factor': 0.5}."""
  c = to_dict(config)
  for key, value in overrides.items():
    node = c
    *path, last = key.split('.')
    for p in path:
      if not isinstance(node.get(p), dict):
        if node.get(p) is None:
          node[p] = {}
        else:
          raise ValueError(f'Override {key!r}: {p!r} is not a sub-config.')
      node = node[p]
    node[last] = value
  return c
