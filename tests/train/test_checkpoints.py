"""Orbax checkpoints of the train state: round trip, retention, and that a
half-written checkpoint is never loaded."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vmoe.checkpoints import training
from vmoe.train import optimizers
from vmoe.train import train_state as train_state_lib


def make_state(step=3, params=None):
  params = params or {'Moe': {'Mlp': {'kernel': jnp.arange(24.0).reshape(2, 3, 4)}},
                      'head': {'bias': jnp.ones(5)}}
  tx, _ = optimizers.create_optimizer(name='adam', total_steps=10,
                                      learning_rate=0.1, frozen_pattern='head')
  opt_state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params),
                        params)[1]
  return train_state_lib.TrainState(step=jnp.array(step, jnp.int32),
                                    params=params, opt_state=opt_state)


def abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def test_round_trip_is_exact(tmp_path):
  state = make_state()
  ckpt = training.TrainCheckpointer(str(tmp_path), every_steps=10)
  ckpt.save(3, state, meta={'note': 'x'})
  ckpt.wait()
  assert ckpt.latest_step() == 3
  restored, meta = ckpt.restore(3, abstract(state))
  ckpt.close()
  assert meta == {'step': 3, 'note': 'x'}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_save_copies_before_the_buffers_are_donated(tmp_path):
  state = make_state()
  expected = jax.tree.map(np.asarray, state)
  ckpt = training.TrainCheckpointer(str(tmp_path), every_steps=1)
  ckpt.save(3, state)
  # A donating step right after save() must not corrupt what is written.
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
  jax.block_until_ready(bump(state))
  restored, _ = ckpt.restore(3, abstract(make_state()))
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, restored, expected)


def test_keep_last_and_should_save(tmp_path):
  ckpt = training.TrainCheckpointer(str(tmp_path), every_steps=2, keep_last=2)
  assert [s for s in range(1, 7) if ckpt.should_save(s)] == [2, 4, 6]
  for step in (2, 4, 6):
    ckpt.save(step, make_state(step))
  ckpt.save(6, make_state(6))  # Saving a step again is a no-op.
  ckpt.wait()
  assert ckpt.all_steps() == [4, 6]
  ckpt.close()


def test_half_written_checkpoint_is_never_loaded(tmp_path):
  ckpt = training.TrainCheckpointer(str(tmp_path), every_steps=1)
  ckpt.save(5, make_state(5))
  ckpt.close()
  # What a crash during the save of step 9 leaves: orbax's temporary dir
  # (the name orbax gives it while writing; renamed to '9' only when done).
  tmp = os.path.join(ckpt.directory, '9.orbax-checkpoint-tmp')
  os.makedirs(os.path.join(tmp, 'state'))
  with open(os.path.join(tmp, 'state', 'garbage'), 'w') as f:
    f.write('half')
  again = training.TrainCheckpointer(str(tmp_path), every_steps=1, keep_last=2)
  assert again.latest_step() == 5
  assert again.all_steps() == [5]
  restored, _ = again.restore(5, abstract(make_state()))
  assert int(restored.step) == 5
  # The leftover is deleted (in the background, done before the next save).
  again.save(6, restored)
  again.close()
  assert sorted(os.listdir(again.directory)) == ['5', '6']


def test_resume_with_another_scan_layout_names_the_setting(tmp_path):
  # Written with model.encoder.scan=True (blocks 0-1 in one scan), resumed unscanned.
  scanned = {'Encoder': {'scan_0_1x2': {'block_0': {'Mlp': {'bias': jnp.ones((2, 3))}}}}}
  unscanned = {'Encoder': {f'encoderblock_{i}': {'Mlp': {'bias': jnp.ones(3)}}
                           for i in range(2)}}
  ckpt = training.TrainCheckpointer(str(tmp_path), every_steps=1)
  ckpt.save(4, make_state(4, scanned))
  ckpt.close()
  again = training.TrainCheckpointer(str(tmp_path), every_steps=1)
  with pytest.raises(ValueError, match=r'(?s)step 4 .* holds scanned \(scan_0_1x2\) '
                     r'encoder blocks, but the model is unscanned.*model.encoder.scan'):
    again.restore_latest(abstract(make_state(4, unscanned)))
  again.close()


def test_resume_with_another_per_image_router_layout_names_the_setting(tmp_path):
  # Written with a per-image router in every MoE layer (scope 'layer'), resumed with one
  # for the whole MoE part (scope 'model', Mobile V-MoE's).
  kernel = {'dense': {'kernel': jnp.ones((4, 2))}}
  per_layer = {'Encoder': {'encoderblock_1': {'Moe': {'Router': kernel}}}}
  per_model = {'Encoder': {'image_router': kernel, 'encoderblock_1': {'Moe': {}}}}
  ckpt = training.TrainCheckpointer(str(tmp_path), every_steps=1)
  ckpt.save(3, make_state(3, per_layer))
  ckpt.close()
  again = training.TrainCheckpointer(str(tmp_path), every_steps=1)
  with pytest.raises(ValueError, match=r"(?s)step 3 .*scope='layer'"):
    again.restore_latest(abstract(make_state(3, per_model)))
  again.close()
