"""Tests for vmoe.checkpoints.initialization (config.initialization)."""
import json
import os

from flax import traverse_util
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.ndimage

from vmoe.checkpoints import initialization as ini
from vmoe.checkpoints import legacy
from vmoe.nn import models

REF = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'vmoe_reference')
POS = 'Encoder/posembed_input/pos_embedding'


def _dense_config(**moe):
  """A tiny ViT on 8x8 images (4 patches + cls = 5 tokens); MoE in `moe['layers']`."""
  encoder = dict(num_layers=2, mlp_dim=32, num_heads=2)
  if moe:
    encoder['moe'] = dict(group_size=10, router=dict(
        num_selected_experts=1, dispatcher=dict(capacity_factor=1.0)), **moe)
  return dict(num_classes=5, patch_size=(4, 4), hidden_size=16, classifier='token',
              encoder=encoder)


def _shapes(config, image_size=8):
  model = models.build_model(config, (image_size, image_size))
  x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), np.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)['params']


def _random(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), tree)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def _npz(path, flat):
  np.savez(path, **flat)
  return str(path)


def _sds(shape):
  return jax.ShapeDtypeStruct(shape, np.float32)


@pytest.mark.parametrize('name', ['vmoe_tiny_token', 'vmoe_tiny_gap_ec'])
def test_reference_fixture_through_initialization_gives_its_logits(name):
  config = json.load(open(f'{REF}/{name}_config.json'))['model_kwargs']
  images = np.load(f'{REF}/{name}_inputs.npy')
  model = models.build_model(config, images.shape[1:3])
  target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))['params']
  init = jax.tree.map(lambda s: np.full(s.shape, np.nan, s.dtype), target)
  params, report = ini.initialize(target, init, {'source': 'legacy',
                                                 'path': f'{REF}/{name}'})
  assert not report.initialized and not report.dropped and len(report.loaded) == len(
      _flat(target))
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x)[0])(params, images)
  np.testing.assert_allclose(logits, np.load(f'{REF}/{name}_logits.npy'), atol=1e-5, rtol=0)


UPCYCLE = [('rename', r'^(Encoder/encoderblock_1)/Mlp/', r'\1/Moe/Mlp/'),
           ('expand_tile', r'/Moe/Mlp/', 4)]


def test_upcycling_copies_the_dense_mlp_into_every_expert(tmp_path):
  dense = _random(_shapes(_dense_config()), seed=0)
  prefix = str(tmp_path / 'dense')
  legacy.save(prefix, dense)
  target = _shapes(_dense_config(layers=(1,), num_experts=4))
  init = _random(target, seed=1)
  cfg = ml_collections.ConfigDict(  # As config.initialization holds it.
      {'source': 'legacy', 'path': prefix, 'rules': UPCYCLE, 'allow_missing': '/Router/'})
  params, report = ini.initialize(target, init, cfg)
  got, want, fresh = _flat(params), _flat(dense), _flat(init)
  moe = 'Encoder/encoderblock_1/Moe/Mlp/'
  for leaf in ('Dense_0/kernel', 'Dense_0/bias', 'Dense_1/kernel', 'Dense_1/bias'):
    x = got[moe + leaf]
    assert x.shape == (4,) + want['Encoder/encoderblock_1/Mlp/' + leaf].shape
    for e in range(4):
      np.testing.assert_array_equal(x[e], want['Encoder/encoderblock_1/Mlp/' + leaf])
    assert report.loaded[moe + leaf].endswith('| rename | expand_tile(4)')
  router = 'Encoder/encoderblock_1/Moe/Router/dense/kernel'
  assert got[router] is fresh[router]
  assert report.initialized == {router: 'not in the checkpoint (allow_missing)'}
  for name, x in want.items():  # Everything else is copied as is.
    if '/encoderblock_1/Mlp/' not in name:
      np.testing.assert_array_equal(got[name], x)
  text = ini.format_report(report)
  assert f'init    {router}' in text and 'loaded  cls\n' in text


def _posemb(tmp_path, source, target_shape, **rule_args):
  path = _npz(tmp_path / 'pos.npz', {POS: source})
  target = {'Encoder': {'posembed_input': {'pos_embedding': _sds(target_shape)}}}
  init = _random(target, seed=3)
  rule = ('resize_posemb', 'pos_embedding$') + tuple(rule_args.values())
  params, report = ini.initialize(target, init, {'source': 'npz', 'path': path,
                                                 'rules': [rule]})
  return _flat(params)[POS], _flat(init)[POS], report


