"""Local TFDS datasets: generated on this machine from bundled data ('digits',
'digit_scenes') or from the files of a manual download ('ade20k'), never downloaded.

prepare(builder_cls, data_dir, manual_dir=None) builds one into a TFDS data dir,
atomically: concurrent callers (threads, processes, pytest-xdist workers) are safe. The
terminal gets one line per build; TFDS's own prints and progress bars go to the log.
"""
import contextlib
import io
import os
import shutil
import tempfile
from typing import TypeVar

from absl import logging
import tensorflow_datasets as tfds

from vmoe.utils import console

Builder = TypeVar('Builder', bound=tfds.core.DatasetBuilder)


def prepare(builder_cls: type[Builder], data_dir: str,
            manual_dir: str | None = None) -> Builder:
  """Returns builder_cls(data_dir=data_dir), building it there if needed.

  Each caller builds into its own temporary directory inside data_dir and
  renames the finished version directory into place; a rename that loses the
  race finds the winner's complete copy. Nothing is downloaded.

  Args:
    builder_cls: the dataset's builder class.
    data_dir: the TFDS data dir.
    manual_dir: the folder of a manual download's files, for a builder that
      reads them. Give it explicitly: TFDS's default, DIR/downloads/manual,
      would be taken under the temporary build dir.
  """
  # Looked up before making a builder: TFDS warns about a version dir it cannot read.
  info = os.path.join(data_dir, builder_cls.name, str(builder_cls.VERSION),
                      'dataset_info.json')
  if os.path.exists(info):
    return builder_cls(data_dir=data_dir)
  console.say(f'Building the {builder_cls.name!r} dataset in {data_dir} (first use; '
              'nothing is downloaded).')
  os.makedirs(data_dir, exist_ok=True)
  tmp_root = tempfile.mkdtemp(prefix=f'.{builder_cls.name}-build-',
                              dir=data_dir)
  try:
    tmp_builder = builder_cls(data_dir=tmp_root)
    chatter = io.StringIO()
    try:
      with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        tmp_builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False,
                                                         manual_dir=manual_dir))
    finally:
      logging.info('TFDS build of %s:\n%s', builder_cls.name, chatter.getvalue())
    version_dir = os.path.dirname(info)
    os.makedirs(os.path.dirname(version_dir), exist_ok=True)
    try:
      os.rename(tmp_builder.data_dir, version_dir)
    except OSError:
      if not os.path.exists(info):  # Not another caller's complete copy.
        raise
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return builder_cls(data_dir=data_dir)
