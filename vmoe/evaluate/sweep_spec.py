"""Parse test-time sweeps, e.g.
'capacity_factor=0.5,1;num_selected_experts=1,2;batch_priority=false,true'.

Each ';'-separated item is KEY=V1,V2,...; the sweep is every combination. KEY is a short
name below or any dotted key of the config (e.g. model.encoder.moe.group_size). Values are
Python literals; true/false/none are accepted too.
"""
import ast
import itertools
from typing import Any

ROUTER = 'model.encoder.moe.router'
ALIASES = {
    'capacity_factor': f'{ROUTER}.dispatcher.capacity_factor',
    'capacity': f'{ROUTER}.dispatcher.capacity',
    'batch_priority': f'{ROUTER}.dispatcher.batch_priority',
    'num_selected_experts': f'{ROUTER}.num_selected_experts',
    'capacity_multiple_of': f'{ROUTER}.dispatcher.capacity_multiple_of',
    'dispatcher': f'{ROUTER}.dispatcher.name',
    'num_slots': f'{ROUTER}.num_slots',
    'group_size': 'model.encoder.moe.group_size',
}
DEFAULT_SWEEP = ('capacity_factor=0.1,0.25,0.5,1,1.5,2;num_selected_experts=1,2;'
                 'batch_priority=false,true')
_WORDS = {'true': True, 'false': False, 'none': None, 'null': None}


def _value(text: str) -> Any:
  text = text.strip()
  if text.lower() in _WORDS:
    return _WORDS[text.lower()]
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _exists(config, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return False
  return True


def parse(spec: str, config) -> list[dict[str, Any]]:
  """Returns the variants, each {dotted config key: value}, in sweep order."""
  axes = []
  for item in filter(None, (p.strip() for p in spec.split(';'))):
    key, sep, values = item.partition('=')
    key = key.strip()
    dotted = ALIASES.get(key, key)
    parent = dotted.rpartition('.')[0]
    if not sep or not values.strip() or not parent or not _exists(config, parent):
      raise ValueError(
          f'Bad sweep item {item!r}: expected KEY=V1,V2,... with KEY one of '
          f'{sorted(ALIASES)} or a dotted config key whose parent exists (e.g. '
          f'{ROUTER}.noise_std).')
    axes.append([(dotted, _value(v)) for v in values.split(',')])
  if not axes:
    raise ValueError(f'Empty sweep {spec!r}; e.g. --sweep="{DEFAULT_SWEEP}".')
  return [dict(combo) for combo in itertools.product(*axes)]


def short_name(dotted: str) -> str:
  """model.encoder.moe.router.dispatcher.capacity_factor -> capacity_factor."""
  for alias, full in ALIASES.items():
    if full == dotted:
      return alias
  return dotted
