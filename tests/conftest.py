"""Fixtures shared by every test folder, and test-wide JAX settings."""
import os

# The suite is dominated by XLA compile time of tiny models; skipping most of XLA's
# optimisation passes halves it and changes no result beyond float rounding (the reference
# fixtures still match to 1e-6). Set through the environment so that subprocesses
# (vmoe.main runs) inherit it, before anything imports JAX.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# XLA:CPU's fusion emitters compile tiny models ~2.5x slower than the older loop
# emitters; the computed values are the same (subprocesses that set their own
# XLA_FLAGS add this flag too).
if '--xla_cpu_use_fusion_emitters' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_use_fusion_emitters=false').strip()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the offline 'digits' dataset, built once per session."""
  from vmoe.data import digits  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds_data'))
  digits.prepare(data_dir)
  return data_dir
