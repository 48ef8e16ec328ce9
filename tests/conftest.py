"""Fixtures shared by every test folder."""
import pytest


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the offline 'digits' dataset, built once per session."""
  from vmoe.data import digits  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds_data'))
  digits.prepare(data_dir)
  return data_dir
