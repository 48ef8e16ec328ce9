"""Registry of preprocessing ops and the parser of big_vision-style pp strings.

A pp string is ops joined by '|', each a bare name or a call with Python
literal arguments: 'decode|resize(32)|onehot(10, key="label")'. Arguments are
read with ast.literal_eval (never eval), and bound against the op's signature
before anything runs, so a typo is a ValueError naming the op and the string.

An op is a factory: factory(*args, **kwargs) -> fn(data, seed) -> data, where
data is a dict of tensors (one example, or one batch for kind='batch') and seed
a [2] int64 tensor for TF stateless random ops. Deterministic ops ignore it.
"""
import ast
import functools
import inspect
from typing import Any, Callable

import tensorflow as tf

VALID_KEY = '__valid__'
KINDS = ('example', 'batch')

Op = Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]]
_REGISTRY: dict[str, tuple[Callable[..., Op], str]] = {}


def register(name: str, kind: str = 'example'):
  """Decorator: registers an op factory under `name` for pp strings of `kind`."""
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r} must be one of {KINDS}.')

  def deco(factory):
    if name in _REGISTRY:
      raise ValueError(f'Op {name!r} is registered twice.')
    _REGISTRY[name] = (factory, kind)
    return factory

  return deco


def keyed(key: str = 'image', key_result: str | None = None):
  """Lifts a factory of f(x, seed) -> y to one of f(data, seed) -> data.

  The lifted factory takes two extra keyword arguments: `key` (the input
  feature) and `key_result` (where the output goes; None: overwrite `key`).
  The reference's spelling `inkey` / `outkey` is accepted too, so its configs
  parse unchanged.

  Args:
    key: default input key.
    key_result: default output key (None: same as the input key).
  """

  def deco(factory):

    @functools.wraps(factory)
    def keyed_factory(*args, key=key, key_result=key_result,
                      inkey=None, outkey=None, **kwargs):
      k_in = inkey or key
      k_out = outkey or key_result or k_in
      f = factory(*args, **kwargs)

      def apply(data, seed):
        if k_in not in data:
          raise ValueError(f'{factory.__name__} reads key {k_in!r}, but the '
                           f'example only has keys {sorted(data)}.')
        return {**data, k_out: f(data[k_in], seed)}

      apply.key = k_in
      return apply

    sig = inspect.signature(factory)
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
             for n, d in (('key', key), ('key_result', key_result),
                          ('inkey', None), ('outkey', None))]
    params = [p for p in sig.parameters.values()
              if p.kind != inspect.Parameter.VAR_KEYWORD]
    keyed_factory.__signature__ = sig.replace(parameters=params + extra)
    return keyed_factory

  return deco


def _literal(node: ast.AST, part: str) -> Any:
  try:
    return ast.literal_eval(node)
  except (ValueError, TypeError, SyntaxError, RecursionError):
    raise ValueError(f'Arguments of pp op {part!r} must be Python literals '
                     f'(numbers, strings, tuples, lists, ...).') from None


def parse_op(part: str) -> tuple[str, list[Any], dict[str, Any]]:
  """'resize(32, method="nearest")' -> ('resize', [32], {'method': 'nearest'})."""
  try:
    node = ast.parse(part, mode='eval').body
  except SyntaxError:
    raise ValueError(f'Cannot parse pp op {part!r}: expected NAME or '
                     f'NAME(literal arguments).') from None
  if isinstance(node, ast.Name):
    return node.id, [], {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise ValueError(f'Cannot parse pp op {part!r}: expected NAME or '
                     f'NAME(literal arguments).')
  if any(kw.arg is None for kw in node.keywords):
    raise ValueError(f'pp op {part!r}: **kwargs are not supported.')
  args = [_literal(a, part) for a in node.args]
  kwargs = {kw.arg: _literal(kw.value, part) for kw in node.keywords}
  return node.func.id, args, kwargs


def valid_ops(kind: str) -> list[str]:
  return sorted(n for n, (_, k) in _REGISTRY.items() if k == kind)


def parse(spec: str, kind: str = 'example') -> list[tuple[str, Op]]:
  """Returns [(name, op)] for the '|'-separated ops of `spec` ('' -> [])."""
  ops = []
  for part in (p.strip() for p in spec.split('|')):
    if not part:
      continue
    name, args, kwargs = parse_op(part)
    if name not in _REGISTRY:
      raise ValueError(f'Unknown pp op {name!r} in {spec!r}. Valid {kind} ops: '
                       f'{valid_ops(kind)}.')
    factory, op_kind = _REGISTRY[name]
    if op_kind != kind:
      raise ValueError(f'pp op {name!r} is a {op_kind} op and cannot be used '
                       f'in a {kind} pp string ({spec!r}). Valid {kind} ops: '
                       f'{valid_ops(kind)}.')
    try:
      inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as e:
      raise ValueError(f'Bad arguments in pp op {part!r}: {e}. Signature: '
                       f'{name}{inspect.signature(factory)}.') from None
    ops.append((name, factory(*args, **kwargs)))
  return ops


def compose(ops: list[tuple[str, Op]]) -> Op:
  """Chains ops; op i gets the seed fold_in(seed, i), independent of the rest."""

  def pp(data, seed):
    for i, (_, op) in enumerate(ops):
      data = op(data, tf.random.experimental.stateless_fold_in(seed, i))
    return data

  return pp
