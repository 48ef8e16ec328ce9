"""Fixtures shared by every test folder, and test-wide JAX settings."""
import os

import pytest

XLA_DEFAULTS = 'xla_defaults'


def pytest_addoption(parser):
  parser.addoption(
      '--xla-defaults', action='store_true',
      help='Keep JAX and XLA at their default settings (what users get) instead of the '
      "suite's fast-compile settings, and run only the tests marked xla_defaults.")


def pytest_configure(config):
  """Sets the fast-compile settings unless --xla-defaults is given."""
  # Runs after option parsing and before any test module imports JAX; xdist workers run it
  # too, with the same options.
  if config.getoption('xla_defaults'):
    return
  # The suite is dominated by XLA compile time of tiny models; skipping most of XLA's
  # optimisation passes halves it and changes no result beyond float rounding (the reference
  # fixtures still match to 1e-6). Set through the environment so that subprocesses
  # (vmoe.main runs, xdist workers) inherit it, before anything imports JAX.
  os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  # XLA:CPU's fusion emitters compile tiny models ~2.5x slower than the older loop
  # emitters; the computed values are the same (subprocesses that set their own
  # XLA_FLAGS add this flag too).
  if '--xla_cpu_use_fusion_emitters' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_cpu_use_fusion_emitters=false').strip()


def pytest_collection_modifyitems(config, items):
  """With --xla-defaults, deselects the tests not marked xla_defaults."""
  if not config.getoption('xla_defaults'):
    return
  selected, deselected = [], []
  for item in items:
    (selected if item.get_closest_marker(XLA_DEFAULTS) else deselected).append(item)
  config.hook.pytest_deselected(items=deselected)
  items[:] = selected


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the offline 'digits' dataset, built once per session."""
  from vmoe.data import digits  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds_data'))
  digits.prepare(data_dir)
  return data_dir


@pytest.fixture(scope='session')
def digit_scenes_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the offline 'digit_scenes' dataset, built once per session.

  pytest-xdist workers share one dir in the session's base temp dir: the first to get
  there builds it (digit_scenes.prepare is atomic and safe under concurrent callers).
  """
  from vmoe.data import digit_scenes  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # The session's dir, above the workers' own.
  data_dir = str(root / 'tfds_digit_scenes')
  digit_scenes.prepare(data_dir)
  return data_dir
