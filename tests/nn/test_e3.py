"""E3 (VisionTransformerMoeEnsemble): the reference's fixture, member-disjoint routing,
every dispatch kind, scan, ensemble predictions and their evaluation, bad settings."""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe
from vmoe.nn import ensemble
from vmoe.nn import models
from vmoe.nn import scan as scan_lib
from vmoe.nn import vit
from vmoe.train import calibration
from vmoe.train import evaluator
from vmoe.train import losses

FIXTURES = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'vmoe_reference')
B, T, M, E = 4, 5, 2, 4  # 8x8 images, patch 4: 4 patches and the class token.
CONFIG = dict(
    name='VisionTransformerMoeEnsemble', num_classes=6, patch_size=(4, 4), hidden_size=16,
    classifier='token', head_kernel_zero_init=False,
    encoder=dict(num_layers=4, mlp_dim=24, num_heads=2, moe=dict(
        layers=(1, 3), num_experts=E, ensemble_size=M, group_size=2 * M * T,
        router=dict(num_selected_experts=1, dispatcher=dict(capacity_factor=1.0)))))


def _config(**overrides):
  c = copy.deepcopy(CONFIG)
  for key, value in overrides.items():
    *path, last = key.split('.')
    d = c
    for p in path:
      d = d.setdefault(p, {})
    d[last] = value
  return c


def _images(n=B, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, 8, 8, 3))


@pytest.fixture(scope='module')
def params():
  model = models.build_model(CONFIG, 8)
  return model.init(jax.random.key(0), _images())['params']


def _apply(config, params, images, **kw):
  model = models.build_model(config, 8)
  return model.apply({'params': params}, images, mutable=['intermediates'], **kw)


