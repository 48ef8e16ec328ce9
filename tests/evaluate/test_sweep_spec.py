"""Sweep specifications: every combination, aliases and dotted keys, clear errors."""
import pytest

from vmoe.evaluate import sweep_spec

CONFIG = {'model': {'encoder': {'moe': {'group_size': 8, 'router': {
    'num_selected_experts': 2, 'noise_std': 1.0,
    'dispatcher': {'capacity_factor': 1.0, 'batch_priority': False}}}}}}


def test_default_sweep_is_every_combination():
  variants = sweep_spec.parse(sweep_spec.DEFAULT_SWEEP, CONFIG)
  assert len(variants) == 6 * 2 * 2
  assert variants[0] == {
      'model.encoder.moe.router.dispatcher.capacity_factor': 0.1,
      'model.encoder.moe.router.num_selected_experts': 1,
      'model.encoder.moe.router.dispatcher.batch_priority': False}
  assert variants[-1]['model.encoder.moe.router.dispatcher.batch_priority'] is True
  assert sweep_spec.short_name('model.encoder.moe.router.dispatcher.capacity_factor') == (
      'capacity_factor')


def test_any_dotted_key():
  variants = sweep_spec.parse('model.encoder.moe.router.noise_std=0,0.5', CONFIG)
  assert [v['model.encoder.moe.router.noise_std'] for v in variants] == [0, 0.5]


@pytest.mark.parametrize('spec', ['capacity=', 'k=1,2', 'model.nope.x=1', 'capacity_factor'])
def test_bad_sweep_lists_valid_keys(spec):
  with pytest.raises(ValueError, match=r"KEY one of \['batch_priority', 'capacity'"):
    sweep_spec.parse(spec, CONFIG)


def test_empty_sweep():
  with pytest.raises(ValueError, match='Empty sweep'):
    sweep_spec.parse(' ; ', CONFIG)
