"""Tests for vmoe.checkpoints.legacy against the checkpoints written by Google's vmoe code."""
import builtins
import filecmp
import hashlib
import json
import os
import shutil

import ml_dtypes
import msgpack
import numpy as np
import pytest

from vmoe.checkpoints import legacy

REF = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'vmoe_reference')
# name -> (leaves, params), from the fixtures' README.
FIXTURES = {'vmoe_tiny_token': (76, 63178), 'vmoe_tiny_gap_ec': (73, 95850)}
SUFFIXES = ('.index', '.data-00000-of-00002', '.data-00001-of-00002')


def _flat(tree):
  return {'/'.join(p): x for p, x in legacy._flatten(tree)}


def _digests(name):
  with open(f'{REF}/{name}_param_digests.json') as f:
    return json.load(f)['leaves']


def _sha(x):
  return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _copy(name, tmp_path):
  for suffix in SUFFIXES:
    shutil.copy(f'{REF}/{name}{suffix}', tmp_path / (name + suffix))
  return str(tmp_path / name)


@pytest.fixture
def opened(monkeypatch):
  """Records every path the legacy module opens."""
  paths = []

  def spy(path, *args, **kwargs):
    paths.append(os.path.basename(path))
    return builtins.open(path, *args, **kwargs)

  monkeypatch.setattr(legacy, 'open', spy, raising=False)
  return paths