def test_posemb_resize_keeps_class_token_and_interpolates_grid(tmp_path):
  rng = np.random.default_rng(0)
  src = rng.normal(size=(1, 1 + 16, 8)).astype(np.float32)
  got, _, report = _posemb(tmp_path, src, (1, 1 + 36, 8))
  assert got.shape == (1, 37, 8) and got.dtype == np.float32
  np.testing.assert_array_equal(got[:, 0], src[:, 0])
  zoomed = scipy.ndimage.zoom(src[0, 1:].reshape(4, 4, 8), (6 / 4, 6 / 4, 1), order=1)
  np.testing.assert_allclose(got[0, 1:].reshape(6, 6, 8), zoomed, atol=1e-6)
  assert report.loaded[POS] == f'{POS} | resize_posemb(4x4->6x6)'


def test_posemb_resize_constant_and_ramp_without_class_token(tmp_path):
  ramp = np.arange(4, dtype=np.float32)[:, None] * 2 + np.arange(4)[None, :] * 3  # [h, w]
  src = np.stack([np.full((4, 4), 7.), ramp], -1).reshape(1, 16, 2).astype(np.float32)
  got, _, _ = _posemb(tmp_path, src, (1, 49, 2))
  grid = got[0].reshape(7, 7, 2)
  np.testing.assert_allclose(grid[..., 0], 7, rtol=1e-6)
  i = np.linspace(0, 3, 7)  # Corners stay corners, so a ramp stays the same ramp.
  np.testing.assert_allclose(grid[..., 1], i[:, None] * 2 + i[None, :] * 3, atol=1e-5)


def test_posemb_resize_class_token_dropped_or_fresh_and_explicit_grids(tmp_path):
  src = np.random.default_rng(0).normal(size=(1, 1 + 16, 4)).astype(np.float32)
  got, _, _ = _posemb(tmp_path, src, (1, 16, 4))  # token -> gap: the class row is dropped.
  np.testing.assert_allclose(got, src[:, 1:], atol=1e-6)
  got, fresh, _ = _posemb(tmp_path, src[:, 1:], (1, 17, 4))  # gap -> token: fresh row.
  np.testing.assert_array_equal(got[:, 0], fresh[:, 0])
  np.testing.assert_allclose(got[:, 1:], src[:, 1:], atol=1e-6)
  # Non-square grids need the grids spelled out: 2x8 -> 4x4 with the class token.
  got, _, _ = _posemb(tmp_path, src, (1, 17, 4), grid=(2, 8), new_grid=(4, 4))
  zoomed = scipy.ndimage.zoom(src[0, 1:].reshape(2, 8, 4), (2, 0.5, 1), order=1)
  np.testing.assert_allclose(got[0, 1:].reshape(4, 4, 4), zoomed, atol=1e-6)
  with pytest.raises(ValueError, match=r'20 tokens, which is not an 4x4 grid'):
    _posemb(tmp_path, np.zeros((1, 20, 4), np.float32), (1, 17, 4))


# vision_transformer's names for our blocks, and the rules that map them back.
VIT_NAMES = [('Encoder/', 'Transformer/'), ('SelfAttention', 'MultiHeadDotProductAttention_1'),
             ('/LayerNorm_1/', '/LayerNorm_2/'), ('/Mlp/', '/MlpBlock_3/')]
VIT_RULES = [('rename', '^Transformer/', 'Encoder/'),
             ('rename', '/MultiHeadDotProductAttention_1/', '/SelfAttention/'),
             ('rename', '/LayerNorm_2/', '/LayerNorm_1/'),
             ('rename', '/MlpBlock_3/', '/Mlp/'),
             ('reinit', '^head/')]


def _vit_npz(tmp_path, flat):
  vit = {}
  for name, x in flat.items():
    for ours, theirs in VIT_NAMES:
      name = name.replace(ours, theirs)
    vit[name] = x
  return _npz(tmp_path / 'vit.npz', vit)


