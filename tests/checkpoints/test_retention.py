"""TrainCheckpointer: keep the last N plus every M-th step; refuse another seed."""
import jax
import jax.numpy as jnp
import pytest
from vmoe.checkpoints import training


def state(step):
  return {'step': jnp.array(step, jnp.int32), 'w': jnp.full((3,), step, jnp.float32)}


def abstract():
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                      state(0))


def test_keeps_last_n_and_every_mth_step(tmp_path):
  ckpt = training.TrainCheckpointer(str(tmp_path), every_steps=1, keep_last=2,
                                    keep_every=4)
  for step in range(1, 11):
    ckpt.save(step, state(step))
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 9, 10]
  restored, meta = ckpt.restore(8, abstract())
  ckpt.close()
  assert meta == {'step': 8} and float(restored['w'][0]) == 8


def test_resuming_with_another_seed_is_refused(tmp_path):
  ckpt = training.TrainCheckpointer(str(tmp_path), every_steps=1, seed=3)
  ckpt.save(5, state(5))
  ckpt.close()
  same = training.TrainCheckpointer(str(tmp_path), every_steps=1, seed=3)
  step, restored = same.restore_latest(abstract())
  same.close()
  assert step == 5 and int(restored['step']) == 5
  other = training.TrainCheckpointer(str(tmp_path), every_steps=1, seed=4)
  with pytest.raises(ValueError, match=r'config\.seed=3, but this run has config\.seed=4'
                     r'.*--config\.seed=3'):
    other.restore_latest(abstract())
  other.close()


@pytest.mark.parametrize('kwargs, message', [
    (dict(every_steps=0), r'save_checkpoint\.every_steps must be > 0 or None, got 0'),
    (dict(every_steps=1, keep_every=-2), r'save_checkpoint\.keep_every must be > 0'),
    (dict(every_steps=1, keep_last=0), r'save_checkpoint\.keep_last must be > 0'),
])
def test_bad_retention_values(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    training.TrainCheckpointer(str(tmp_path), **kwargs)
