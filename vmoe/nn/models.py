"""Model configs, resolved once: the reference's schema -> a frozen ModelSpec -> the model.

The schema is the `model_kwargs` of google-research/vmoe configs (see
tests/fixtures/vmoe_reference/*_config.json), with an optional `name`, and an optional
`decoder` that makes the model a segmenter: {'name': 'linear'} or
{'name': 'fpn', 'layers': (3, 5), 'dim': 32} (vmoe/nn/decoders.py). `resolve` checks
every key and value, with one ValueError naming the key and the fix, before anything is
traced, and returns the ModelSpec (vmoe/nn/spec.py) that everything downstream reads. It
never edits the config.

  spec = models.resolve(config)                          # the config alone
  spec = models.resolve(config, image_size=(224, 224))   # + tokens per image, capacity
  model = models.build(spec)                             # the flax module
  model = models.build_model(config, (224, 224))         # both at once
"""
import dataclasses
import math
import re
from typing import Any, Literal, Mapping, Optional, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vmoe.nn import decoders
from vmoe.nn import precision
from vmoe.nn import routers as routers_lib
from vmoe.nn import routing
from vmoe.nn import spec as spec_lib
from vmoe.nn import vit
from vmoe.nn.routers import common, per_image, soft, softmax
from vmoe.utils import checks
from vmoe.utils import dotted

# One module for all: the resolved spec says what it is (E3: moe.ensemble_size members).
MODELS = {'VisionTransformerMoe': vit.VisionTransformerMoe,
          'VisionTransformer': vit.VisionTransformerMoe,
          'VisionTransformerMoeEnsemble': vit.VisionTransformerMoe}
ENSEMBLE = 'VisionTransformerMoeEnsemble'
MODEL_KEYS = ('name', 'num_classes', 'patch_size', 'hidden_size', 'encoder', 'classifier',
              'representation_size', 'head_bias_init', 'head_kernel_zero_init', 'decoder')
ENCODER_KEYS = ('num_layers', 'mlp_dim', 'num_heads', 'dropout_rate',
                'attention_dropout_rate', 'attention_qk_norm', 'moe', 'position_emb',
                'compute_dtype', 'scan', 'remat')
DECODER_KEYS = ('name', 'layers', 'dim', 'pool_scales')
MOE_KEYS = ('layers', 'num_experts', 'group_size', 'split_rngs', 'router', 'shared_experts',
            'dropout_rate', 'ensemble_size')
# Dispatcher options of the reference with no effect here: {option: why}.
INERT_DISPATCHER = {
    'partition_spec': routers_lib.INERT['partition_spec'],
    'einsum_precision': 'one-hot dispatch is exact and combine sums run in float32 '
                        '(vmoe/nn/precision.py), whatever precision it names',
}
DISPATCHER_KEYS = ('name', 'capacity', 'capacity_factor', 'capacity_ceil_or_round',
                   'capacity_multiple_of', 'batch_priority', 'bfloat16', 'chosen_experts',
                   *INERT_DISPATCHER)
# dispatcher.chosen_experts (per-image routing) -> MoeSpec.chosen_experts.
CHOSEN_EXPERTS = {'auto': 'auto', True: 'always', False: 'never'}
SPLIT_RNGS = ('dropout', 'params')
ModelSpec = spec_lib.ModelSpec


