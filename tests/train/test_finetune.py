"""Fine-tuning through config.initialization: the trainer's side.

End to end, offline: conftest.py's pre-training run (configs/digits.py, tiny,
40 steps) is fine-tuned by configs/digits_finetune.py with a new head and a
frozen encoder. The full-size figures (pre-training 2,000 steps, then
fine-tuning: >= 95% on the digits test split) are in docs/finetuning.md.
"""
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from vmoe.checkpoints import training
from vmoe.configs import common
from vmoe.nn import models
from vmoe.train import config_checks
from vmoe.train import optimizers
from vmoe.train import train_state as train_state_lib
from vmoe.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FT_STEPS = 30
PROBE = '^(?!head/)'  # Everything but the head stays as pre-trained.


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep='/')


def test_digits_finetune_new_head_frozen_encoder(runs, reference, tmp_path):
  workdir = str(tmp_path)
  config = (f'configs/digits_finetune.py:path={reference.workdir},freeze={PROBE},'
            f'num_experts=4')
  out, err = runs.finish(runs.start(
      workdir, f'--config.train_steps={FT_STEPS}', '--config.evaluate.every_steps=100',
      '--config.optimizer.learning_rate.peak_value=0.1',
      '--config.optimizer.learning_rate.warmup_steps=5',
      '--config.save_checkpoint.every_steps=100', config=config))
  pretrained = _flat(runs.final_params(reference.workdir))
  n = len(pretrained)
  assert (f'Initialization from orbax:{reference.workdir}: {n - 2} params loaded, 2 '
          f'freshly initialised, 2 checkpoint tensors not used, {n - 2} frozen.') in err
  assert '  init    head/kernel: reinit rule' in err
  step, params = training.load_latest_params(workdir)
  assert step == FT_STEPS
  params = _flat(params)
  for name, x in pretrained.items():
    if not name.startswith('head/'):  # Loaded, then frozen by the optimizer.
      np.testing.assert_array_equal(params[name], x, err_msg=name)
  # digits.py initialises the head kernel to zeros; the probe trained it.
  assert np.abs(params['head/kernel']).min() > 0
  # The probe learns: the mean train loss of steps 1-10, 11-20, 21-30 goes down.
  # The tiny 40-step pre-training gives features too weak for an accuracy bar
  # (test prec@1 ~0.13); the full-size run (>= 0.95) is in docs/finetuning.md.
  loss = runs.scalars(workdir)['train/loss']
  assert loss[10] > loss[20] > loss[30], loss
  assert re.search(r'Final test: prec@1=[0-9.]+', out)


# ------------------------------------------------------ restore_or_create_state
MODEL = dict(num_classes=3, patch_size=(4, 4), hidden_size=8, classifier='token',
             encoder=dict(num_layers=1, mlp_dim=16, num_heads=2))


@pytest.fixture(name='parts', scope='module')
def parts_fixture():
  """(model, tx, init_fn, state_sharding) of a tiny ViT; 'Encoder' frozen."""
  model = models.build_model(MODEL)
  config = ml_collections.ConfigDict(dict(
      optimizer=dict(name='adam', learning_rate=0.1),
      initialization=dict(freeze='^Encoder/')))
  tx, _ = optimizers.create_optimizer(
      **trainer.initialization.optimizer_config(config.to_dict()), total_steps=10)
  init_fn = train_state_lib.make_init_fn(model, tx, image_shape=(2, 8, 8, 3), seed=0)
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(init_fn))
  return model, tx, init_fn, sharding


def _checkpoint(tmp_path, init_fn, **rules):
  """An npz of the model's params, each + 1, and config.initialization for it."""
  params = _flat(init_fn().params)
  path = str(tmp_path / 'pre.npz')
  np.savez(path, **{n: x + 1 for n, x in params.items()})
  return params, ml_collections.ConfigDict(dict(initialization=dict(
      source='npz', path=path, freeze='^Encoder/', **rules)))


