"""Files written atomically: under a temporary name in the same directory, then renamed,
so that a reader (or a restarted run) sees the old file or the complete new one, never a
part. The rename is atomic on a local (POSIX) file system."""
import contextlib
import csv
import json
import os
import uuid
from typing import Any, Iterator, Sequence


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path to write `path` to; renamed to `path` on success, removed on
  failure. The file gets the mode of any new file (0666 less the umask), also when the
  writer creates it private (as safetensors does)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  try:
    yield tmp
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str):
  with atomic_path(path) as tmp, open(tmp, 'w') as f:
    f.write(text)


def write_json(path: str, obj: Any, **kwargs):
  """json.dump(obj) (indent 1 unless given) to `path`, atomically."""
  write_text(path, json.dumps(obj, **{'indent': 1, **kwargs}))


def write_csv(path: str, rows: Sequence[dict]):
  """One row per dict; the columns are all keys, in order of first appearance."""
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)


def save_figure(fig, path: str, dpi: int = 110):
  """A matplotlib figure as a PNG at `path`, atomically; the figure is closed."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  # Heavy; plots only.
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=dpi, format='png')
  plt.close(fig)
