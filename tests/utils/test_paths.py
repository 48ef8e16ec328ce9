"""Param paths as '/'-joined strings, and regex rules on them."""
import jax.numpy as jnp
import optax
import pytest

from vmoe.utils import paths


def test_paths_of_params_and_optimizer_state():
  params = {'Encoder': {'encoderblock_1': {'Moe': {'Mlp': {'kernel': jnp.zeros((2, 3))}}}},
            'head': {'bias': jnp.zeros(3)}}
  state = optax.chain(optax.scale_by_adam(), optax.identity()).init(params)
  assert sorted(paths.flat(state)) == [
      '0/count', '0/mu/Encoder/encoderblock_1/Moe/Mlp/kernel', '0/mu/head/bias',
      '0/nu/Encoder/encoderblock_1/Moe/Mlp/kernel', '0/nu/head/bias']
  tree = paths.map_with_paths(lambda p, x: p, params)
  assert tree['head']['bias'] == 'head/bias'


def test_first_match_and_patterns():
  rules = [('^head/', 'head'), ('kernel$', 'kernel')]
  assert paths.first_match(rules, 'head/kernel') == 'head'
  assert paths.first_match(rules, 'a/kernel') == 'kernel'
  assert paths.first_match(rules, 'a/bias', 'none') == 'none'
  assert paths.patterns(None) == [] and paths.patterns('a') == ['a']
  assert paths.patterns(('a', 'b')) == ['a', 'b']
  with pytest.raises(ValueError, match=r"Invalid regex '\(' in optimizer.frozen_pattern"):
    paths.patterns('(', what='optimizer.frozen_pattern')
