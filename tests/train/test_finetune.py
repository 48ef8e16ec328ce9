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
import numpy as np
import pytest
from flax import traverse_util
from vmoe.checkpoints import sources
from vmoe.checkpoints import training
from vmoe.configs import common
from vmoe.train import config as config_lib
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
          f'freshly initialised, 2 checkpoint tensors not used, {n - 2} frozen.') in out
  with open(os.path.join(workdir, 'logs', 'main.log')) as f:
    assert '  init    head/kernel: reinit rule' in f.read()  # The whole report.
  where, params = sources.load_params(workdir)
  assert where.endswith(f'/checkpoints/{FT_STEPS}')
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


# ------------------------------------------------------ restore_or_create
MODEL = dict(num_classes=3, patch_size=(4, 4), hidden_size=8, classifier='token',
             encoder=dict(num_layers=1, mlp_dim=16, num_heads=2))
CONFIG = dict(
    dataset=dict(train=dict(name='digits', split='train', process='decode', batch_size=2)),
    model=MODEL, loss=dict(name='softmax_xent'), train_steps=10,
    optimizer=dict(name='adam', learning_rate=0.1))


def _program(**initialization) -> trainer.Program:
  """A tiny ViT's program for 8x8 images; with config.initialization (its freeze:
  'Encoder')."""
  config = dict(CONFIG, initialization=initialization) if initialization else CONFIG
  run = config_lib.resolve(config)
  run = config_lib.with_inputs(run, {'dataset.train': {'image': (2, 8, 8, 3),
                                                       'labels': (2, 3)}})
  return trainer.build(run)


def _checkpoint(tmp_path, **rules) -> tuple[dict, trainer.Program]:
  """An npz of a program's fresh params, each + 1; the program initialised from it."""
  params = _flat(_program().parts.init_fn().params)
  path = str(tmp_path / 'pre.npz')
  np.savez(path, **{n: x + 1 for n, x in params.items()})
  return params, _program(source='npz', path=path, freeze='^Encoder/', **rules)


def test_new_run_loads_params_and_freezes(tmp_path):
  fresh, program = _checkpoint(tmp_path, rules=[('reinit', '^head/')])
  ckpt = training.TrainCheckpointer(str(tmp_path / 'work'), every_steps=1)
  state = trainer.restore_or_create(program, ckpt)
  got = _flat(state.params)
  for name, x in fresh.items():
    np.testing.assert_array_equal(got[name], x if name.startswith('head/') else x + 1)
  assert state.params['cls'].sharding == program.state_sharding.params['cls']
  # The frozen params get no updates (and no optimizer state).
  grads = jax.tree.map(jnp.ones_like, state.params)
  updates, _ = program.parts.tx.update(grads, state.opt_state, state.params)
  flat = _flat(updates)
  assert all(not flat[n].any() for n in flat if n.startswith('Encoder/'))
  assert flat['head/kernel'].any()
  ckpt.close()


def test_bad_initialization_fails_before_anything_compiles(tmp_path, monkeypatch):
  # The head is loaded, and then its bias is missing.
  _, program = _checkpoint(tmp_path, rules=[('drop', '^head/bias$')])
  ckpt = training.TrainCheckpointer(str(tmp_path / 'work'), every_steps=1)

  def no_compiling(*args, **kwargs):
    raise AssertionError('compiled before checking config.initialization')

  monkeypatch.setattr(jax, 'jit', no_compiling)
  with pytest.raises(ValueError, match=r'model param head/bias \(3,\) gets no checkpoint '
                     r'tensor'):
    trainer.restore_or_create(program, ckpt)
  ckpt.close()


def test_resumed_run_ignores_initialization(tmp_path, capsys):
  program = _program(source='npz', path=str(tmp_path / 'deleted_since.npz'))
  ckpt = training.TrainCheckpointer(str(tmp_path), every_steps=1, asynchronous=False)
  state = jax.jit(program.parts.init_fn)()
  ckpt.save(3, state.replace(step=jnp.array(3, jnp.int32)))
  restored = trainer.restore_or_create(program, ckpt)
  assert int(restored.step) == 3
  assert 'step 3; config.initialization is not used' in capsys.readouterr().out
  ckpt.close()


def test_config_checks_of_initialization_and_keep_every():
  config = common.load_config(os.path.join(REPO, 'configs/digits_finetune.py:path=/x'))
  config_lib.resolve(config)
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
      config_lib.resolve(bad)
  bad = common.load_config(os.path.join(REPO, 'configs/digits_finetune.py:path=/x'))
  bad.initialization.prefix = '/x'
  with pytest.raises(ValueError, match=r"Unknown key\(s\) \['prefix'\] in "
                     r"config.initialization"):
    config_lib.resolve(bad)
