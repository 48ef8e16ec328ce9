"""Optimizers: AdamW equivalence, weight-decay masks, frozen params, clipping,
SGD momentum, and the Adafactor variant that never factors across experts."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from vmoe.train import adafactor
from vmoe.train import optimizers


def make_params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {'Encoder': {'Moe': {'Mlp': {'Dense_0': {'kernel': f(4, 8, 16),
                                                  'bias': f(4, 16)}}},
                      'dense': {'kernel': f(8, 8), 'bias': f(8)}},
          'head': {'kernel': f(8, 3), 'bias': f(3)}}


def run(tx, params, grads, steps=3):
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_adamw_matches_optax():
  params = make_params()
  grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
  tx, _ = optimizers.create_optimizer(name='adamw', total_steps=10,
                                      learning_rate=0.01, weight_decay=0.1)
  got, _ = run(tx, params, grads)
  want, _ = run(optax.adamw(0.01, weight_decay=0.1), params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_weight_decay_regexes_first_match_wins():
  params = make_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx, _ = optimizers.create_optimizer(
      name='sgd', total_steps=10, learning_rate=1.0,
      weight_decay=[('head/kernel', 0.0), ('kernel', 0.5)])
  new, _ = run(tx, params, zeros, steps=1)
  # Decoupled decay: p <- p - lr * wd * p, only where the first match has wd>0.
  np.testing.assert_allclose(new['Encoder']['dense']['kernel'],
                             0.5 * params['Encoder']['dense']['kernel'], rtol=1e-6)
  np.testing.assert_allclose(new['Encoder']['Moe']['Mlp']['Dense_0']['kernel'],
                             0.5 * params['Encoder']['Moe']['Mlp']['Dense_0']['kernel'],
                             rtol=1e-6)
  for path in (('head', 'kernel'), ('head', 'bias'), ('Encoder', 'dense', 'bias')):
    a, b = new, params
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('name', ['adam', 'sgd', 'big_vision_adafactor'])
def test_frozen_params_never_change(name):
  params = make_params()
  grads = jax.tree.map(lambda p: p + 1.0, params)
  kwargs = {'momentum': 0.9} if name == 'sgd' else {}
  tx, _ = optimizers.create_optimizer(
      name=name, total_steps=10, learning_rate=0.1, weight_decay=0.1,
      frozen_pattern=['^head/', 'dense/bias'],
      gradient_clip={'global_norm': 1.0}, **kwargs)
  new, state = run(tx, params, grads)
  np.testing.assert_array_equal(new['head']['kernel'], params['head']['kernel'])
  np.testing.assert_array_equal(new['head']['bias'], params['head']['bias'])
  np.testing.assert_array_equal(new['Encoder']['dense']['bias'],
                                params['Encoder']['dense']['bias'])
  assert not np.allclose(new['Encoder']['dense']['kernel'],
                         params['Encoder']['dense']['kernel'])
  # Frozen params carry no optimizer statistics.
  n_state = sum(x.size for x in jax.tree.leaves(state))
  _, full_state = run(optimizers.create_optimizer(
      name=name, total_steps=10, learning_rate=0.1, **kwargs)[0], params, grads,
      steps=1)
  assert n_state < sum(x.size for x in jax.tree.leaves(full_state))


def test_gradient_clipping_by_global_norm():
  params = {'a': jnp.zeros(4), 'b': jnp.zeros(3)}
  grads = {'a': jnp.full(4, 3.0), 'b': jnp.full(3, 4.0)}  # Norm sqrt(84).
  tx, _ = optimizers.create_optimizer(name='sgd', total_steps=1, learning_rate=1.0,
                                      gradient_clip={'global_norm': 2.0})
  new, _ = run(tx, params, grads, steps=1)
  np.testing.assert_allclose(optax.global_norm(new), 2.0, rtol=1e-6)


def test_sgd_momentum():
  params = {'w': jnp.zeros(2)}
  grads = {'w': jnp.array([1.0, -2.0])}
  tx, _ = optimizers.create_optimizer(name='sgd', total_steps=5, learning_rate=0.5,
                                      momentum=0.9)
  new, _ = run(tx, params, grads, steps=2)
  # Updates -0.5 g, then -0.5 (g + 0.9 g).
  np.testing.assert_allclose(new['w'], -0.5 * (1 + 1.9) * grads['w'], rtol=1e-6)


def test_schedule_is_returned_and_drives_the_update():
  tx, schedule = optimizers.create_optimizer(
      name='sgd', total_steps=10, learning_rate=dict(
          schedule='warmup_linear_decay', peak_value=1.0, warmup_steps=2))
  assert float(schedule(1)) == pytest.approx(0.5)
  params, grads = {'w': jnp.zeros(())}, {'w': jnp.ones(())}
  new, _ = run(tx, params, grads, steps=2)  # lr 0 then 0.5.
  np.testing.assert_allclose(new['w'], -0.5)


def test_adafactor_does_not_factor_across_experts():
  params = {
      'Encoder': {'Moe': {'Mlp': {'Dense_0': {'kernel': jnp.ones((4, 32, 64)),
                                              'bias': jnp.ones((40, 64))}}}},
      'dense': {'kernel': jnp.ones((40, 64)), 'bias': jnp.ones((64,))},
  }
  tx = adafactor.scale_by_adafactor(min_dim_size_to_factor=32)
  state = tx.init(params)
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  expert = lambda tree: shapes(tree)['Encoder']['Moe']['Mlp']['Dense_0']
  # Expert kernel [E, D, H]: factored over (D, H) separately for each expert.
  assert expert(state.v_row)['kernel'] == (4, 32)
  assert expert(state.v_col)['kernel'] == (4, 64)
  # Expert bias [E, H]: never factored (that would average over experts)...
  assert expert(state.v)['bias'] == (40, 64)
  assert expert(state.v_row)['bias'] == (1,)
  # ...while a non-expert param of the same shape is.
  assert shapes(state.v_row)['dense']['kernel'] == (40,)
  assert shapes(state.v_col)['dense']['kernel'] == (64,)
  assert shapes(state.v)['dense']['bias'] == (64,)


def test_adafactor_first_update_is_exact_for_rank_one_squares():
  # With g^2 of rank one per expert, the factored second moment is exact, so
  # the first update (decay 0, no momentum) is g / |g| = 1 everywhere.
  rng = np.random.default_rng(0)
  a, b = rng.uniform(1, 2, size=(32, 1)), rng.uniform(1, 2, size=(1, 48))
  scales = np.array([1.0, 10.0, 100.0])[:, None, None]
  g = jnp.asarray(scales * (a * b), jnp.float32)  # [E=3, 32, 48]
  params = {'Moe': {'Mlp': {'kernel': jnp.zeros_like(g)}}}
  tx = adafactor.scale_by_adafactor(momentum=None)
  updates, _ = tx.update({'Moe': {'Mlp': {'kernel': g}}}, tx.init(params))
  np.testing.assert_allclose(updates['Moe']['Mlp']['kernel'], 1.0, rtol=1e-5)


@pytest.mark.parametrize('kwargs, match', [
    (dict(name='lamb'), "optimizer.name='lamb' is unknown"),
    (dict(name='adam', beta1=0.9), r"Unknown key\(s\) \['beta1'\] in optimizer 'adam'"),
    (dict(name='sgd', gradient_clip={'norm': 1.0}), 'gradient_clip'),
    (dict(name='sgd', weight_decay=[('(', 0.1)]), 'Invalid regex'),
    (dict(name='sgd', frozen_pattern='[a'), 'Invalid regex'),
])
def test_bad_optimizer_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optimizers.create_optimizer(total_steps=10, learning_rate=0.1, **kwargs)


def test_balance_biases_step_by_their_pseudo_gradient_alone():
  """Bias load balancing's biases: params -= grads, whatever the optimizer, learning
  rate, weight decay and clipping; the other params are unaffected by their presence."""
  params = make_params()
  params['Encoder']['Moe']['Router'] = {'balance_bias': jnp.zeros(4)}
  grads = jax.tree.map(jnp.ones_like, params)
  grads['Encoder']['Moe']['Router']['balance_bias'] = jnp.array([1e-3, -1e-3, 1e-3, 0.0])
  kwargs = dict(name='adamw', total_steps=10, learning_rate=0.1, weight_decay=0.5,
                gradient_clip={'global_norm': 0.01})
  tx, _ = optimizers.create_optimizer(balance_biases=True, **kwargs)
  new, _ = run(tx, params, grads, steps=2)
  np.testing.assert_allclose(new['Encoder']['Moe']['Router']['balance_bias'],
                             [-2e-3, 2e-3, -2e-3, 0.0], rtol=1e-6)
  plain, _ = optimizers.create_optimizer(**kwargs)
  want, _ = run(plain, make_params(), jax.tree.map(jnp.ones_like, make_params()), steps=2)
  new['Encoder']['Moe'].pop('Router')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new, want)