def resolve(config: Any, *, image_size: Optional[Sequence[int]] = None,
            overrides: Optional[Mapping[str, Any]] = None) -> ModelSpec:
  """The ModelSpec of a model config (dict or ConfigDict); with `image_size` (h, w) also
  its tokens per image and the capacity of its MoE layers. overrides: dotted keys to
  change first, e.g. {'encoder.moe.router.dispatcher.capacity_factor': 0.5}."""
  c = dotted.with_values(config, overrides or {})
  checks.check_keys(c, MODEL_KEYS, 'model')
  name = checks.one_of(c.get('name', 'VisionTransformerMoe'), sorted(MODELS), 'model.name')
  patch = checks.required(c, 'patch_size', 'model')
  if (not isinstance(patch, (list, tuple)) or len(patch) != 2
      or not all(checks.is_int(p) and p > 0 for p in patch)):
    raise ValueError(f'model.patch_size={patch!r} must be two positive integers (height, '
                     'width), e.g. (16, 16).')
  hidden = checks.positive_int(checks.required(c, 'hidden_size', 'model'), 'model.hidden_size')
  classifier = checks.one_of(c.get('classifier', 'token'), vit.CLASSIFIERS, 'model.classifier')
  enc = checks.required(c, 'encoder', 'model')
  if c.get('decoder') is not None:
    _check_segmenter(c, name, classifier, enc)
  encoder = _encoder(enc, hidden, c.get('num_classes'), name == ENSEMBLE)
  decoder = (None if c.get('decoder') is None else
             _decoder(c['decoder'], encoder.num_layers, tuple(patch)))
  spec = ModelSpec(
      name=name, num_classes=c.get('num_classes'), patch_size=tuple(patch),
      hidden_size=hidden, classifier=classifier,
      representation_size=c.get('representation_size'),
      head_bias_init=c.get('head_bias_init', 0.0),
      head_kernel_zero_init=c.get('head_kernel_zero_init', True), decoder=decoder,
      encoder=dataclasses.replace(encoder, feature_layers=decoder.layers if decoder else ()))
  return spec if image_size is None else _at(spec, tuple(image_size))


def build(spec: ModelSpec, moe_sharding=None) -> nn.Module:
  """The flax module of a spec resolved for its image size. moe_sharding: where the MoE
  layers' arrays live on a device mesh (vmoe.parallel.mesh.moe_sharding), or None."""
  if spec.image_size is None:
    raise ValueError('build: resolve the model config for its image size first, '
                     'models.resolve(config, image_size=(h, w)).')
  return MODELS[spec.name](spec, moe_sharding=moe_sharding)


def build_model(config: Any, image_size: int | Sequence[int], *,
                overrides: Optional[Mapping[str, Any]] = None, moe_sharding=None
                ) -> nn.Module:
  """The flax module of a model config (a dict or ConfigDict: `config.model` of a vmoe
  config or of the reference's config files, as is) for images of `image_size` (h, w, or
  one int for square images): resolve, then build. Its `spec` is the resolved ModelSpec;
  module.apply({'params': p}, images [B, h, w, 3], train=False) -> (logits, metrics),
  logits [B, num_classes], or float32 [B, h, w, num_classes] for a segmenter."""
  if checks.is_int(image_size):
    image_size = (image_size, image_size)
  return build(resolve(config, image_size=image_size, overrides=overrides), moe_sharding)


