"""Optax optimizers built from `config.optimizer`.

    optimizer.name: 'adam' | 'adamw' | 'sgd' | 'big_vision_adafactor'
    optimizer.learning_rate: float | {schedule, peak_value, ...} (schedules.py)
    optimizer.gradient_clip.global_norm: clip the global gradient norm (None: off)
    optimizer.weight_decay: float (all params) | [(regex, wd), ...] (first match
        wins, unmatched params are not decayed)
    optimizer.frozen_pattern: regex | [regex, ...]: these params never change
Bias load balancing's per-expert biases (vmoe.nn.moe.BALANCE_PARAMS) are not optimised:
they move by their pseudo-gradient as it is (plain descent: no learning rate, momentum,
weight decay or clipping), unless frozen.
    optimizer.<other keys>: kwargs of the named scaling (b1, b2, momentum, ...)

The update is  -lr(step) * (scale(clip(g)) + wd * param): weight decay is
decoupled from the gradient statistics and scaled by the learning rate, as in
AdamW, so 'adam' with weight_decay is AdamW and 'adamw' is the same thing.
"""
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import optax
from vmoe.nn import moe
from vmoe.train import adafactor
from vmoe.train import schedules
from vmoe.utils import checks
from vmoe.utils import paths


def scale_by_adam(*, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  mu_dtype: str | None = None) -> optax.GradientTransformation:
  return optax.scale_by_adam(b1=b1, b2=b2, eps=eps,
                             mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None)


def scale_by_sgd(*, momentum: float | None = None,
                 nesterov: bool = False) -> optax.GradientTransformation:
  if not momentum:
    return optax.identity()
  return optax.trace(decay=momentum, nesterov=nesterov)


OPTIMIZERS = {
    'adam': scale_by_adam,
    'adamw': scale_by_adam,
    'sgd': scale_by_sgd,
    'big_vision_adafactor': adafactor.scale_by_adafactor,
}
# Keys of config.optimizer handled here rather than by the named scaling.
COMMON_KEYS = frozenset(
    {'name', 'learning_rate', 'gradient_clip', 'weight_decay', 'frozen_pattern'})
GRADIENT_CLIP_KEYS = frozenset({'global_norm'})


def _weight_decay_rules(weight_decay) -> list[tuple[str, float]]:
  if weight_decay is None:
    return []
  if isinstance(weight_decay, (int, float)):
    return [('.*', float(weight_decay))]
  rules = [tuple(rule) for rule in weight_decay]
  if any(len(r) != 2 or not isinstance(r[1], (int, float)) for r in rules):
    raise ValueError(f'optimizer.weight_decay must be a float or a list of '
                     f'(regex, float) pairs, got {weight_decay!r}.')
  paths.check_patterns([p for p, _ in rules], what='optimizer.weight_decay')
  return [(p, float(wd)) for p, wd in rules]


def add_decayed_weights(weight_decay) -> optax.GradientTransformation:
  """Adds wd * param to the updates, wd from the first matching regex."""
  rules = _weight_decay_rules(weight_decay)
  ops = []
  for wd in sorted({wd for _, wd in rules if wd}):
    mask = lambda params, wd=wd: paths.map_with_paths(
        lambda path, _: paths.first_match(rules, path, 0.0) == wd, params)
    ops.append(optax.add_decayed_weights(wd, mask=mask))
  return optax.chain(*ops) if ops else optax.identity()


def param_labels(params, frozen_pattern) -> Any:
  """'frozen' | 'balance' (bias load balancing) | 'trainable' for each param leaf."""
  rules = [(p, 'frozen') for p in paths.patterns(frozen_pattern)]
  rules.append((moe.BALANCE_PARAMS, 'balance'))
  return paths.map_with_paths(lambda path, _: paths.first_match(rules, path, 'trainable'),
                              params)


def check_config(config: Mapping[str, Any]):
  """Raises ValueError for a bad optimizer config, before anything is built."""
  name = config.get('name')
  checks.one_of(name, sorted(OPTIMIZERS), 'optimizer.name')
  kwargs = {k: v for k, v in config.items() if k not in COMMON_KEYS}
  checks.check_kwargs(OPTIMIZERS[name], kwargs, what=f'optimizer {name!r}',
                      extra_valid=COMMON_KEYS)
  if 'learning_rate' not in config:
    raise ValueError('optimizer.learning_rate is required (a float or '
                     '{schedule: NAME, ...}).')
  checks.check_keys(config.get('gradient_clip') or {}, GRADIENT_CLIP_KEYS,
                    'optimizer.gradient_clip')
  for key in ('b1', 'b2', 'momentum', 'decay_rate'):
    v = kwargs.get(key)
    if v is not None and not (isinstance(v, (int, float)) and 0 <= v < 1):
      raise ValueError(f'optimizer.{key}={v!r} must be a number in [0, 1).')
  if kwargs.get('eps') is not None and not kwargs['eps'] > 0:
    raise ValueError(f'optimizer.eps={kwargs["eps"]!r} must be > 0.')
  if any(wd < 0 for _, wd in _weight_decay_rules(config.get('weight_decay'))):
    raise ValueError(f'optimizer.weight_decay={config.get("weight_decay")!r} must be >= 0.')
  paths.patterns(config.get('frozen_pattern'), what='optimizer.frozen_pattern')


def create_optimizer(
    *,
    name: str,
    total_steps: int,
    learning_rate: float | Mapping[str, Any],
    gradient_clip: Mapping[str, Any] | None = None,
    weight_decay: float | Sequence[tuple[str, float]] | None = None,
    frozen_pattern: str | Sequence[str] | None = None,
    balance_biases: bool = False,
    **kwargs,
) -> tuple[optax.GradientTransformation, schedules.Schedule]:
  """Returns the optimizer and its learning-rate schedule (for logging). balance_biases:
  the model has bias load balancing (vmoe.nn.spec.MoeSpec.bias_balancing)."""
  check_config(dict(name=name, learning_rate=learning_rate,
                    gradient_clip=gradient_clip, weight_decay=weight_decay,
                    frozen_pattern=frozen_pattern, **kwargs))
  schedule = schedules.create_schedule(learning_rate, total_steps=total_steps)
  global_norm = (gradient_clip or {}).get('global_norm')
  tx = optax.chain(
      optax.clip_by_global_norm(global_norm) if global_norm else optax.identity(),
      OPTIMIZERS[name](**kwargs),
      add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(schedule),
  )
  if paths.patterns(frozen_pattern) or balance_biases:
    # Frozen params get zero updates and no optimizer state at all; balance biases step
    # by their pseudo-gradient; the global norm for clipping is over the trainable
    # params only.
    tx = optax.multi_transform(
        {'trainable': tx, 'frozen': optax.set_to_zero(), 'balance': optax.scale(-1.0)},
        lambda params: param_labels(params, frozen_pattern))
  return tx, schedule