def test_npz_vit_checkpoint_with_rename_rules_and_new_head(tmp_path):
  dense = _flat(_random(_shapes(_dense_config()), seed=0))
  dense['head/kernel'] = np.ones((16, 1000), np.float32)  # Pretrained on 1000 classes.
  dense['head/bias'] = np.ones((1000,), np.float32)
  path = _vit_npz(tmp_path, dense)
  assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in np.load(path)
  target = _shapes(_dense_config())
  init = _random(target, seed=1)
  params, report = ini.initialize(target, init, {'source': 'npz', 'path': path,
                                                 'rules': VIT_RULES})
  got = _flat(params)
  for name, x in dense.items():
    np.testing.assert_array_equal(got[name], _flat(init)[name] if name.startswith('head/')
                                  else x)
  assert set(report.initialized) == {'head/bias', 'head/kernel'}
  assert report.dropped == {'head/bias': "reinit '^head/'", 'head/kernel': "reinit '^head/'"}
  assert report.loaded['Encoder/encoderblock_1/Mlp/Dense_0/bias'] == (
      'Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias | rename')


def test_orbax_source_and_only_needed_legacy_arrays_are_read(tmp_path, monkeypatch):
  tree = {'a': {'kernel': np.arange(6.).reshape(2, 3)}, 'b': np.ones(4, np.float32)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'ckpt' / 'state', {'params': tree})
  target = {'a': {'kernel': _sds((2, 3))}}
  params, report = ini.initialize(target, _random(target, 0), {
      'source': 'orbax', 'path': str(tmp_path / 'ckpt'), 'rules': [('drop', '^b$')]})
  np.testing.assert_array_equal(params['a']['kernel'], tree['a']['kernel'])
  assert params['a']['kernel'].dtype == np.float32  # Cast to the model's dtype.
  assert report.dropped == {'b': "drop '^b$'"}
  legacy.save(str(tmp_path / 'leg'), tree)
  calls, restore = [], legacy.restore

  def spy(prefix, wanted=None):
    calls.append(wanted)
    return restore(prefix, wanted=wanted)

  monkeypatch.setattr(legacy, 'restore', spy)
  ini.initialize(target, _random(target, 0), {
      'source': 'legacy', 'path': str(tmp_path / 'leg'), 'allow_unused': True})
  assert calls == [{'a': {'kernel': None}}]  # 'b' is never read.


def test_stack_unstack_and_reshape(tmp_path):
  flat = {'Transformer/encoderblock/w': np.arange(24.).reshape(3, 2, 4).astype(np.float32)}
  path = _npz(tmp_path / 'scan.npz', flat)
  target = {f'block_{i}': {'w': _sds((8,))} for i in range(3)}
  params, _ = ini.initialize(target, _random(target, 0), {'source': 'npz', 'path': path, 'rules': [
      ('unstack', '^Transformer/encoderblock/', 'block_{i}/'), ('reshape', '/w$', (-1,))]})
  for i in range(3):
    np.testing.assert_array_equal(params[f'block_{i}']['w'], flat[
        'Transformer/encoderblock/w'][i].reshape(-1))
  # And back: per-layer names stacked on a new leading axis.
  path = _npz(tmp_path / 'layers.npz', {f'enc_{i}/w': np.full(2, i, np.float32) for i in range(3)})
  target = {'enc': {'w': _sds((3, 2))}}
  params, report = ini.initialize(target, _random(target, 0), {
      'source': 'npz', 'path': path, 'rules': [('stack', r'^enc_(?P<i>\d+)/', 'enc/')]})
  np.testing.assert_array_equal(params['enc']['w'], [[0, 0], [1, 1], [2, 2]])
  assert report.loaded['enc/w'] == 'enc_0/w, enc_1/w, enc_2/w | stack(3)'


def test_freeze_listed_in_report(tmp_path):
  path = _npz(tmp_path / 'x.npz', {'Encoder/w': np.zeros(2, np.float32)})
  target = {'Encoder': {'w': _sds((2,))}, 'head': {'kernel': _sds((2,))}}
  _, report = ini.initialize(target, _random(target, 0), {
      'source': 'npz', 'path': path, 'rules': [('reinit', '^head/')], 'freeze': '^Encoder/'})
  assert report.frozen == ['Encoder/w'] and report.initialized == {'head/kernel': 'reinit rule'}


# ----------------------------------------------------------------------------- errors
@pytest.fixture(name='vit', scope='module')
def vit_fixture(tmp_path_factory):
  """(npz path of a tiny dense ViT with reference names, target of the same model)."""
  target = _shapes(_dense_config())
  path = tmp_path_factory.mktemp('vit') / 'vit.npz'
  return _npz(path, _flat(_random(target, 0))), target