def _rewrite(path, fn):
  """Decodes a msgpack file keeping ext types raw, applies fn in place, writes it back."""
  with open(path, 'rb') as f:
    obj = msgpack.unpackb(f.read(), raw=False)
  fn(obj)
  with open(path, 'wb') as f:
    f.write(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize('name', FIXTURES)
def test_reads_reference_checkpoint_bit_exactly(name):
  params = _flat(legacy.restore(f'{REF}/{name}'))
  digests = _digests(name)
  assert (len(params), sum(x.size for x in params.values())) == FIXTURES[name]
  assert set(params) == set(digests)
  for k, x in params.items():
    assert (list(x.shape), str(x.dtype)) == (digests[k]['shape'], digests[k]['dtype']), k
    assert _sha(x) == digests[k]['sha256_of_c_order_bytes'], k


@pytest.mark.parametrize('name', FIXTURES)
def test_read_tree_structure_reads_only_the_index(name, opened):
  structure = _flat(legacy.read_tree_structure(f'{REF}/{name}'))
  assert opened == [name + '.index']
  digests = _digests(name)
  assert {k: (list(s.shape), str(s.dtype)) for k, s in structure.items()} == {
      k: (d['shape'], d['dtype']) for k, d in digests.items()}


def test_partial_read_opens_only_needed_files(opened):
  prefix = f'{REF}/vmoe_tiny_token'
  full = legacy.restore(prefix)
  moe = lambda t: t['Encoder']['encoderblock_1']['Moe']['Mlp']['Dense_0']['kernel']
  # Expert slices [0:1], [1:2], [2:3], [3:4] are in files 1, 0, 1, 0 (README).
  opened.clear()
  out = legacy.restore(prefix, wanted={'Encoder': {'encoderblock_1': {'Moe': {'Mlp': {
      'Dense_0': {'kernel': (slice(1, 2),)}}}}}})
  assert opened == ['vmoe_tiny_token.index', 'vmoe_tiny_token.data-00000-of-00002']
  np.testing.assert_array_equal(moe(out), moe(full)[1:2])
  assert _flat(out).keys() == {'Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel'}
  # A region across slices of both files, next to a whole subtree (head: file 1 only).
  opened.clear()
  wanted = {'Encoder': {'encoderblock_1': {'Moe': {'Mlp': {'Dense_0': {
      'kernel': (slice(1, 3), slice(5, 20))}}}}}, 'head': None}
  out = legacy.restore(prefix, wanted=wanted)
  assert sorted(opened) == ['vmoe_tiny_token.data-00000-of-00002',
                            'vmoe_tiny_token.data-00001-of-00002', 'vmoe_tiny_token.index']
  np.testing.assert_array_equal(moe(out), moe(full)[1:3, 5:20])
  assert set(out) == {'Encoder', 'head'} and set(out['head']) == {'bias', 'kernel'}
  np.testing.assert_array_equal(out['head']['kernel'], full['head']['kernel'])
  opened.clear()
  legacy.restore(prefix, wanted={'head': None})
  assert opened == ['vmoe_tiny_token.index', 'vmoe_tiny_token.data-00001-of-00002']


def test_bad_wanted_is_a_clear_error():
  with pytest.raises(ValueError, match=r'heads is not in the checkpoint'):
    legacy.restore(f'{REF}/vmoe_tiny_token', wanted={'heads': None})
  with pytest.raises(ValueError, match=r'wanted\[.head/bias.\]: expected a tuple of at most 1'):
    legacy.restore(f'{REF}/vmoe_tiny_token', wanted={'head': {'bias': (slice(0, 1),) * 2}})
  with pytest.raises(ValueError, match=r'step 2'):
    legacy.restore(f'{REF}/vmoe_tiny_token', wanted={'head': {'bias': (slice(0, 4, 2),)}})


def _tree():
  rng = np.random.default_rng(0)
  return {
      'moe': {'kernel': rng.normal(size=(4, 6, 5)).astype(np.float32),
              'bias': rng.normal(size=(4, 5)).astype(ml_dtypes.bfloat16)},
      'big': rng.normal(size=(33, 7)).astype(np.float32),  # 924 bytes > max_chunk_bytes.
      'ids': np.arange(10, dtype=np.int32),
      'step': np.int32(7),
      'temperature': np.float32(0.5),
      'layers': [{'w': np.ones((2, 2), np.float32)}, {'w': np.full((3,), 2, np.int32)}],
  }


def test_round_trip_is_bit_exact(tmp_path):
  tree = _tree()
  slices = {'moe': {'kernel': [(slice(e, e + 1),) for e in range(4)],
                    'bias': [(slice(0, 2), slice(0, 3)), (slice(0, 2), slice(3, 5)),
                             (slice(2, 4),)]}}
  prefix = str(tmp_path / 'sub' / 'ckpt')
  legacy.save(prefix, tree, num_shards=3, slices=slices, max_chunk_bytes=64)
  assert sorted(os.listdir(tmp_path / 'sub')) == [
      'ckpt.data-00000-of-00003', 'ckpt.data-00001-of-00003', 'ckpt.data-00002-of-00003',
      'ckpt.index']  # No temporary file left behind.
  out = _flat(legacy.restore(prefix))
  expected = _flat(legacy._state_dict(tree))
  assert out.keys() == expected.keys() and 'layers/1/w' in out
  for k, x in expected.items():
    x = np.asarray(x)
    assert (out[k].shape, out[k].dtype) == (x.shape, x.dtype), k
    assert out[k].tobytes() == x.tobytes(), k
  # The index holds the slices as given, and 'big' is stored as ceil(924 / 64) subchunks.
  index = _flat(legacy._read_index(prefix)[0])
  assert len(index['moe/kernel'].boxes) == 4 and len(index['moe/bias'].boxes) == 3
  leaf_id = list(expected).index('big')
  chunks = []
  for s in range(3):
    with open(f'{prefix}.data-{s:05d}-of-00003', 'rb') as f:
      chunks += msgpack.unpackb(f.read(), raw=False).get(str(leaf_id), [])
  assert [len(subchunks) for subchunks, _ in chunks] == [15]
  # Regions across the tiles of 'moe/bias'.
  part = legacy.restore(prefix, wanted={'moe': {'bias': (slice(1, 3), slice(2, 4))}})
  assert part['moe']['bias'].tobytes() == tree['moe']['bias'][1:3, 2:4].tobytes()


@pytest.mark.parametrize('name', FIXTURES)
def test_resave_reference_layout_gives_googles_bytes(name, tmp_path):
  tree = legacy.restore(f'{REF}/{name}')
  index, _ = legacy._read_index(f'{REF}/{name}')
  slices = legacy._map_tree(
      lambda _, info: [tuple(slice(*b) for b in box) for box in info.boxes], index)
  legacy.save(str(tmp_path / name), tree, num_shards=2, slices=slices)
  for suffix in SUFFIXES:  # Same slices, same shard choice, same bytes as vmoe's writer.
    assert filecmp.cmp(tmp_path / (name + suffix), f'{REF}/{name}{suffix}', shallow=False)
  digests = _digests(name)
  for k, x in _flat(legacy.restore(str(tmp_path / name))).items():
    assert _sha(x) == digests[k]['sha256_of_c_order_bytes'], k


def test_save_rejects_bad_input(tmp_path):
  tree = _tree()
  with pytest.raises(ValueError, match=r'do not cover the whole array'):
    legacy.save(str(tmp_path / 'a'), tree, slices={'ids': [(slice(0, 5),)]})
  with pytest.raises(ValueError, match=r'overlap'):
    legacy.save(str(tmp_path / 'a'), tree, slices={'ids': [(slice(0, 6),), (slice(4, 10),)]})
  with pytest.raises(ValueError, match=r'not leaves of tree'):
    legacy.save(str(tmp_path / 'a'), tree, slices={'idz': [(slice(0, 10),)]})
  with pytest.raises(ValueError, match=r'dtype object'):
    legacy.save(str(tmp_path / 'a'), {'x': np.array([None])})
  assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
  prefix = str(tmp_path / 'ckpt')
  legacy.save(prefix, {'x': np.zeros(3, np.float32)})

  def crash(f, *_):
    f.write(b'\x82partial')
    raise OSError('disk full')

  monkeypatch.setattr(legacy, '_write_data_file', crash)
  with pytest.raises(OSError, match='disk full'):
    legacy.save(prefix, {'x': np.ones(3, np.float32)})
  assert sorted(os.listdir(tmp_path)) == ['ckpt.data-00000-of-00001', 'ckpt.index']
  np.testing.assert_array_equal(legacy.restore(prefix)['x'], np.zeros(3))


def test_missing_data_file(tmp_path):
  prefix = _copy('vmoe_tiny_token', tmp_path)
  os.remove(prefix + '.data-00001-of-00002')
  with pytest.raises(legacy.LegacyCheckpointError,
                     match=r'missing data file .*vmoe_tiny_token\.data-00001-of-00002 '
                           r'\(listed by the index for params Encoder/'):
    legacy.restore(prefix)
  # A region held only by the other file is still readable.
  out = legacy.restore(prefix, wanted={'Encoder': {'encoder_norm': {'bias': None}}})
  assert out['Encoder']['encoder_norm']['bias'].shape == (32,)


def test_missing_or_corrupt_index(tmp_path):
  prefix = _copy('vmoe_tiny_token', tmp_path)
  with open(prefix + '.index', 'r+b') as f:
    f.truncate(1000)
  with pytest.raises(legacy.LegacyCheckpointError,
                     match=r'vmoe_tiny_token\.index is truncated or corrupt'):
    legacy.read_tree_structure(prefix)
  with open(prefix + '.index', 'wb') as f:
    f.write(msgpack.packb({'shard_count': 2, 'index': {'a': 1.0}}))
  with pytest.raises(legacy.LegacyCheckpointError, match=r'leaf a is not an index info'):
    legacy.restore(prefix)
  os.remove(prefix + '.index')
  with pytest.raises(legacy.LegacyCheckpointError, match=r'missing index file .*\.index'):
    legacy.restore(prefix)


def test_truncated_data_file(tmp_path):
  prefix = _copy('vmoe_tiny_gap_ec', tmp_path)
  with open(prefix + '.data-00000-of-00002', 'r+b') as f:
    f.truncate(150_000)
  with pytest.raises(legacy.LegacyCheckpointError,
                     match=r'vmoe_tiny_gap_ec\.data-00000-of-00002 is truncated or corrupt'):
    legacy.restore(prefix)


def test_unknown_ext_code(tmp_path):
  prefix = _copy('vmoe_tiny_token', tmp_path)
  _rewrite(prefix + '.data-00000-of-00002', lambda d: d.update({'0': msgpack.ExtType(42, b'')}))
  with pytest.raises(legacy.LegacyCheckpointError,
                     match=r'data-00000-of-00002 is corrupt: unknown msgpack ext code 42'):
    legacy.restore(prefix)


def test_chunk_listed_by_index_but_absent(tmp_path):
  prefix = str(tmp_path / 'ckpt')
  legacy.save(prefix, {'w': np.arange(8, dtype=np.float32)}, num_shards=2,
              slices={'w': [(slice(0, 4),), (slice(4, 8),)]})
  _rewrite(prefix + '.data-00001-of-00002', lambda d: d.pop('0'))
  with pytest.raises(legacy.LegacyCheckpointError,
                     match=r'ckpt\.data-00001-of-00002: param w: the index lists slices '
                           r'\[\(\(4, 8\),\)\] in this file, but the file holds no such chunk'):
    legacy.restore(prefix)
  # Reading only the first half does not need the damaged file.
  out = legacy.restore(prefix, wanted={'w': (slice(0, 4),)})
  np.testing.assert_array_equal(out['w'], np.arange(4))


def test_chunk_size_mismatch(tmp_path):
  prefix = str(tmp_path / 'ckpt')
  legacy.save(prefix, {'w': np.arange(8, dtype=np.float32)})

  def shorten(d):
    shape, dtype, buf = msgpack.unpackb(d['0'][0][0][0].data)
    d['0'][0][0][0] = msgpack.ExtType(1, msgpack.packb([[7], dtype, buf[:28]]))

  _rewrite(prefix + '.data-00000-of-00001', shorten)
  with pytest.raises(legacy.LegacyCheckpointError,
                     match=r'data-00000-of-00001: param w: chunk of 7 float32 elements does not '
                           r'match its slice'):
    legacy.restore(prefix)


def test_element_never_written(tmp_path):
  # An index whose slices leave a gap (and data files that agree with it).
  prefix = str(tmp_path / 'ckpt')
  w = np.arange(8, dtype=np.float32)
  legacy.save(prefix, {'w': w}, slices={'w': [(slice(0, 4),), (slice(4, 8),)]})
  _rewrite(prefix + '.index', lambda d: d['index'].update(
      w=legacy._index_info(w, [((0, 4),)], [0])))
  _rewrite(prefix + '.data-00000-of-00001', lambda d: d['0'].pop())
  with pytest.raises(legacy.LegacyCheckpointError,
                     match=r'param w: 4 elements of region \(\(0, 8\),\) are never written'):
    legacy.restore(prefix)


def test_chunk_written_twice(tmp_path):
  prefix = str(tmp_path / 'ckpt')
  legacy.save(prefix, {'w': np.arange(8, dtype=np.float32)})
  _rewrite(prefix + '.data-00000-of-00001', lambda d: d['0'].append(d['0'][0]))
  with pytest.raises(legacy.LegacyCheckpointError,
                     match=r'data-00000-of-00001: param w: elements of \(\(0, 8\),\) are written '
                           r'more than once'):
    legacy.restore(prefix)
