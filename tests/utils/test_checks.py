"""Config checks and dotted keys: one error naming the value and the fix."""
import copy

import ml_collections
import pytest

from vmoe.utils import checks
from vmoe.utils import dotted


def test_value_checks():
  checks.check_keys({'a': 1}, ('a', 'b'), 'config.x')
  with pytest.raises(ValueError, match=r"Unknown key\(s\) \['c'\] in config.x; valid keys: "
                     r"\['a', 'b'\]"):
    checks.check_keys({'a': 1, 'c': 2}, ('a', 'b'), 'config.x')
  assert checks.positive_int(3, 'k') == 3 and checks.positive_int(None, 'k', optional=True) is None
  for bad in (0, -1, True, 1.0, '2'):
    with pytest.raises(ValueError, match='must be a positive integer'):
      checks.positive_int(bad, 'k')
  with pytest.raises(ValueError, match=r"config.x.y=3 must be a sub-config"):
    checks.sub_config({'y': 3}, 'y', 'config.x')
  with pytest.raises(ValueError, match=r"k='c' is unknown; valid: \('a', 'b'\)"):
    checks.one_of('c', ('a', 'b'), 'k')


def test_kwargs_against_a_signature():
  def component(*, a, b=1):
    del a, b
  checks.check_kwargs(component, {'a': 0}, what='x')
  with pytest.raises(ValueError, match=r"Unknown key\(s\) \['c'\] in x"):
    checks.check_kwargs(component, {'a': 0, 'c': 1}, what='x')
  with pytest.raises(ValueError, match=r"Missing key\(s\) \['a'\] in x"):
    checks.check_kwargs(component, {}, what='x')
  checks.check_kwargs(component, {'b': 2}, what='x', provided={'a'})


def test_dotted_keys():
  config = ml_collections.ConfigDict({'model': {'encoder': {'moe': {'k': 1}}}, 'seed': 0})
  dotted.check_path(config, 'model.encoder.moe.k')
  with pytest.raises(ValueError, match=r"Unknown config key 'model.encodr.x': config.model "
                     r"has no key 'encodr'; valid keys: \['encoder'\]"):
    dotted.check_path(config, 'model.encodr.x')
  assert dotted.flatten({'a': {'b': 1, 'c': {'d': 2}}}) == {'a.b': 1, 'a.c.d': 2}
  plain = config.to_dict()
  before = copy.deepcopy(plain)
  changed = dotted.with_values(plain, {'model.encoder.moe.k': 2, 'model.new.x': 3})
  assert plain == before  # A copy: the config itself is never edited.
  assert changed['model']['encoder']['moe']['k'] == 2 and changed['model']['new'] == {'x': 3}
  with pytest.raises(ValueError, match="'seed' is not a sub-config"):
    dotted.with_values(plain, {'seed.x': 1})
