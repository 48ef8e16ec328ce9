"""Tests for vmoe.checkpoints.export and the `python -m vmoe.export` command."""
import os
import subprocess
import sys

from flax import traverse_util
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from vmoe import export as export_cli
from vmoe.checkpoints import export
from vmoe.checkpoints import legacy
from vmoe.checkpoints import training

REF = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'vmoe_reference')
REPO = os.path.join(os.path.dirname(__file__), '..', '..')


@pytest.fixture(name='params', scope='module')
def params_fixture():
  """The reference's tiny V-MoE, plus a bfloat16 leaf (released checkpoints may have them)."""
  p = legacy.restore(f'{REF}/vmoe_tiny_token')
  p['extra'] = {'bf16': np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)}
  return p


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def _assert_same(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for n, x in want.items():
    assert got[n].dtype == x.dtype and got[n].shape == x.shape, n
    assert got[n].tobytes() == x.tobytes(), n  # Bit for bit.


def test_legacy_export_reads_back_bit_for_bit(params, tmp_path):
  out = str(tmp_path / 'sub' / 'model')
  files = export.export(params, 'legacy', out, num_shards=3)
  assert files == [f'{out}.data-0000{i}-of-00003' for i in range(3)] + [f'{out}.index']
  assert sorted(os.listdir(tmp_path / 'sub')) == sorted(os.path.basename(f) for f in files)
  _assert_same(_flat(legacy.restore(out)), _flat(params))
  shapes = _flat(legacy.read_tree_structure(out))
  assert shapes['Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel'].shape == (4, 32, 64)


def test_legacy_overwrite_removes_stale_data_files(params, tmp_path):
  out = str(tmp_path / 'model')
  export.export(params, 'legacy', out, num_shards=3)
  with pytest.raises(ValueError, match=r'model.data-00000-of-00003 already exists; .* '
                     r'--overwrite'):
    export.export(params, 'legacy', out)
  export.export(params, 'legacy', out, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['model.data-00000-of-00001', 'model.index']
  _assert_same(_flat(legacy.restore(out)), _flat(params))


def test_safetensors_export_loads_with_safetensors(params, tmp_path):
  out = str(tmp_path / 'model.safetensors')
  assert export.export(params, 'safetensors', out) == [out]
  _assert_same(safetensors.numpy.load_file(out), _flat(params))
  assert os.listdir(tmp_path) == ['model.safetensors']  # No temporary file left.
  # Shareable like any new file (safetensors itself writes 0600).
  umask = os.umask(0o022)
  try:
    export.export(params, 'safetensors', out, overwrite=True)
  finally:
    os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o644


def test_npz_export_loads_without_pickle(params, tmp_path):
  out = str(tmp_path / 'model.npz')
  export.export(params, 'npz', out)
  with np.load(out, allow_pickle=False) as z:
    got = {n: z[n] for n in z.files}
  # npz stores bfloat16 as raw 2-byte void ('|V2'); the bytes are still exact.
  bf16 = got.pop('extra/bf16')
  want = _flat(params)
  assert bf16.tobytes() == want.pop('extra/bf16').tobytes()
  _assert_same(got, want)


def test_export_errors(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown export format 'onnx'; valid: \('legacy', "
                     r"'safetensors', 'npz'\)"):
    export.export({'w': np.zeros(2)}, 'onnx', str(tmp_path / 'x'))
  with pytest.raises(ValueError, match=r'param a/w has dtype object; only numeric arrays'):
    export.export({'a': {'w': np.array([None, {}])}}, 'npz', str(tmp_path / 'x.npz'))
  with pytest.raises(ValueError, match=r'the params tree is empty'):
    export.export({}, 'safetensors', str(tmp_path / 'x.st'))
  assert not os.listdir(tmp_path)
  (tmp_path / 'x.npz').write_bytes(b'old')
  with pytest.raises(ValueError, match=r'x.npz already exists'):
    export.export({'w': np.zeros(2)}, 'npz', str(tmp_path / 'x.npz'))
  assert (tmp_path / 'x.npz').read_bytes() == b'old'


def test_cli_run_errors(tmp_path):
  out = str(tmp_path / 'x.npz')
  with pytest.raises(ValueError, match=r'exactly one of --workdir .* and --checkpoint'):
    export_cli.run(workdir=None, checkpoint=None, fmt='npz', out=out)
  with pytest.raises(ValueError, match=r'--num_shards=2: .* only --format=legacy'):
    export_cli.run(workdir=None, checkpoint=f'{REF}/vmoe_tiny_token', fmt='npz', out=out,
                   num_shards=2)
  with pytest.raises(ValueError, match=r"No checkpoint at '/nonexistent'"):
    export_cli.run(workdir='/nonexistent', checkpoint=None, fmt='npz', out=out)


def test_cli_end_to_end_on_the_reference_checkpoint(tmp_path):
  out = str(tmp_path / 'tiny.safetensors')
  cmd = [sys.executable, '-m', 'vmoe.export', f'--checkpoint={REF}/vmoe_tiny_token',
         '--format=safetensors', f'--out={out}']
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f'Wrote {out}' in proc.stdout
  _assert_same(safetensors.numpy.load_file(out), _flat(legacy.restore(f'{REF}/vmoe_tiny_token')))


def test_cli_run_exports_the_latest_checkpoint_of_a_workdir(tmp_path):
  tree = {'params': {'head': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}},
          'step': np.int32(0)}
  ckpt = training.TrainCheckpointer(str(tmp_path / 'work'), every_steps=1, keep_last=2,
                                    asynchronous=False)
  ckpt.save(1, tree)
  ckpt.save(2, {**tree, 'params': {'head': {'kernel': tree['params']['head']['kernel'] + 1}}})
  ckpt.close()
  out = str(tmp_path / 'model')
  files = export_cli.run(workdir=str(tmp_path / 'work'), checkpoint=None, fmt='legacy',
                         out=out)
  assert files == [f'{out}.data-00000-of-00001', f'{out}.index']
  np.testing.assert_array_equal(legacy.restore(out)['head']['kernel'],
                                tree['params']['head']['kernel'] + 1)
