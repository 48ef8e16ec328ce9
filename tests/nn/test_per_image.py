"""Mobile V-MoE: one per-image routing decision for the MoE part, and the chosen-experts
path (each image through its K experts' gathered weights, no buffers)."""
import copy

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe.nn import models
from vmoe.nn.routers import per_image

B, T = 4, 5  # 8x8 images, patch 4: 4 patches and the class token.
CONFIG = dict(
    num_classes=6, patch_size=(4, 4), hidden_size=16, classifier='token',
    head_kernel_zero_init=False,  # Gradients reach the experts.
    encoder=dict(num_layers=3, mlp_dim=24, num_heads=2, moe=dict(
        layers=(1, 2), num_experts=4, group_size=2 * T, router=dict(
            name='PerImageRouter', num_selected_experts=2,
            # Room for every image in every expert: the buffer path drops nothing.
            dispatcher=dict(capacity_factor=2.0, chosen_experts=False)))))


def _config(**overrides):
  c = copy.deepcopy(CONFIG)
  for key, value in overrides.items():
    *path, last = key.split('.')
    d = c
    for p in path:
      d = d[p]
    d[last] = value
  return c


def _images(n=B, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, 8, 8, 3))


def _init(config, n=B):
  model = models.build_model(config, 8)
  return model, model.init(jax.random.key(1), _images(n))['params']


def _per_token(state):
  """{'encoderblock_i': (slot [B, T, E], weight)} of a forward pass's intermediates."""
  out = {}
  for name, block in state['intermediates']['Encoder'].items():
    if 'Moe' in block:
      slot, weight = block['Moe']['buffer_slot'][0], block['Moe']['combine_weight'][0]
      out[name] = (np.asarray(slot).reshape(-1, T, slot.shape[-1]),
                   np.asarray(weight).reshape(-1, T, slot.shape[-1]))
  return out


@pytest.mark.xla_defaults
@pytest.mark.parametrize('chosen', [False, True])
@pytest.mark.parametrize('scan', [False, True])
def test_every_token_of_an_image_reaches_the_same_experts_in_every_layer(chosen, scan):
  config = _config(**{'encoder.scan': scan,
                      'encoder.moe.router.dispatcher.chosen_experts': chosen})
  model, params = _init(config)
  _, state = model.apply({'params': params}, _images(), mutable=['intermediates'])
  routed = {k: slot >= 0 for k, (slot, _) in _per_token(state).items()}
  assert sorted(routed) == ['encoderblock_1', 'encoderblock_2']
  first = routed['encoderblock_1']
  assert (first.sum(-1) == 2).all()  # K experts for every token.
  assert (first == first[:, :1]).all()  # The same for all tokens of an image.
  assert (routed['encoderblock_2'] == first).all()  # And in every MoE layer.
  flat = traverse_util.flatten_dict(params, sep='/')
  assert 'Encoder/image_router/dense/kernel' in flat
  assert not [k for k in flat if '/Moe/Router/' in k]


def test_per_layer_scope_has_a_router_in_every_moe_layer():
  config = _config(**{'encoder.moe.router.scope': 'layer'})
  model, params = _init(config)
  flat = traverse_util.flatten_dict(params, sep='/')
  assert sorted(k for k in flat if 'Router' in k or 'image_router' in k) == [
      'Encoder/encoderblock_1/Moe/Router/dense/kernel',
      'Encoder/encoderblock_2/Moe/Router/dense/kernel']
  _, state = model.apply({'params': params}, _images(), mutable=['intermediates'])
  for slot, _ in _per_token(state).values():
    assert ((slot >= 0) == (slot[:, :1] >= 0)).all()  # Still per image, per layer.


def _loss_and_grads(config, params, train):
  model = models.build_model(config, 8)
  labels = jnp.arange(B) % 6

  def loss(p):
    rngs = {'gating': jax.random.key(3), 'dropout': jax.random.key(4)} if train else None
    logits, metrics = model.apply({'params': p}, _images(), train=train, labels=labels,
                                  rngs=rngs)
    xent = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return xent + jnp.mean(metrics['auxiliary_loss']), logits
  return jax.grad(loss, has_aux=True)(params)


@pytest.mark.xla_defaults
@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('scope', ['model', 'layer'])
def test_chosen_experts_path_equals_the_buffer_path_when_nothing_drops(train, scope):
  buffers = _config(**{'encoder.moe.router.scope': scope})
  chosen = _config(**{'encoder.moe.router.scope': scope,
                      'encoder.moe.router.dispatcher.chosen_experts': True})
  _, params = _init(buffers)
  g_buf, y_buf = _loss_and_grads(buffers, params, train)
  g_cho, y_cho = _loss_and_grads(chosen, params, train)
  np.testing.assert_allclose(y_cho, y_buf, rtol=1e-5, atol=1e-6)
  for (name, a), b in zip(traverse_util.flatten_dict(g_cho, sep='/').items(),
                          traverse_util.flatten_dict(g_buf, sep='/').values()):
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=max(1e-6, 1e-5 * np.abs(b).max()), err_msg=name)
  assert any(np.abs(v).max() > 0 for k, v in traverse_util.flatten_dict(
      g_cho, sep='/').items() if 'Moe/Mlp' in k)


