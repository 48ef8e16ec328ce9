"""Dataset metadata (builder, split_info) and the checks of a dataset entry."""
import logging
import os
import threading

import ml_collections
import pytest
import tensorflow_datasets as tfds

from vmoe.data import digits
from vmoe.data import pipeline

WHERE = 'config.dataset.x'
GOOD = dict(name='digits', split='train', process='decode|keep("image", "label")',
            batch_size=8)
DELETE = object()


def test_builder_loads_each_dataset_info_once(make_cfg, data_dir_copy, caplog,
                                              monkeypatch):
  caplog.set_level(logging.INFO, logger='absl')
  loads = lambda: sum('Load dataset info' in r.getMessage() for r in caplog.records)
  cfg = make_cfg(split='train', data_dir=data_dir_copy)
  b = pipeline.builder(cfg)
  assert pipeline.builder(make_cfg(split='test', data_dir=data_dir_copy)) is b
  monkeypatch.setenv('TFDS_DATA_DIR', data_dir_copy)  # The same data dir.
  assert pipeline.builder(make_cfg(data_dir=None)) is b
  assert pipeline.get_dataset_info(cfg) == (1437, 10)
  pipeline.make_eval_iterable(make_cfg(data_dir=data_dir_copy), process_index=0,
                              process_count=1)
  next(pipeline.make_train_iterator(cfg, seed=0, process_index=0, process_count=1))
  assert loads() == 1
  tfds.builder('digits', data_dir=data_dir_copy)  # What each of them did before.
  assert loads() == 2


def test_builder_does_not_remember_a_failure(make_cfg, data_dir_copy, monkeypatch):
  calls = []
  prepare = digits.prepare

  def fails_once(data_dir):
    calls.append(data_dir)
    if len(calls) == 1:
      raise ValueError('not prepared yet')
    return prepare(data_dir)

  monkeypatch.setattr(digits, 'prepare', fails_once)
  cfg = make_cfg(data_dir=data_dir_copy)
  with pytest.raises(ValueError, match='not prepared yet'):
    pipeline.builder(cfg)
  b = pipeline.builder(cfg)
  assert b.is_prepared() and pipeline.builder(cfg) is b and len(calls) == 2


def test_concurrent_builders_build_digits_once(make_cfg, tmp_path, monkeypatch):
  calls, prepare = [], digits.prepare
  monkeypatch.setattr(digits, 'prepare', lambda d: calls.append(d) or prepare(d))
  cfg = make_cfg(data_dir=str(tmp_path))
  builders, errors = [], []

  def load():
    try:
      builders.append(pipeline.builder(cfg))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=load) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(builders) == 4
  assert all(b is builders[0] for b in builders) and len(calls) == 1
  assert pipeline.split_info(builders[0], 'test').num_examples == 360
  assert os.listdir(tmp_path) == ['digits']  # No temporary build directory left.


@pytest.mark.parametrize('name, match', [
    ('digitz', r"Unknown dataset 'digitz': no TFDS builder"),
    ('huggingface:mnist', r"'huggingface:mnist': namespaced datasets \(huggingface:\) "
     r'are not supported'),
])
def test_builder_errors(make_cfg, name, match):
  with pytest.raises(ValueError, match=match):
    pipeline.builder(make_cfg(name=name))


def test_split_info(make_cfg):
  b = pipeline.builder(make_cfg())
  assert pipeline.split_info(b, 'train').num_examples == 1437
  assert pipeline.split_info(b, 'test[:10%]+train[:1]').num_examples == 37


@pytest.mark.parametrize('split, match', [
    ('validation', r"Bad split 'validation' for dataset 'digits' \(Unknown split "
     r"'validation'.*\)\. Its splits: \['train', 'test'\]\."),
    ('test[:400]', r"Bad split 'test\[:400\]' for dataset 'digits' \(.*360 examples"),
    ('test[:0]', r"Split 'test\[:0\]' of 'digits' selects no examples\. Its splits: "),
    ('train[50%:50%]', r"Split 'train\[50%:50%\]' of 'digits' selects no examples"),
])
def test_split_info_errors(make_cfg, split, match):
  with pytest.raises(ValueError, match=match):
    pipeline.split_info(pipeline.builder(make_cfg()), split)


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('overrides', [
    {}, dict(cache=None), dict(cache=False), dict(cache=True), dict(cache='loaded'),
    dict(shuffle_buffer=0, prefetch=-1, prefetch_device=0),
    dict(shuffle_buffer=None, prefetch=None, prefetch_device=None),
    dict(process_batch='mixup(0.2)', data_dir='/d', manual_dir='/m', prefetch_device=2,
         shuffle_buffer=100, prefetch=0),
])
def test_good_configs_pass(train, overrides):
  cfg = {**GOOD, **overrides}
  pipeline.check_config(cfg, WHERE, train=train)
  pipeline.check_config(ml_collections.ConfigDict(cfg), WHERE, train=train)