def _init(vit, target=None, **cfg):
  path, same = vit
  target = target or same
  return ini.initialize(target, _random(target, 1), {'source': 'npz', 'path': path, **cfg})


def test_error_unused_tensor_names_it_and_the_closest_param(vit):
  with pytest.raises(ValueError, match=r'checkpoint tensor Encoder/encoderblock_0/Mlp/'
                     r'Dense_0/kernel \(16, 32\) \[from Encoder/encoderblock_0/Mlp/Dense_0/'
                     r'kernel\] matches no model param \(closest unfilled model param: Encoder/'
                     r'encoderblock_0/Moe/Mlp/Dense_0/kernel\)'):
    _init(vit, _shapes(_dense_config(layers=(0,), num_experts=2)), allow_missing='/Moe/')
  _, report = _init(vit, _shapes(_dense_config(layers=(0,), num_experts=2)),
                    allow_missing='/Moe/', allow_unused='/encoderblock_0/Mlp/')
  assert report.dropped['Encoder/encoderblock_0/Mlp/Dense_0/kernel'] == 'unused (allow_unused)'


def test_error_missing_param_lists_it(vit):
  target = _shapes(_dense_config(layers=(1,), num_experts=4))
  with pytest.raises(ValueError, match=r"model param Encoder/encoderblock_1/Moe/Router/dense/"
                     r"kernel \(16, 4\) gets no checkpoint tensor.*allow_missing or \('reinit'"):
    _init(vit, target, rules=UPCYCLE)


def test_error_shape_mismatch_suggests_the_rule(vit):
  with pytest.raises(ValueError, match=r"Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel: "
                     r"checkpoint shape \(16, 32\), model shape \(4, 16, 32\); add the rule "
                     r"\('expand_tile', .*, 4\)"):
    _init(vit, _shapes(_dense_config(layers=(1,), num_experts=4)), rules=UPCYCLE[:1],
          allow_missing='/Router/')
  with pytest.raises(ValueError, match=r"pos_embedding: checkpoint shape \(1, 5, 16\), model "
                     r"shape \(1, 17, 16\); add the rule \('resize_posemb'"):
    _init(vit, _shapes(_dense_config(), image_size=16))
  with pytest.raises(ValueError, match=r"head/kernel: .*\('reinit', '\^head/kernel\$'\)"):
    _init(vit, _shapes({**_dense_config(), 'num_classes': 7}))
  _, report = _init(vit, _shapes({**_dense_config(), 'num_classes': 7}),
                    allow_mismatched='^head/')
  assert set(report.initialized) == {'head/kernel', 'head/bias'}


@pytest.mark.parametrize('cfg, message', [
    ({'rules': [('upcycle', 'x')]}, r"rules\[0\]=\('upcycle', 'x'\): expected \(kind, regex"),
    ({'rules': [('rename', '(')]}, r"rules\[0\]=\('rename', '\('\): 'rename' takes "
                                   r"\(pattern, replacement\)"),
    ({'rules': [('drop', '(')]}, r'rules\[0\]: invalid regex'),
    ({'rules': [('drop', '^nothing/')]}, r"matches no checkpoint tensor"),
    ({'rules': [('rename', 'encoderblock_1', 'encoderblock_0')]},
     r'two checkpoint tensors \(Encoder/encoderblock_0/LayerNorm_0/bias, Encoder/'
     r'encoderblock_1/LayerNorm_0/bias\) become'),
    ({'rules': [('stack', 'encoderblock_', 'x')]}, r'needs a group \(\?P<i>'),
    ({'rules': [('reshape', 'cls$', (3, 3))]}, r'cls of shape \(1, 1, 16\) cannot become'),
    ({'allow_missing': '['}, r'initialization.allow_missing=.* must be a bool or a regex'),
    ({'strict': True}, r"Unknown key\(s\) \['strict'\] in config.initialization"),
    ({'source': 'pickle'}, r"source='pickle' is unknown; valid: \['legacy', 'npz', 'orbax'\]"),
    ({'path': '/nonexistent.npz'},
     r"No .npz file at config.initialization.path='/nonexistent.npz'"),
    ({'path': None}, r'config.initialization.path is required'),
    ({'source': 'legacy', 'path': '/nonexistent'}, r'missing index file /nonexistent.index'),
    ({'source': 'orbax', 'path': '/nonexistent'}, r"No checkpoint at '/nonexistent': "
                                                   r"expected .*WORKDIR/checkpoints/<step>"),
])
def test_config_errors(vit, cfg, message):
  with pytest.raises(ValueError, match=message):
    _init(vit, **cfg)