def test_chosen_experts_drop_nothing_where_the_buffers_would():
  # One image slot per expert for the 2 images x K=2 choices of a group of 4 experts:
  # where both images of a group pick the same expert, the buffer path drops one.
  low = _config(**{'encoder.moe.router.dispatcher': dict(capacity=1, chosen_experts=False)})
  model, params = _init(low)
  _, state = model.apply({'params': params}, _images(), mutable=['intermediates'])
  # A choice dropped: fewer than K=2 experts for some image.
  dropped = [((slot >= 0).sum(-1) < 2).any() for slot, _ in _per_token(state).values()]
  if not any(dropped):
    pytest.fail('The fixture no longer overflows an expert; pick other images.')
  chosen = _config(**{'encoder.moe.router.dispatcher': dict(capacity=1, chosen_experts=True)})
  _, state = models.build_model(chosen, 8).apply({'params': params}, _images(),
                                                  mutable=['intermediates'])
  for slot, _ in _per_token(state).values():
    assert ((slot >= 0).sum(-1) == 2).all()


def test_auto_runs_the_chosen_experts_at_small_inference_batches_only():
  moe = models.resolve(_config(**{'encoder.moe.router.dispatcher': dict(
      capacity_factor=2.0)}), image_size=(8, 8)).encoder.moe
  assert moe.chosen_experts == 'auto'
  assert moe.uses_chosen_experts(1, train=False)
  assert moe.uses_chosen_experts(2, train=False)  # 2 images x K=2 <= E=4.
  assert not moe.uses_chosen_experts(4, train=False)
  assert not moe.uses_chosen_experts(1, train=True)


@pytest.mark.parametrize('image_repr', ['token', 'mean'])
def test_the_router_reads_the_class_token_or_the_mean_of_the_patches(image_repr):
  router = per_image.PerImageRouter(num_experts=4, capacity=4, tokens_per_image=T,
                                    class_token=True, image_repr=image_repr)
  x = jax.random.normal(jax.random.key(0), (2, 2 * T, 16))
  variables = router.init(jax.random.key(1), x, train=False)
  logits = lambda x: router.apply(variables, x, train=False, mutable=['intermediates'])[1][
      'intermediates']['logits'][0]
  cls_moved = x.at[:, ::T].add(3.0)
  patch_moved = x.at[:, 1::T].add(3.0)
  changed = lambda y: float(jnp.abs(logits(y) - logits(x)).max()) > 1e-4
  assert changed(cls_moved) == (image_repr == 'token')
  assert changed(patch_moved) == (image_repr == 'mean')


@pytest.mark.parametrize('overrides, message', [
    ({'encoder.moe.router.num_selected_experts': 5}, 'num_selected_experts=5'),
    ({'classifier': 'gap', 'encoder.moe.router.image_repr': 'token'}, "image_repr='token'"),
    ({'encoder.moe.router.superclasses': [0, 1, 2, 3, 0]}, 'has 5 classes but'),
    ({'encoder.moe.router.superclasses': [0, 1, 2, 3, 4, 0]}, 'Super-classes [4]'),
    ({'encoder.moe.router.scope': 'block'}, 'scope'),
    ({'encoder.moe.router.dispatcher': dict(capacity_factor=2.0, chosen_experts='yes')},
     'chosen_experts'),
    ({'encoder.moe.router': dict(name='NoisyTopExpertsPerItemRouter', dispatcher=dict(
        capacity_factor=1.0, chosen_experts=True))}, 'only per-image routing'),
])
def test_bad_settings_fail_before_compilation(overrides, message):
  with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
    models.resolve(_config(**overrides), image_size=(8, 8))


def test_params_of_the_per_layer_layout_are_refused_with_the_fix():
  _, layer_params = _init(_config(**{'encoder.moe.router.scope': 'layer'}))
  spec = models.resolve(CONFIG, image_size=(8, 8))
  with pytest.raises(ValueError, match="scope='layer'"):
    models.check_params(layer_params, spec, 'an old checkpoint')


def test_router_losses_count_once_for_the_model():
  config = _config(**{'encoder.moe.router.dispatcher': dict(capacity_factor=2.0)})
  model, params = _init(config)
  _, metrics = model.apply({'params': params}, _images(), train=True,
                           rngs={'gating': jax.random.key(0), 'dropout': jax.random.key(1)})
  router = metrics['image_router']
  np.testing.assert_allclose(metrics['auxiliary_loss'], router['auxiliary_loss'], rtol=1e-6)
  assert 'auxiliary_loss' not in metrics['encoderblock_1']
  assert metrics['encoderblock_1']['expert_load'].shape == (B * T // (2 * T), 4)