# The reference's own E3 model (eee_tiny, tests/fixtures/vmoe_reference/README.md).
@pytest.mark.parametrize('suffix,override', [('', False), ('_cf0.5_bpr', True)])
def test_load_classifier_reproduces_the_reference(suffix, override):
  with open(os.path.join(FIXTURES, 'eee_tiny_config.json')) as f:
    c = json.load(f)
  config = dict(c['model_kwargs'], name=c['model'])
  overrides = c['eval_override_model_kwargs'] if override else None
  x = np.load(os.path.join(FIXTURES, 'eee_tiny_inputs.npy'))
  prefix = os.path.join(FIXTURES, 'eee_tiny')
  members = vmoe.load_classifier(prefix, config, overrides, members=True)(x)
  want = np.load(os.path.join(FIXTURES, f'eee_tiny_logits{suffix}.npy'))
  assert members.shape == (8, 2, 10)
  np.testing.assert_allclose(members.reshape(16, 10), want, atol=1e-5, rtol=0)
  logp = vmoe.load_classifier(prefix, config, overrides)(x)
  if not override:  # The ensemble prediction the reference wrote.
    np.testing.assert_allclose(logp, np.load(os.path.join(FIXTURES, 'eee_tiny_ensemble_logp.npy')),
                               atol=1e-5, rtol=0)
  # log mean_m softmax(member logits), computed directly.
  p = np.exp(want - want.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(logp, np.log(p.reshape(8, 2, 10).mean(1)), atol=1e-5)


def test_groups_run_image_token_member():
  x = jnp.arange(B * M * T, dtype=jnp.float32).reshape(B * M, T, 1)  # Row b*M + m.
  g = ensemble.to_groups(x, M, 2 * M * T)
  assert g.shape == (B // 2, 2 * M * T, 1)
  # Group 0: image 0 token 0 of member 0, of member 1, image 0 token 1 of member 0, ...
  np.testing.assert_array_equal(g[0, :4, 0], [0, T, 1, T + 1])
  np.testing.assert_array_equal(ensemble.from_groups(g, M, T), x)


@pytest.mark.parametrize('router,kind', [
    ('NoisyTopExpertsPerItemRouter', 'einsum'), ('NoisyTopExpertsPerItemRouter', 'indices'),
    ('NoisyTopExpertsPerItemRouter', 'ragged'), ('NoisyTopItemsPerExpertRouter', 'einsum'),
    ('SinkhornTopExpertsPerItemRouter', 'indices')])
def test_member_tokens_only_reach_member_experts(router, kind):
  config = _config(**{'encoder.moe.router': dict(
      name=router, dispatcher=dict(name=kind, capacity_factor=1.0),
      # Expert choice has no K: each expert takes its top tokens.
      **({} if 'ItemsPerExpert' in router else {'num_selected_experts': 1}))})
  model = models.build_model(config, 8)
  p = model.init(jax.random.key(0), _images())['params']
  kernel = p['Encoder']['encoderblock_1']['Moe']['Router']['dense']['kernel']
  assert kernel.shape == (16, M, E // M)  # The reference's layout.
  (logits, _), state = model.apply({'params': p}, _images(), train=True,
                                   rngs={'gating': jax.random.key(1)},
                                   mutable=['intermediates'])
  assert logits.shape == (B * M, 6)
  for block in ('encoderblock_1', 'encoderblock_3'):
    slot = np.asarray(state['intermediates']['Encoder'][block]['Moe']['buffer_slot'][0])
    g, s, e = slot.shape
    member = np.arange(s) % M  # Token s of a group belongs to member s % M.
    own = (np.arange(e)[None] // (E // M)) == member[:, None]  # [S, E]
    routed = slot >= 0
    assert routed.any()
    assert not (routed & ~own[None]).any(), block
    assert routed[..., :E // M].any() and routed[..., E // M:].any()


def test_every_dispatch_kind_gives_the_same_model(params):
  outs = {}
  for kind in ('einsum', 'indices', 'ragged'):
    config = _config(**{'encoder.moe.router.dispatcher.name': kind})
    model = models.build_model(config, 8)
    f = lambda p, x, model=model: model.apply({'params': p}, x)[0]
    grads = jax.grad(lambda p, f=f: jnp.sum(f(p, _images()) ** 2))(params)
    outs[kind] = (f(params, _images()), grads)
  for kind in ('indices', 'ragged'):
    np.testing.assert_allclose(outs[kind][0], outs['einsum'][0], atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 outs[kind][1],
                 outs['einsum'][1])


def test_members_compute_what_one_member_model_computes(params):
  """With the members' copies identical up to the first MoE block, member m's rows equal
  a plain V-MoE of E/M experts holding member m's router and experts."""
  (logits, _), _ = _apply(CONFIG, params, _images())
  plain = _config(name='VisionTransformerMoe', **{'encoder.moe.num_experts': E // M,
                                                   'encoder.moe.group_size': 2 * T})
  del plain['encoder']['moe']['ensemble_size']
  for m in range(M):
    sel = lambda path, v, m=m: (v[:, m] if path[-2:] == ('dense', 'kernel') and
                                'Router' in path else
                                v[m * E // M:(m + 1) * E // M] if 'Mlp' in path and
                                'Moe' in path else v)
    p = jax.tree_util.tree_map_with_path(
        lambda kp, v: sel(tuple(k.key for k in kp), v), params)
    (want, _), _ = _apply(plain, p, _images())
    np.testing.assert_allclose(logits[m::M], want, atol=1e-5)


def test_scanned_encoder_equals_unscanned(params):
  config = _config(**{'encoder.num_layers': 6, 'encoder.moe.layers': (1, 3, 5),
                      'encoder.scan': True})
  model = models.build_model(config, 8)
  segments = vit.Encoder(model.spec.encoder).segments()
  assert segments and min(s.start for s in segments) >= 1  # No segment spans the repeat.
  unscanned = models.build_model(_config(**{'encoder.num_layers': 6,
                                            'encoder.moe.layers': (1, 3, 5)}), 8)
  p = unscanned.init(jax.random.key(3), _images())['params']
  scanned = scan_lib.scan_tree(p, segments)
  np.testing.assert_allclose(model.apply({'params': scanned}, _images())[0],
                             unscanned.apply({'params': p}, _images())[0], atol=1e-5)


def test_ensemble_log_probs_and_losses_equal_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3 * M, 5)).astype(np.float32)
  labels = np.eye(5, dtype=np.float32)[[1, 4, 0]]
  members = logits.reshape(3, M, 5)
  p = np.exp(members) / np.exp(members).sum(-1, keepdims=True)
  loss = losses.Loss('ensemble_softmax_xent', M)
  np.testing.assert_allclose(loss.log_probs(logits), np.log(p.mean(1)), rtol=1e-5)
  np.testing.assert_allclose(loss.evaluate(logits, labels),
                             -np.log((p.mean(1) * labels).sum(-1)), rtol=1e-5)
  np.testing.assert_allclose(loss.train(logits, labels),
                             -np.log((p * labels[:, None]).sum(-1)).mean(1), rtol=1e-5)
  q = 1 / (1 + np.exp(-members))
  sig = losses.Loss('ensemble_sigmoid_xent', M)
  want = -(labels * np.log(q.mean(1)) + (1 - labels) * np.log(1 - q.mean(1))).sum(-1)
  np.testing.assert_allclose(sig.evaluate(logits, labels), want, rtol=1e-5)


def test_ece_counts_by_hand():
  # Confidences 0.9 (right), 0.9 (wrong), 0.5 (right); 15 bins.
  log_p = np.log(np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]], np.float32))
  correct = np.array([1.0, 0.0, 1.0], np.float32)
  sums = calibration.bin_sums(log_p, correct, np.ones(3, bool))
  # Bin of 0.9: 2 examples, accuracy 0.5 vs confidence 0.9; bin of 0.5: 1 vs 0.5.
  np.testing.assert_allclose(calibration.ece(sums), (2 * 0.4 + 1 * 0.5) / 3, rtol=1e-5)
  masked = calibration.bin_sums(log_p, correct, np.array([True, False, True]))
  np.testing.assert_allclose(calibration.ece(masked), (0.1 + 0.5) / 2, rtol=1e-5)


def test_evaluation_counts_every_example_once(params):
  """Two padded batches: the sums are those of the 7 valid examples, computed directly,
  for the ensemble and for each member."""
  model = models.build_model(CONFIG, 8)
  loss = losses.Loss('ensemble_softmax_xent', M)
  step = evaluator.make_eval_step(model, loss, params_sharding=None, batch_sharding=None,
                                  routing_stats=True)
  rng = np.random.default_rng(0)
  labels = np.eye(6, dtype=np.float32)[rng.integers(0, 6, 8)]
  images = np.array(_images(8, seed=5))
  images[-1] = 100.0
  valid = np.arange(8) < 7
  batches = [{'image': images[i:i + B], 'labels': labels[i:i + B],
              '__valid__': valid[i:i + B]} for i in (0, B)]
  # A padding example (here an odd image) must not reach the sums.
  out = evaluator.evaluate(step, params, batches, num_examples=7)
  logits = np.concatenate([np.asarray(model.apply({'params': params}, images[i:i + B])[0])
                           for i in (0, B)]).reshape(8, M, 6)[:7]
  y = labels[:7]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ens = p.mean(1)
  right = (ens.argmax(-1) == y.argmax(-1)).astype(np.float32)
  assert out['num_examples'] == 7
  np.testing.assert_allclose(out['prec@1'], right.mean(), rtol=1e-6)
  np.testing.assert_allclose(out['loss'], -np.log((ens * y).sum(-1)).mean(), rtol=1e-5)
  np.testing.assert_allclose(
      out['ece'], calibration.ece(calibration.bin_sums(np.log(ens), right, np.ones(7, bool))),
      rtol=1e-5)
  for m in range(M):
    r = (p[:, m].argmax(-1) == y.argmax(-1)).astype(np.float32)
    np.testing.assert_allclose(out[f'member_{m}/prec@1'], r.mean(), rtol=1e-6)
    np.testing.assert_allclose(out[f'member_{m}/loss'], -np.log((p[:, m] * y).sum(-1)).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(
        out[f'member_{m}/ece'],
        calibration.ece(calibration.bin_sums(np.log(p[:, m]), r, np.ones(7, bool))),
        rtol=1e-5)
  assert 0 <= out['dropped/encoderblock_1'] <= 1


def test_losses_are_averaged_over_members(params):
  (_, metrics), _ = _apply(CONFIG, params, _images(), train=True,
                           rngs={'gating': jax.random.key(1)})
  g = B * M * T // (2 * M * T)
  block = metrics['encoderblock_1']
  assert block['auxiliary_loss'].shape == (g,) and block['expert_load'].shape == (g, E)
  np.testing.assert_allclose(np.sum(block['expert_load'], -1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('overrides,match', [
    ({'encoder.moe.ensemble_size': 0}, 'ensemble_size=0 must be an integer >= 1'),
    ({'encoder.moe.ensemble_size': 3}, 'ensemble_size=3 does not divide num_experts=4'),
    ({'encoder.moe.router.num_selected_experts': 3},
     'num_selected_experts=3 exceeds the 2 experts of each of the 2 ensemble members'),
    ({'encoder.moe.router': {'name': 'SoftRouter'}},
     "'SoftRouter' cannot be split into E3 members"),
    ({'encoder.moe.router.name': 'PerImageRouter'},
     "'PerImageRouter' cannot be split into E3 members"),
    ({'encoder.moe.router.load_balancing': 'bias'}, "load_balancing='bias' is not available"),
    ({'name': 'VisionTransformerMoe'}, "ensemble_size=2 is read by model.name="),
    ({'encoder.moe.group_size': T * 3},
     r'group_size=15: E3 groups hold whole images with all their 2 ensemble copies'),
    ({'encoder.moe.layers': ()}, 'needs MoE layers'),
])
def test_bad_settings_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.resolve(_config(**overrides), image_size=(8, 8))


def test_bad_losses_are_named():
  e3 = models.resolve(CONFIG)
  plain = _config(name='VisionTransformerMoe')
  del plain['encoder']['moe']['ensemble_size']
  plain = models.resolve(plain)
  with pytest.raises(ValueError, match="use 'ensemble_softmax_xent'"):
    losses.resolve({'name': 'softmax_xent'}, e3)
  with pytest.raises(ValueError, match="needs an E3 model"):
    losses.resolve({'name': 'ensemble_softmax_xent'}, plain)
  with pytest.raises(ValueError, match='loss.ensemble_size=3 differs'):
    losses.resolve({'name': 'ensemble_softmax_xent', 'ensemble_size': 3}, e3)
  assert losses.resolve({'name': 'ensemble_softmax_xent', 'ensemble_size': 2},
                        e3) == losses.Loss('ensemble_softmax_xent', 2)


def test_members_needs_an_e3_model():
  plain = _config(name='VisionTransformerMoe')
  del plain['encoder']['moe']['ensemble_size']
  with pytest.raises(ValueError, match='members=True. needs an E3 model'):
    vmoe.load_classifier('/nonexistent', plain, members=True)