def test_batched_cache_passes_for_eval():
  pipeline.check_config({**GOOD, 'cache': 'batched'}, WHERE, train=False)


BAD = [  # (id, key, value or DELETE, train, regex the message must match).
    ('unknown_key', 'shufle_buffer', 10, True,
     r"Unknown key\(s\) \['shufle_buffer'\] in config\.dataset\.x; valid keys: "
     r"\['batch_size', 'cache', .*'shuffle_buffer', 'split'\]\."),
    ('missing_process', 'process', DELETE, False,
     r"config\.dataset\.x lacks \['process'\]; valid keys: \['batch_size'"),
    ('none_batch_size', 'batch_size', None, True, r"config\.dataset\.x lacks \['batch_size'\]"),
    ('name_int', 'name', 3, True, r'config\.dataset\.x\.name=3 must be a string\.'),
    ('split_tuple', 'split', ('train',), True,
     r"config\.dataset\.x\.split=\('train',\) must be a string\."),
    ('data_dir_path', 'data_dir', 1, False, r'config\.dataset\.x\.data_dir=1 must be a'),
    ('pp_op_typo', 'process', 'decode|resize_typo(3)', True,
     r"config\.dataset\.x\.process: Unknown pp op 'resize_typo'"),
    ('pp_bad_args', 'process', 'resize(1, 2, 3, 4)', False,
     r"config\.dataset\.x\.process: Bad arguments in pp op 'resize\(1, 2, 3, 4\)'"),
    ('batch_op_is_example_op', 'process_batch', 'decode', True,
     r"config\.dataset\.x\.process_batch: pp op 'decode' is a example op"),
    ('batch_size_zero', 'batch_size', 0, True,
     r'config\.dataset\.x\.batch_size=0 must be a positive integer\.'),
    ('batch_size_float', 'batch_size', 8.0, False, r'config\.dataset\.x\.batch_size=8\.0'),
    ('batch_size_bool', 'batch_size', True, False, r'config\.dataset\.x\.batch_size=True'),
    ('cache_string', 'cache', 'yes', False,
     r"config\.dataset\.x\.cache='yes' must be one of \(None, False, True, 'loaded', "
     r"'batched'\)\."),
    ('cache_int', 'cache', 1, True, r'config\.dataset\.x\.cache=1 must be one of'),
    ('cache_batched_train', 'cache', 'batched', True,
     r"config\.dataset\.x\.cache='batched' keeps preprocessed batches, for eval splits "
     r"only: .*use cache='loaded' \(or True\)"),
    ('shuffle_buffer_negative', 'shuffle_buffer', -1, True,
     r'config\.dataset\.x\.shuffle_buffer=-1 must be an integer >= 0'),
    ('shuffle_buffer_float', 'shuffle_buffer', 1.5, True,
     r'config\.dataset\.x\.shuffle_buffer=1\.5'),
    ('prefetch_below_autotune', 'prefetch', -2, False,
     r'config\.dataset\.x\.prefetch=-2 must be an integer >= 0 \(batches\), or None / -1'),
    ('prefetch_string', 'prefetch', 'auto', False, r"config\.dataset\.x\.prefetch='auto'"),
    ('prefetch_device_negative', 'prefetch_device', -1, True,
     r'config\.dataset\.x\.prefetch_device=-1 must be an integer >= 0 \(train batches'),
    ('prefetch_device_float', 'prefetch_device', 1.5, False,
     r'config\.dataset\.x\.prefetch_device=1\.5'),
    ('prefetch_device_bool', 'prefetch_device', True, True,
     r'config\.dataset\.x\.prefetch_device=True'),
]


@pytest.mark.parametrize('case', BAD, ids=[c[0] for c in BAD])
def test_bad_config_is_rejected_naming_the_key(case):
  _, key, value, train, match = case
  cfg = {k: v for k, v in GOOD.items() if k != key}
  if value is not DELETE:
    cfg[key] = value
  with pytest.raises(ValueError, match=match):
    pipeline.check_config(cfg, WHERE, train=train)
  with pytest.raises(ValueError, match=match):
    pipeline.check_config(ml_collections.ConfigDict(cfg), WHERE, train=train)


def test_not_a_mapping_is_rejected():
  with pytest.raises(ValueError, match=r"config\.dataset\.x must be a sub-config with "
                     r"keys \['batch_size', .*\], got 'digits'\."):
    pipeline.check_config('digits', WHERE, train=False)


def test_the_iterators_check_their_config(make_cfg):
  with pytest.raises(ValueError, match=r"cfg\.cache='batched' keeps preprocessed"):
    pipeline.make_train_iterator(make_cfg(cache='batched'), seed=0, process_index=0,
                                 process_count=1)
  with pytest.raises(ValueError, match=r'cfg\.prefetch_device=-1'):
    pipeline.make_eval_iterable(make_cfg(prefetch_device=-1), process_index=0,
                                process_count=1)