def param_shapes(spec: ModelSpec) -> Any:
  """The params tree of a spec resolved for its image size (jax.ShapeDtypeStructs)."""
  # One MoE group of whole images (E3: the group counts the ensemble copies).
  batch = max(1, spec.encoder.moe.group_size // (spec.tokens_per_image * spec.ensemble_size)
              if spec.encoder.moe else 1)
  images = jax.ShapeDtypeStruct((batch, *spec.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: build(spec).init(jax.random.PRNGKey(0), x), images)['params']


def check_params(params: Mapping[str, Any], spec: ModelSpec, source: str):
  """Raises one ValueError listing the missing, unexpected and mis-shaped parameters of
  `params` (read from `source`) for the model of `spec`."""
  got = traverse_util.flatten_dict(params, sep='/')
  want = traverse_util.flatten_dict(param_shapes(spec), sep='/')
  problems = [f'missing {k} {tuple(want[k].shape)}' for k in sorted(set(want) - set(got))]
  problems += [f'unexpected {k} {tuple(np.shape(got[k]))}' for k in sorted(set(got) - set(want))]
  problems += [f'{k} has shape {tuple(np.shape(got[k]))}, the model needs {tuple(want[k].shape)}'
               for k in sorted(set(got) & set(want))
               if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if problems:
    raise ValueError(f'The parameters in {source} do not fit the model config: '
                     + '; '.join(problems[:20])
                     + (f'; and {len(problems) - 20} more' if len(problems) > 20 else '')
                     + '. Check the model config (sizes, moe.layers, num_experts, classifier).'
                     + router_layout_hint(set(want) - set(got), set(got) - set(want)))


def router_layout_hint(missing, unexpected) -> str:
  """A hint when params differ in where the per-image router lives (names '/'-joined)."""
  model = lambda names: any('Encoder/image_router/' in n for n in names)
  layer = lambda names: any(re.search(r'/Moe/Router/', n) for n in names)
  if model(missing) and layer(unexpected):
    return (' These params have a router in every MoE layer (Moe/Router, the per-layer '
            "layout), the model one per-image router for the whole MoE part "
            "(Encoder/image_router): set model.encoder.moe.router.scope='layer' to use "
            'them as they are.')
  if layer(missing) and model(unexpected):
    return (' These params have one per-image router for the whole MoE part '
            '(Encoder/image_router), the model one per MoE layer: set '
            "model.encoder.moe.router.scope='model'.")
  return ''


def _check_segmenter(c: Mapping[str, Any], name: str, classifier: str,
                     enc: Mapping[str, Any]):
  """What a model with a decoder cannot be (c: the model config, enc: its encoder's)."""
  if name == ENSEMBLE:
    raise ValueError(f"model.name='{ENSEMBLE}' (E3) cannot take a model.decoder (its "
                     'members average image logits); use model.name='
                     "'VisionTransformerMoe' for a segmenter, or remove model.decoder.")
  if classifier == 'map':
    raise ValueError("model.classifier='map' pools the tokens into one vector, but a "
                     'segmenter (model.decoder) reads every patch token; use '
                     "'token' (its class token is dropped before the decoder), 'gap' or '0'.")
  if c.get('representation_size') is not None:
    raise ValueError(f'model.representation_size={c["representation_size"]!r} is a '
                     "classifier's pre-logits layer; a segmenter (model.decoder) has "
                     'none: set it to None.')
  k = c.get('num_classes')
  if not checks.is_int(k) or k < 1:
    raise ValueError(f'model.num_classes={k!r} must be a positive integer with '
                     'model.decoder: the pixel classes the decoder predicts.')
  moe = enc.get('moe') or {}
  if moe.get('layers') and (moe.get('router') or {}).get('superclasses') is not None:
    raise ValueError('model.encoder.moe.router.superclasses: super-class guided routing '
                     'learns from image labels, and a segmenter (model.decoder) has '
                     'labels per pixel only; remove superclasses.')


def _decoder(decoder: Any, num_layers: int, patch: tuple[int, int]
             ) -> spec_lib.DecoderSpec:
  """The DecoderSpec of `model.decoder`, for an encoder of `num_layers` blocks and
  patches of `patch`."""
  where = 'model.decoder'
  if not isinstance(decoder, Mapping):
    raise ValueError(f"{where}={decoder!r} must be a dict, e.g. {{'name': 'linear'}} or "
                     "{'name': 'fpn', 'layers': (3, 5), 'dim': 32}, or None for a "
                     'classifier.')
  checks.check_keys(decoder, DECODER_KEYS, where)
  name = checks.one_of(checks.required(decoder, 'name', where), sorted(decoders.DECODERS),
                       f'{where}.name')
  layers, dim = decoder.get('layers') or (), decoder.get('dim')
  pool = decoder.get('pool_scales', () if name == 'linear' else decoders.POOL_SCALES)
  if name == 'linear':
    if layers or dim is not None or pool:
      raise ValueError(f"{where}: 'linear' classifies the final patch tokens alone; remove "
                       f'layers={layers!r}, dim={dim!r} and pool_scales={pool!r} (they '
                       "configure 'fpn').")
    return spec_lib.DecoderSpec(name)
  if num_layers < 2:
    raise ValueError(f"{where}.name='fpn' needs the outputs of earlier blocks, but "
                     f'model.encoder.num_layers={num_layers}; use more blocks or '
                     "'linear'.")
  if (not isinstance(layers, (list, tuple)) or not layers
      or not all(checks.is_int(i) and 0 <= i < num_layers - 1 for i in layers)
      or list(layers) != sorted(set(layers))):
    example = tuple(sorted({(num_layers - 1) // 3, 2 * (num_layers - 1) // 3}))
    raise ValueError(f'{where}.layers={layers!r} must be increasing block indices in [0, '
                     f'{num_layers - 1}) (num_layers={num_layers}; the last block gives the '
                     f'final encoder output, always the last level), e.g. {example}.')
  if not checks.is_int(dim) or dim < 1:
    raise ValueError(f"{where}.dim={dim!r} must be a positive integer (the 'fpn' "
                     'channels), e.g. 64.')
  if (not isinstance(pool, (list, tuple))
      or not all(checks.is_int(k) and k > 0 for k in pool) or list(pool) != sorted(set(pool))):
    raise ValueError(f'{where}.pool_scales={pool!r} must be increasing positive bin counts '
                     f'(e.g. {decoders.POOL_SCALES}, UperNet\'s), or () for no pyramid pooling.')
  spec = spec_lib.DecoderSpec(name, tuple(layers), dim, tuple(pool))
  decoders.check(spec, patch)
  return spec


def _encoder(enc: Mapping[str, Any], hidden: int, num_classes: Optional[int],
             ensemble: bool) -> spec_lib.EncoderSpec:
  where = 'model.encoder'
  checks.check_keys(enc, ENCODER_KEYS, where)
  num_layers = checks.positive_int(checks.required(enc, 'num_layers', where),
                                   f'{where}.num_layers')
  mlp_dim = checks.positive_int(checks.required(enc, 'mlp_dim', where), f'{where}.mlp_dim')
  heads = checks.positive_int(checks.required(enc, 'num_heads', where), f'{where}.num_heads')
  if hidden % heads:
    raise ValueError(f'model.hidden_size={hidden} is not divisible by '
                     f'{where}.num_heads={heads}.')
  rates = {}
  for key in ('dropout_rate', 'attention_dropout_rate'):
    rate = enc.get(key, 0.0)
    if not (checks.is_number(rate) and 0 <= rate < 1):
      raise ValueError(f'{where}.{key}={rate!r} must be a number in [0, 1).')
    rates[key] = rate
  pos = enc.get('position_emb') or {}
  pos_name = checks.one_of(pos.get('name', 'learned'), vit.POSITION_EMBS,
                           f'{where}.position_emb.name')
  scan = enc.get('scan', False)
  if not isinstance(scan, bool):
    raise ValueError(f'{where}.scan={scan!r} must be True (run repeated blocks with '
                     'nn.scan) or False.')
  remat = enc.get('remat', 'none')
  if remat is None or isinstance(remat, bool):
    remat = 'full' if remat else 'none'
  if not isinstance(remat, str) or remat not in vit.REMAT:
    raise ValueError(f'{where}.remat={remat!r} is unknown; valid: {sorted(vit.REMAT)} (or '
                     "True for 'full', False for 'none').")
  moe_config = enc.get('moe') or {}
  layers = tuple(moe_config.get('layers') or ())
  bad = [i for i in layers if not checks.is_int(i) or not 0 <= i < num_layers]
  if bad:
    raise ValueError(f'{where}.moe.layers={layers} has indices {bad} outside [0, '
                     f'{num_layers}) (num_layers={num_layers}).')
  if ensemble and not layers:
    raise ValueError(f"model.name='{ENSEMBLE}' (E3) needs MoE layers: set "
                     f'{where}.moe.layers, num_experts and ensemble_size.')
  return spec_lib.EncoderSpec(
      num_layers=num_layers, mlp_dim=mlp_dim, num_heads=heads, **rates,
      attention_qk_norm=enc.get('attention_qk_norm', False), position_emb=pos_name,
      position_temperature=pos.get('temperature', 10_000.),
      compute_dtype=precision.check(enc.get('compute_dtype', 'float32'),
                                    f'{where}.compute_dtype'),
      scan=scan, remat=remat, moe_layers=layers,
      moe=_moe(moe_config, num_classes, ensemble) if layers else None)


def _moe(moe: Mapping[str, Any], num_classes: Optional[int], ensemble: bool = False
         ) -> spec_lib.MoeSpec:
  """Everything of a MoE layer that does not depend on the input size (ensemble: of
  an E3 model, VisionTransformerMoeEnsemble)."""
  where = 'model.encoder.moe'
  checks.check_keys(moe, MOE_KEYS, where)
  e = checks.positive_int(checks.required(moe, 'num_experts', where), f'{where}.num_experts')
  s = checks.positive_int(checks.required(moe, 'group_size', where), f'{where}.group_size')
  shared = moe.get('shared_experts', 0)
  if not checks.is_int(shared) or shared < 0:
    raise ValueError(f'{where}.shared_experts={shared!r} must be an integer >= 0.')
  rate = moe.get('dropout_rate')
  if rate is not None and not (checks.is_number(rate) and 0 <= rate < 1):
    raise ValueError(f'{where}.dropout_rate={rate!r} must be a number in [0, 1) (the '
                     "experts' dropout), or None for the encoder's.")
  router = dict(moe.get('router') or {})
  name = router.pop('name', 'NoisyTopExpertsPerItemRouter')
  name = checks.one_of(routers_lib.canonical(name), sorted(routers_lib.ROUTERS),
                       f'{where}.router.name', hint=f' (or one of the reference\'s names '
                       f'{sorted(routers_lib.ALIASES)})' if isinstance(name, str) else '')
  cls = routers_lib.ROUTERS[name]
  disp = dict(router.pop('dispatcher', None) or {})
  sizing = {k: router.pop(k) for k in getattr(cls, 'SIZING_KEYS', ()) if k in router}
  options, inert = _router_options(name, router, num_classes, e, f'{where}.router')
  inert += [f'{where}.router.dispatcher.{k}: {why}' for k, why in INERT_DISPATCHER.items()
            if k in disp]
  k = options.get('num_selected_experts', 1)
  kind, rule = _dispatch(cls, disp, sizing, e, k, f'{where}.router.dispatcher')
  chosen = disp.get('chosen_experts', 'auto' if cls.SLOTS == 'images' else None)
  if cls.SLOTS != 'images' and chosen is not None:
    raise ValueError(f'{where}.router.dispatcher.chosen_experts={chosen!r}: only per-image '
                     'routing (PerImageRouter) can run each image through its chosen '
                     'experts; remove the key.')
  if cls.SLOTS == 'images' and (not isinstance(chosen, (str, bool))
                                or chosen not in CHOSEN_EXPERTS):
    raise ValueError(f'{where}.router.dispatcher.chosen_experts={chosen!r} must be '
                     "'auto' (at inference where it is faster), True (always) or False "
                     '(never: capacity buffers).')
  m = _ensemble_size(moe.get('ensemble_size'), ensemble, cls, e, k, options, where)
  return spec_lib.MoeSpec(
      num_experts=e, group_size=s, router=name, ensemble_size=m,
      options=tuple(sorted(options.items())),
      # The reference's Soft MoE always moves tokens in bfloat16.
      dispatch=kind, bfloat16=bool(disp.get('bfloat16', cls.SLOTS == 'soft')),
      batch_priority=bool(disp.get('batch_priority', False)), capacity_rule=rule,
      split_rngs=_split_rngs(moe.get('split_rngs', False), f'{where}.split_rngs'),
      dropout_rate=rate, inert=tuple(inert), shared_experts=shared,
      chosen_experts=CHOSEN_EXPERTS[chosen] if cls.SLOTS == 'images' else 'never')


def _ensemble_size(m, ensemble: bool, cls, e: int, k: int, options: dict, where: str
                   ) -> int:
  """M, the E3 members of `moe.ensemble_size` (1 for other models), checked against the
  router (class `cls`, options) and its E experts and K choices."""
  if not ensemble:
    if m is not None:
      raise ValueError(f'{where}.ensemble_size={m!r} is read by model.name='
                       f"'{ENSEMBLE}' (E3) only; set model.name to it or remove the key.")
    return 1
  if not checks.is_int(m) or m < 1:
    raise ValueError(f'{where}.ensemble_size={m!r} must be an integer >= 1 (the E3 '
                     f"ensemble members of model.name='{ENSEMBLE}').")
  if e % m:
    raise ValueError(f'{where}.ensemble_size={m} does not divide num_experts={e}: each '
                     'member gets E / M experts of its own; choose M dividing E.')
  if cls.SLOTS not in ('choices', 'tokens'):
    raise ValueError(f'{where}.router.name={cls.__name__!r} cannot be split into E3 '
                     'members (E3 routes the tokens of each member to its own experts): '
                     'use a token-choice or expert-choice router, e.g. '
                     'NoisyTopExpertsPerItemRouter (the reference\'s).')
  if k > e // m:
    raise ValueError(f'{where}.router.num_selected_experts={k} exceeds the {e // m} '
                     f'experts of each of the {m} ensemble members (num_experts / '
                     'ensemble_size); lower it or add experts.')
  if options.get('load_balancing') == 'bias':
    raise ValueError(f"{where}.router.load_balancing='bias' is not available with E3 "
                     "(ensemble_size > 1); use 'losses'.")
  return m


def _router_options(name: str, router: dict, num_classes: Optional[int], e: int,
                    where: str) -> tuple[dict[str, Any], list[str]]:
  """(options of router `name` with defaults filled in, notes on the inert ones)."""
  inert_keys = routers_lib.INERT_OPTIONS.get(name, ())
  defaults = routers_lib.options(name)
  checks.check_keys(router, (*defaults, *inert_keys), where)
  inert = [f'{where}.{k}: {routers_lib.INERT[k]}' for k in inert_keys if k in router]
  options = {**defaults, **{k: v for k, v in router.items() if k not in inert_keys}}
  k = options.get('num_selected_experts', 1)
  if not checks.is_int(k) or not 1 <= k <= e:
    raise ValueError(f'{where}.num_selected_experts={k!r} must be in [1, num_experts={e}]; '
                     'lower it or add experts.')
  for key in ('noise_std', 'z_loss_weight', 'importance_loss_weight', 'load_loss_weight',
              'gshard_loss_weight', 'superclass_loss_weight'):
    if key in options and not (checks.is_number(options[key]) and options[key] >= 0):
      raise ValueError(f'{where}.{key}={options[key]!r} must be a number >= 0.')
  for key in ('epsilon', 'l2_reg', 'adam_lr', 'bias_update_rate'):
    if key in options and not (checks.is_number(options[key]) and options[key] > 0):
      raise ValueError(f'{where}.{key}={options[key]!r} must be a number > 0.')
  if 'maxiter' in options:
    checks.positive_int(options['maxiter'], f'{where}.maxiter')
  if options['deterministic'] not in (None, True, False):
    raise ValueError(f'{where}.deterministic={options["deterministic"]!r} must be None '
                     '(noise in training only), True (never) or False (also at evaluation).')
  checks.one_of(options['dtype'], common.DTYPES, f'{where}.dtype')
  checks.one_of(options.get('load_balancing', 'losses'), softmax.LOAD_BALANCING,
                f'{where}.load_balancing')
  checks.one_of(options.get('precision'), soft.PRECISIONS, f'{where}.precision')
  checks.one_of(options.get('image_repr', 'mean'), per_image.IMAGE_REPRS, f'{where}.image_repr')
  checks.one_of(options.get('scope', 'model'), per_image.SCOPES, f'{where}.scope')
  if options.get('superclasses') is not None:
    options['superclasses'] = per_image.load_superclasses(options['superclasses'],
                                                          num_classes, e)
  return options, inert


def _split_rngs(value, where: str) -> tuple[str, ...]:
  """The rng streams drawn per expert: True (all), False (none) or their names."""
  if isinstance(value, bool):
    return SPLIT_RNGS if value else ()
  names = tuple(k for k, v in value.items() if v) if isinstance(value, Mapping) else value
  if (not isinstance(names, (list, tuple, set, frozenset))
      or not set(names) <= set(SPLIT_RNGS)):
    raise ValueError(f'{where}={value!r} must be True, False, or some of {SPLIT_RNGS} (a '
                     'list, or a dict of booleans).')
  return tuple(sorted(names))


def _dispatch(cls, disp: dict, sizing: dict, e: int, k: int, where: str
              ) -> tuple[str, spec_lib.CapacityRule]:
  """(dispatch kind, capacity rule) of the router class `cls` and its dispatcher config."""
  checks.check_keys(disp, DISPATCHER_KEYS, where)
  kind = checks.one_of(disp.get('name', 'einsum'), routing.DISPATCH_KINDS, f'{where}.name')
  router = where.rsplit('.', 1)[0]
  if cls.SLOTS == 'soft':
    if kind != 'einsum':
      raise ValueError(f"{where}.name={kind!r}: Soft MoE mixes every token into every "
                       "slot, so only 'einsum' dispatch applies.")
    extra = sorted(set(disp) - {'name', 'bfloat16', *INERT_DISPATCHER})
    if extra:
      raise ValueError(f'{where} keys {extra} do not apply to SoftRouter; size its slots '
                       f'with {router}.num_slots or {router}.capacity_factor.')
    slots, cf = sizing.get('num_slots'), sizing.get('capacity_factor', 1.0)
    if slots is not None and (not checks.is_int(slots) or slots < 1):
      raise ValueError(f'{router}.num_slots={slots!r} must be an integer >= 1 (slots per '
                       'expert).')
    if slots is None and not (cf or 0) > 0:
      raise ValueError(f'{router}.capacity_factor={cf!r} must be > 0 when num_slots is not '
                       'set.')
    return 'soft', spec_lib.CapacityRule(slots, cf, 'round', 1)
  cap, cf = disp.get('capacity'), disp.get('capacity_factor')
  if kind == 'ragged':
    if cls.SLOTS == 'tokens':
      raise ValueError(f"{where}.name='ragged' needs a router where each token picks K "
                       f"experts; {cls.__name__} fills expert slots instead: use 'indices' "
                       "(or 'einsum').")
    if cap is None and cf is None:  # Dropless: room in every expert for every token.
      cf = e / k
  if (cap is None) == (cf is None):
    raise ValueError(f'{where} needs exactly one of capacity and capacity_factor, got '
                     f'capacity={cap!r}, capacity_factor={cf!r}.')
  if cap is not None and (not checks.is_int(cap) or cap < 1):
    raise ValueError(f'{where}.capacity={cap!r} must be an integer >= 1.')
  if cf is not None and not cf > 0:
    raise ValueError(f'{where}.capacity_factor={cf!r} must be > 0.')
  ceil_or_round = disp.get('capacity_ceil_or_round', 'ceil')
  if ceil_or_round not in ('ceil', 'round'):
    raise ValueError(f'{where}.capacity_ceil_or_round={ceil_or_round!r} must be "ceil" or '
                     '"round".')
  # Per-image capacity counts images: rounding it up to a multiple of 4 (the token-level
  # default) would pad each expert by up to 3 whole images.
  multiple_of = disp.get('capacity_multiple_of', 1 if cls.SLOTS == 'images' else 4)
  return kind, spec_lib.CapacityRule(cap, cf, ceil_or_round, multiple_of)


def compute_capacity(num_slots: int, num_experts: int, capacity_factor: float,
                     ceil_or_round: Literal['ceil', 'round'] = 'ceil',
                     multiple_of: Optional[int] = 4) -> int:
  """Buffer slots per expert: num_slots * capacity_factor / num_experts, rounded.

  num_slots is what a group fills: S * K token choices, S tokens (expert choice), n * K
  image choices (per-image routing). E.g. S=400, K=2, cf=1.05, E=8 -> ceil(105.0) = 105
  -> 108 (multiple of 4).
  """
  c = num_slots * capacity_factor / num_experts
  c = int(math.ceil(c)) if ceil_or_round == 'ceil' else int(round(c))
  if multiple_of and c % multiple_of:
    c += multiple_of - c % multiple_of
  if c < 1:
    raise ValueError(
        f'capacity_factor={capacity_factor} gives a capacity of {c} slots per expert '
        f'({num_slots} slots to fill, {num_experts} experts); increase capacity_factor or '
        'set capacity_multiple_of.')
  return c


def resolve_moe(config: Mapping[str, Any], *, tokens_per_image: int,
                num_classes: Optional[int] = None, class_token: bool = False
                ) -> spec_lib.MoeSpec:
  """The MoeSpec of a `model.encoder.moe` config (with `layers`) on its own, for images
  of `tokens_per_image` tokens (class_token: token 0 of each is a class token): a MoE
  layer outside a model (benchmarks, tests), which routes its input itself."""
  return _moe_at(_moe(checks.to_dict(config), num_classes), tokens_per_image,
                 f'images of {tokens_per_image} tokens', class_token)


def _at(spec: ModelSpec, image_size: tuple[int, int]) -> ModelSpec:
  """spec for images of `image_size`: patches tile them; tokens and capacity follow."""
  (ph, pw), (h, w) = spec.patch_size, image_size
  if h % ph or w % pw:
    raise ValueError(f'model.patch_size={spec.patch_size} does not tile images of '
                     f'{h}x{w}; choose a patch size that divides the image size.')
  spec = dataclasses.replace(spec, image_size=(h, w))
  pool = spec.decoder.pool_scales if spec.decoder else ()
  if pool and max(pool) > min(spec.grid):
    raise ValueError(f'model.decoder.pool_scales={pool} pools the {spec.grid[0]}x'
                     f'{spec.grid[1]} patch grid of {h}x{w} images into up to '
                     f'{max(pool)}x{max(pool)} bins; use scales of at most {min(spec.grid)}.')
  if spec.encoder.moe is None:
    return spec
  moe = _moe_at(spec.encoder.moe, spec.tokens_per_image, f'a {h}x{w} image',
                class_token=spec.classifier == 'token')
  return dataclasses.replace(spec, encoder=dataclasses.replace(spec.encoder, moe=moe))


def _moe_at(moe: spec_lib.MoeSpec, t: int, images: str, class_token: bool = False
            ) -> spec_lib.MoeSpec:
  """moe for images of t tokens (`images` describes them; class_token: token 0 of each
  is the class token): its capacity."""
  s, e, k = moe.group_size, moe.num_experts, moe.num_selected_experts
  where = 'model.encoder.moe'
  if moe.slots == 'images' and moe.option('image_repr') == 'token' and not class_token:
    raise ValueError(f"{where}.router.image_repr='token': the images have no class token "
                     "to route by (model.classifier is not 'token'); use image_repr='mean' "
                     "(the mean of the patch tokens) or classifier='token'.")
  if moe.slots == 'images' and s % t:
    raise ValueError(f'{where}.group_size={s}: per-image routing needs whole images in a '
                     f'group, a multiple of the {t} tokens of {images}.')
  needed = {'choices': s * k, 'tokens': s, 'images': s // t * k, 'soft': s}[moe.slots]
  rule = moe.capacity_rule
  c = rule.capacity or compute_capacity(needed, e, rule.factor, rule.ceil_or_round,
                                        rule.multiple_of)
  m = moe.ensemble_size
  if m > 1 and s % (m * t):
    raise ValueError(f'{where}.group_size={s}: E3 groups hold whole images with all their '
                     f'{m} ensemble copies, a multiple of {m} x {t} = {m * t} tokens for '
                     f'{images} (the reference counts the copies in group_size).')
  if moe.slots == 'tokens' and c > s // m:
    raise ValueError(f'{where}: expert-choice capacity {c} exceeds the {s // m} tokens '
                     f'{"of each ensemble member " if m > 1 else ""}in a group of {s}; '
                     'lower capacity_factor or raise group_size.')
  return dataclasses.replace(moe, tokens_per_image=t, class_token=class_token, capacity=c)
