"""vmoe.cli: what C++ code writes to file descriptor 2 at start-up goes to the log file."""
import os
import sys

from vmoe import cli


def test_native_stderr_is_captured_and_python_stderr_is_not(capfd):
  with cli._native_stderr() as native:  # pylint: disable=protected-access
    os.write(2, b'I0000 cpu_feature_guard.cc:227] from C++\n')
    print('from Python', file=sys.stderr)
  assert native == ['I0000 cpu_feature_guard.cc:227] from C++\n']
  assert 'from Python' in capfd.readouterr().err
