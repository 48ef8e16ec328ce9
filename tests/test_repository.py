"""Properties of the repository itself: it needs nothing beside it, its functions stay short,
and `pytest --xla-defaults` really runs with JAX's and XLA's default settings."""
import ast
import os
import re
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED_DIRS = ('tests', 'benchmarks', 'scripts', 'vmoe', 'configs')
SCANNED_EXTENSIONS = ('.py', '.sh', '.md', '.json')
# Top folders of absolute paths that exist only on some machine (the author's, a cluster's).
# /tmp/ is left out: docstrings use it in examples that work anywhere.
MACHINE_DIRS = ('work', 'root', 'home', 'Users', 'mnt', 'shared', 'scratch', 'gpfs', 'nfs',
                'Volumes')
# Not after a name, a URL's host, '~', '.' or a variable ('${DIR}', '$(pwd)'): those are relative.
MACHINE_PATH = re.compile(r'(?<![\w.~:/})-])/(?:%s)/' % '|'.join(MACHINE_DIRS))
# '..' pieces in a row, written as text joined by slashes or as quoted path pieces.
PARENT_PIECES = re.compile(r"""(?<![\w.])\.\.(?:(?:/|['"]\s*,\s*['"])\.\.)*(?![\w.])""")
# A 'shared' folder beside the repository, as text or as path pieces.
SIBLING_SHARED = re.compile(r"""\.\.(?:/|['"]\s*,\s*['"])shared\b""")
MAX_FUNCTION_LINES = 80
FAST_XLA_FLAG = '--xla_cpu_use_fusion_emitters=false'


def _repo_files(dirs, extensions):
  """Paths, relative to REPO, of the files git tracks or would track (not ignored)."""
  if not os.path.exists(os.path.join(REPO, '.git')):
    pytest.skip('not a git checkout')
  out = subprocess.run(
      ['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z', '--', *dirs],
      cwd=REPO, check=True, capture_output=True, text=True).stdout
  # --cached still lists files deleted from the working tree but not from the index.
  return sorted(p for p in out.split('\0')
                if p.endswith(extensions) and os.path.isfile(os.path.join(REPO, p)))


def _outside_references(path, line):
  """Why `line` of `path` (relative to REPO) reads outside the repository, or None."""
  if SIBLING_SHARED.search(line):
    return 'a shared folder beside the repository'
  match = MACHINE_PATH.search(line)
  if match:
    return f'an absolute machine path ({match.group()})'
  depth = len(os.path.dirname(path).split('/'))  # How far up REPO is from the file.
  for match in PARENT_PIECES.finditer(line):
    if match.group().count('..') > depth:
      return f'climbs above the repository ({match.group()})'
  return None


def test_no_file_reads_outside_the_repository():
  offenders = []
  for path in _repo_files(SCANNED_DIRS, SCANNED_EXTENSIONS):
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        why = _outside_references(path, line)
        if why:
          offenders.append(f'{path}:{number}: {why}: {line.strip()}')
  assert not offenders, ('Files that refer to paths outside the repository (a fresh clone '
                         'has nothing beside it):\n' + '\n'.join(offenders))


# Examples as written in a file two folders down (tests/nn/); '{up}' and '{root}' stand for
# '..' and '/' so that this file itself passes the scan.
@pytest.mark.parametrize('line, why', [
    ("F = os.path.join(HERE, '{up}', '{up}', '{up}', 'shared', 'fixtures')", 'shared folder'),
    ('see {up}/shared/fixtures/x.json', 'shared folder'),
    ("REF = '{root}work/fixtures'", 'absolute machine path'),
    ('WORKDIR={root}home/me/runs', 'absolute machine path'),
    ("P = os.path.join(os.path.dirname(__file__), '{up}', '{up}', '{up}', 'x')", 'climbs above'),
    ('cd {up}/{up}/{up}/other', 'climbs above'),
])
def test_outside_references_are_found(line, why):
  assert why in _outside_references('tests/nn/test_x.py', line.format(up='..', root='/'))


@pytest.mark.parametrize('line', [
    "F = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'vmoe_reference')",
    "REPO = os.path.join(os.path.dirname(__file__), '{up}', '{up}')",
    'workdir=/tmp/runs/x, data in gs://bucket/home/x, files in vmoe/work/ and ~/work/',
    'a range 1..4 and an ellipsis ...',
])
def test_paths_inside_the_repository_are_allowed(line):
  assert _outside_references('tests/nn/test_x.py', line.format(up='..')) is None


def _long_functions(path, source):
  """'path:line name (N lines)' for each function of `source` over MAX_FUNCTION_LINES."""
  functions = sorted((node for node in ast.walk(ast.parse(source, path))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))),
                     key=lambda node: node.lineno)
  return [f'{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)'
          for node in functions if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_in_vmoe_is_longer_than_80_lines():
  offenders = []
  for path in _repo_files(['vmoe'], ('.py',)):
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      offenders += _long_functions(path, f.read())
  assert not offenders, (f'Functions longer than {MAX_FUNCTION_LINES} lines (def line to last '
                         'line); split them:\n' + '\n'.join(offenders))


def _statements(count, indent):
  return [' ' * indent + f'x{i} = {i}' for i in range(count)]


def test_long_functions_are_found_nested_and_async():
  source = '\n'.join([
      '@functools.cache',  # Decorators do not count.
      'def short():', *_statements(79, 2),  # Lines 2-81: 80 lines, allowed.
      'class C:',
      '  async def method(self):', *_statements(80, 4),  # Lines 83-163.
      'def outer():',
      '  def inner():', *_statements(80, 4),  # Lines 165-245.
      '  return inner',  # outer: lines 164-246.
  ])
  assert _long_functions('m.py', source) == [
      'm.py:83 method (81 lines)', 'm.py:164 outer (83 lines)', 'm.py:165 inner (81 lines)']


@pytest.mark.xla_defaults
def test_jax_settings_follow_the_xla_defaults_option(request):
  defaults = request.config.getoption('xla_defaults')
  assert jax.config.read('jax_disable_most_optimizations') is not defaults
  assert (FAST_XLA_FLAG in os.environ.get('XLA_FLAGS', '')) is not defaults
  # Subprocesses (vmoe.main runs) start JAX afresh from the environment they inherit.
  child = subprocess.run(
      [sys.executable, '-c', 'import os, jax; '
       "print(jax.config.read('jax_disable_most_optimizations'), os.environ.get('XLA_FLAGS'))"],
      check=True, capture_output=True, text=True).stdout.split(maxsplit=1)
  assert child[0] == str(not defaults)
  assert (FAST_XLA_FLAG in child[1]) is not defaults