def test_new_run_loads_params_and_freezes(parts, tmp_path):
  _, tx, init_fn, sharding = parts
  fresh, config = _checkpoint(tmp_path, init_fn, rules=[('reinit', '^head/')])
  ckpt = training.TrainCheckpointer(str(tmp_path / 'work'), every_steps=1)
  state = trainer.restore_or_create_state(ckpt, init_fn, sharding, tx=tx, config=config)
  got = _flat(state.params)
  for name, x in fresh.items():
    np.testing.assert_array_equal(got[name], x if name.startswith('head/') else x + 1)
  assert state.params['cls'].sharding == sharding.params['cls']
  # The frozen params get no updates (and no optimizer state).
  grads = jax.tree.map(jnp.ones_like, state.params)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  flat = _flat(updates)
  assert all(not flat[n].any() for n in flat if n.startswith('Encoder/'))
  assert flat['head/kernel'].any()
  ckpt.close()


def test_bad_initialization_fails_before_anything_compiles(parts, tmp_path, monkeypatch):
  _, tx, init_fn, sharding = parts
  _, config = _checkpoint(tmp_path, init_fn)  # The head is loaded, and then
  config.initialization.rules = [('drop', '^head/bias$')]  # its bias is missing.
  ckpt = training.TrainCheckpointer(str(tmp_path / 'work'), every_steps=1)

  def no_compiling(*args, **kwargs):
    raise AssertionError('compiled before checking config.initialization')

  monkeypatch.setattr(jax, 'jit', no_compiling)
  with pytest.raises(ValueError, match=r'model param head/bias \(3,\) gets no checkpoint '
                     r'tensor'):
    trainer.restore_or_create_state(ckpt, init_fn, sharding, tx=tx, config=config)
  ckpt.close()


def test_resumed_run_ignores_initialization(parts, tmp_path, caplog):
  _, tx, init_fn, sharding = parts
  ckpt = training.TrainCheckpointer(str(tmp_path), every_steps=1, asynchronous=False)
  state = jax.jit(init_fn)()
  ckpt.save(3, state.replace(step=jnp.array(3, jnp.int32)))
  config = ml_collections.ConfigDict(dict(initialization=dict(
      source='npz', path=str(tmp_path / 'deleted_since.npz'))))
  with caplog.at_level('INFO'):
    restored = trainer.restore_or_create_state(ckpt, init_fn, sharding, tx=tx,
                                               config=config)
  assert int(restored.step) == 3
  assert 'step 3; config.initialization is not used' in caplog.text
  ckpt.close()


def test_config_checks_of_initialization_and_keep_every():
  config = common.load_config(os.path.join(REPO, 'configs/digits_finetune.py:path=/x'))
  config_checks.check_config(config)
  for key, value, message in [
      ('initialization.path', None, r'config.initialization.path is required'),
      ('initialization.source', 'hdf5', r"config.initialization.source='hdf5' is unknown"),
      ('initialization.rules', [('rename', '^a/')], r"'rename' takes \(pattern, "
                                                    r"replacement\)"),
      ('initialization.freeze', '(', r"Invalid regex '\(' in config.initialization.freeze"),
      ('save_checkpoint.keep_every', 0, r'config.save_checkpoint.keep_every=0 must be a '
                                        r'positive integer'),
  ]:
    bad = common.load_config(os.path.join(REPO, 'configs/digits_finetune.py:path=/x'))
    with bad.unlocked():
      section, name = key.split('.')
      bad[section][name] = value
    with pytest.raises(ValueError, match=message):
      config_checks.check_config(bad)
  bad = common.load_config(os.path.join(REPO, 'configs/digits_finetune.py:path=/x'))
  bad.initialization.prefix = '/x'
  with pytest.raises(ValueError, match=r"Unknown key\(s\) \['prefix'\] in "
                     r"config.initialization"):
    config_checks.check_config(bad)
