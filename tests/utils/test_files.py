"""Atomic writes: the old file or the whole new one, never a part."""
import json
import os
import stat

import pytest

from vmoe.utils import files


def test_write_json_replaces_the_whole_file(tmp_path):
  path = str(tmp_path / 'sub' / 'metrics.json')
  files.write_json(path, {'a': 1})
  files.write_json(path, {'b': [1, 2]}, indent=2, sort_keys=True)
  assert json.loads(open(path).read()) == {'b': [1, 2]}
  assert os.listdir(tmp_path / 'sub') == ['metrics.json']  # No temporary file left.


def test_a_failed_write_leaves_the_old_file(tmp_path):
  path = str(tmp_path / 'out.txt')
  files.write_text(path, 'old')
  with pytest.raises(RuntimeError):
    with files.atomic_path(path) as tmp:
      with open(tmp, 'w') as f:
        f.write('half')
      raise RuntimeError('killed mid-write')
  assert open(path).read() == 'old' and os.listdir(tmp_path) == ['out.txt']


def test_a_private_file_gets_the_mode_of_a_new_file(tmp_path):
  path = str(tmp_path / 'export.bin')
  with files.atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(b'x')
    os.chmod(tmp, 0o600)  # As safetensors creates its files.
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_csv_has_every_column(tmp_path):
  path = str(tmp_path / 'rows.csv')
  files.write_csv(path, [{'a': 1}, {'a': 2, 'b': 3}])
  assert open(path).read().splitlines() == ['a,b', '1,', '2,3']


def test_check_writable(tmp_path):
  files.check_writable('w', str(tmp_path / 'w'), str(tmp_path / 'w' / 'checkpoints'))
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match=r"--workdir='bad' cannot be written .*Not a directory"):
    files.check_writable('bad', str(tmp_path / 'file' / 'sub'))