def test_npz_with_objects_or_truncated_is_refused(tmp_path):
  target = {'w': _sds((2,))}
  path = str(tmp_path / 'obj.npz')
  np.savez(path, w=np.array([{'a': 1}, None], dtype=object))
  with pytest.raises(ValueError, match=r'array w.npy holds Python objects'):
    ini.initialize(target, _random(target, 0), {'source': 'npz', 'path': path})
  good = _npz(tmp_path / 'ok.npz', {'w': np.zeros(2, np.float32)})
  with open(good, 'rb') as f:
    data = f.read()
  with open(good, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r'ok.npz is not a valid .npz file'):
    ini.initialize(target, _random(target, 0), {'source': 'npz', 'path': good})


def test_missing_legacy_shard_names_the_file(tmp_path):
  prefix = str(tmp_path / 'ckpt')
  legacy.save(prefix, {'a': np.zeros(2, np.float32), 'b': np.ones(3, np.float32)},
              num_shards=2)
  os.remove(prefix + '.data-00001-of-00002')
  target = {'a': _sds((2,)), 'b': _sds((3,))}
  with pytest.raises(ValueError, match=r'missing data file .*ckpt.data-00001-of-00002'):
    ini.initialize(target, _random(target, 0), {'source': 'legacy', 'path': prefix})


def test_error_reinit_rule_that_matches_nothing(vit):
  # A typo ('^haed/'): without the check the head would load from the checkpoint.
  with pytest.raises(ValueError, match=r"rules\[0\]=\('reinit', '\^haed/'\) matches neither "
                     r"a checkpoint tensor nor a model param"):
    _init(vit, rules=[('reinit', '^haed/')])


def test_balance_biases_a_checkpoint_lacks_start_at_zero(tmp_path):
  """A V-MoE checkpoint without bias balancing fine-tunes into a model with it."""
  plain = _dense_config(layers=(1,), num_experts=4)
  biased = _dense_config(layers=(1,), num_experts=4)
  biased['encoder']['moe']['router'].update(load_balancing='bias')
  source = _flat(_random(_shapes(plain), seed=1))
  target = _shapes(biased)
  init = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), target)
  params, report = ini.initialize(target, init, {'source': 'npz',
                                                 'path': _npz(tmp_path / 'c.npz', source)})
  bias = 'Encoder/encoderblock_1/Moe/Router/balance_bias'
  np.testing.assert_array_equal(_flat(params)[bias], 7.0)  # The model's own init.
  assert bias in report.initialized
  assert set(_flat(target)) - set(source) == {bias}


def test_reshape_to_the_models_shape_loads_an_e3_router(tmp_path):
  """The reference's E3 fine-tuning rule ('reshape' without a shape): a router kernel
  [D, E] becomes the E3 model's [D, M, E/M], and the reference's E3 logits follow."""
  c = json.load(open(f'{REF}/eee_tiny_config.json'))
  config = dict(c['model_kwargs'], name=c['model'])
  images = np.load(f'{REF}/eee_tiny_inputs.npy')
  flat = _flat(legacy.restore(f'{REF}/eee_tiny'))
  router = [k for k in flat if k.endswith('/Moe/Router/dense/kernel')]
  assert router and all(flat[k].shape == (32, 2, 2) for k in router)
  path = _npz(tmp_path / 'flat_router.npz',
              {k: v.reshape(32, 4) if k in router else v for k, v in flat.items()})
  model = models.build_model(config, images.shape[1:3])
  target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))['params']
  params, report = ini.initialize(target, _random(target, 0), {
      'source': 'npz', 'path': path, 'rules': [('reshape', '/Moe/Router/dense/kernel$')]})
  assert report.loaded[router[0]] == f'{router[0]} | reshape(32, 2, 2)'
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x)[0])(params, images)
  np.testing.assert_allclose(logits, np.load(f'{REF}/eee_tiny_logits.npy'), atol=1e-5, rtol=0)
