"""Write a params tree for other code: the released legacy format, safetensors or npz.

Names are the reference's ('/'-joined paths such as 'Encoder/encoderblock_1/Moe/Mlp/
Dense_0/kernel'; a scanned model's stacked blocks are unstacked to them), so
google-research/vmoe and its notebooks read a 'legacy' export as a released checkpoint;
'safetensors' and 'npz' serve other frameworks. Every format is written under a temporary
name and renamed when complete; nothing uses pickle.
"""
import glob
import os
from typing import Any, Mapping

from flax import traverse_util
import numpy as np
import safetensors.numpy

from vmoe.checkpoints import legacy
from vmoe.nn import scan
from vmoe.utils import files

FORMATS = ('legacy', 'safetensors', 'npz')


def _flat(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  # A scanned model's stacked blocks are written per block, under the reference's names.
  flat = scan.unscan({n: np.asarray(x) for n, x in
                      traverse_util.flatten_dict(params, sep='/').items()})
  if not flat:
    raise ValueError('export: the params tree is empty; nothing to write.')
  for n, x in flat.items():
    if x.dtype.kind not in 'biuf' and x.dtype.name != 'bfloat16':
      raise ValueError(f'export: param {n} has dtype {x.dtype}; only numeric arrays can be '
                       'exported (no pickled objects).')
  return flat


def outputs(fmt: str, out: str) -> list[str]:
  """The existing files an export to `out` would replace."""
  if fmt == 'legacy':
    return sorted(glob.glob(glob.escape(out) + '.index')
                  + glob.glob(glob.escape(out) + '.data-*-of-*'))
  return [out] if os.path.exists(out) else []


def _write_npz(path: str, flat: dict[str, np.ndarray]):
  with open(path, 'wb') as f:  # A file object: savez would append '.npz' to a name.
    np.savez(f, **flat)


def export(params: Mapping[str, Any], fmt: str, out: str, *, num_shards: int = 1,
           overwrite: bool = False) -> list[str]:
  """Writes `params` (nested dict of arrays) to `out`; returns the files written.

  fmt: 'legacy' (out is a prefix: OUT.index + OUT.data-NNNNN-of-NNNNN, num_shards data
  files at most), 'safetensors' (one file, keys '/'-joined) or 'npz' (np.load(out,
  allow_pickle=False) gives '/'-joined keys). Existing outputs are an error unless
  overwrite; then a legacy export also removes the old data files it no longer uses.
  """
  if fmt not in FORMATS:
    raise ValueError(f'Unknown export format {fmt!r}; valid: {FORMATS}.')
  old = outputs(fmt, out)
  if old and not overwrite:
    raise ValueError(f'{old[0]} already exists; choose another output or pass '
                     '--overwrite.')
  flat = _flat(params)
  if fmt == 'legacy':
    legacy.save(out, traverse_util.unflatten_dict(flat, sep='/'), num_shards=num_shards)
    # One slice per leaf, and save() writes no empty data file.
    shards = min(num_shards, len(flat))
    keep = {f'{out}.index'} | {f'{out}.data-{s:05d}-of-{shards:05d}' for s in range(shards)}
    for path in set(outputs(fmt, out)) - keep:
      os.remove(path)
    return sorted(keep)
  if fmt == 'safetensors':
    flat = {n: np.ascontiguousarray(x) for n, x in flat.items()}
    with files.atomic_path(out) as tmp:
      safetensors.numpy.save_file(flat, tmp)
  else:
    with files.atomic_path(out) as tmp:
      _write_npz(tmp, flat)
  return [out]
