"""Local TFDS datasets: generated on this machine from bundled data ('digits',
'digit_scenes') or from the files of a manual download ('ade20k'), never downloaded.

prepare(builder_cls, data_dir, manual_dir=None) builds one into a TFDS data dir,
atomically: concurrent callers (threads, processes, pytest-xdist workers) are safe.
"""
import os
import shutil
import tempfile
from typing import TypeVar

import tensorflow_datasets as tfds

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
  builder = builder_cls(data_dir=data_dir)
  if builder.is_prepared():
    return builder
  os.makedirs(data_dir, exist_ok=True)
  tmp_root = tempfile.mkdtemp(prefix=f'.{builder_cls.name}-build-',
                              dir=data_dir)
  try:
    tmp_builder = builder_cls(data_dir=tmp_root)
    tmp_builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False,
                                                     manual_dir=manual_dir))
    os.makedirs(os.path.dirname(builder.data_dir), exist_ok=True)
    try:
      os.rename(tmp_builder.data_dir, builder.data_dir)
    except OSError:
      if not builder_cls(data_dir=data_dir).is_prepared():
        raise
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return builder_cls(data_dir=data_dir)
