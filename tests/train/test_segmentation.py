"""Segmentation: the pixel loss, the confusion matrix and its metrics (against hand
counts), the eval step on a tiny segmenter (every valid pixel once) and its train step."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from vmoe.nn import models
from vmoe.train import evaluator
from vmoe.train import losses
from vmoe.train import segmentation
from vmoe.train import step as step_lib
from vmoe.train import train_state

C, IGNORE = 4, 255
# Two 2x3 label maps and a padding example; class 3 is in no valid pixel.
LABELS = np.array([[[0, 0, 1], [1, IGNORE, 2]],
                   [[2, 2, 0], [IGNORE, 1, 1]],
                   [[3, 3, 3], [3, 3, 3]]], np.int32)
PREDICTIONS = np.array([[[0, 1, 1], [1, 0, 2]],
                        [[2, 0, 0], [2, 1, 1]],
                        [[3, 3, 3], [3, 3, 3]]], np.int32)
VALID = np.array([True, True, False])
# Counted (truth, prediction) pairs: example 0 (0,0) (0,1) (1,1) (1,1) (2,2), example 1
# (2,2) (2,0) (0,0) (1,1) (1,1); the ignored pixels and the padding example are left out.
HAND_CONFUSION = np.array([[2, 1, 0, 0],
                           [0, 4, 0, 0],
                           [1, 0, 2, 0],
                           [0, 0, 0, 0]])

SEGMENTER = dict(
    name='VisionTransformerMoe', num_classes=3, patch_size=(4, 4), hidden_size=8,
    classifier='gap', head_kernel_zero_init=False, decoder={'name': 'linear'},
    encoder=dict(num_layers=2, mlp_dim=16, num_heads=2, moe=dict(
        layers=(1,), num_experts=2, group_size=4,
        router=dict(num_selected_experts=1, dispatcher=dict(capacity_factor=1.0)))))


def test_confusion_counts_valid_unignored_pixels_by_hand():
  got = jax.jit(segmentation.confusion, static_argnums=(3, 4))(
      PREDICTIONS, LABELS, VALID, C, IGNORE)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, HAND_CONFUSION)


def test_confusion_sums_over_batches():
  halves = [segmentation.confusion(PREDICTIONS[i:i + 1], LABELS[i:i + 1], VALID[i:i + 1],
                                   C, IGNORE) for i in range(3)]
  np.testing.assert_array_equal(sum(halves), HAND_CONFUSION)


def test_metrics_by_hand():
  out = segmentation.metrics(HAND_CONFUSION)
  # IoU = TP / (truth + predicted - TP): 2 / (3 + 3 - 2), 4 / (4 + 5 - 4), 2 / (3 + 2 - 2);
  # class 3 (absent from truth and predictions) has none and is not averaged.
  iou = {'iou/0': 0.5, 'iou/1': 0.8, 'iou/2': 2 / 3}
  assert out == pytest.approx({
      'miou': (0.5 + 0.8 + 2 / 3) / 3, 'pixel_accuracy': 8 / 10,
      'mean_accuracy': (2 / 3 + 4 / 4 + 2 / 3) / 3, 'num_pixels': 10, **iou})
  assert isinstance(out['num_pixels'], int)


def test_a_class_predicted_but_absent_from_the_truth_has_iou_zero():
  matrix = np.array([[3, 1], [0, 0]])  # Class 1 predicted once, never true.
  out = segmentation.metrics(matrix)
  assert out['iou/1'] == 0.0 and out['miou'] == pytest.approx((0.75 + 0.0) / 2)
  assert out['mean_accuracy'] == pytest.approx(0.75)  # Over the true classes only.


def test_metrics_refuse_an_empty_confusion():
  with pytest.raises(ValueError, match='counts no pixel'):
    segmentation.metrics(np.zeros((3, 3), np.int32))


def test_confusion_under_jit_on_a_sharded_batch():
  """On 4 devices with the batch split over them: the same matrix as on one."""
  code = textwrap.dedent('''
      import jax, numpy as np
      from vmoe.parallel import mesh as mesh_lib
      from vmoe.train import segmentation
      assert jax.device_count() == 4
      mesh = mesh_lib.make_mesh()  # 'data': 4, as the evaluator's.
      split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
      rng = np.random.default_rng(0)
      labels = rng.integers(0, 6, (8, 5, 7)).astype(np.int32)
      labels[labels == 5] = 255
      pred = rng.integers(0, 5, (8, 5, 7)).astype(np.int32)
      valid = np.arange(8) < 6
      f = jax.jit(segmentation.confusion, static_argnums=(3, 4))
      with jax.set_mesh(mesh):
        sharded = f(*(jax.device_put(x, split) for x in (pred, labels, valid)), 5, 255)
      want = np.zeros((5, 5), int)
      keep = valid[:, None, None] & (labels != 255)
      np.add.at(want, (labels[keep], pred[keep]), 1)
      np.testing.assert_array_equal(np.asarray(sharded), want)
      print('ok')
  ''')
  env = dict(os.environ, XLA_FLAGS=os.environ.get('XLA_FLAGS', '')
             + ' --xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]


def _numpy_pixel_loss(logits, labels, smoothing):
  """Per pixel: -sum_c target_c log p_c with target (1 - s) one_hot + s / C; NaN where
  ignored."""
  z = logits - logits.max(-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
  counted = labels != IGNORE
  onehot = np.eye(logits.shape[-1])[np.where(counted, labels, 0)]
  target = (1 - smoothing) * onehot + smoothing / logits.shape[-1]
  return np.where(counted, -(target * log_p).sum(-1), np.nan)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_pixel_loss_is_the_mean_over_counted_pixels(smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5, C)).astype(np.float32) * 3
  labels = rng.integers(0, C, (2, 3, 5)).astype(np.int32)
  labels[0, 1, 2:] = IGNORE
  labels[1, 0, 0] = IGNORE
  loss = losses.PixelLoss(ignore_label=IGNORE, label_smoothing=smoothing)
  want = _numpy_pixel_loss(logits.astype(np.float64), labels, smoothing)
  np.testing.assert_allclose(jax.jit(loss.pixel_losses)(logits, labels),
                             np.nan_to_num(want), rtol=1e-5, atol=1e-6)
  # The batch's loss: sum over the 26 counted pixels / 26, not a mean over images.
  np.testing.assert_allclose(loss.batch_loss(logits, labels), np.nanmean(want), rtol=1e-5)
  # bfloat16 logits are lifted to float32 first.
  assert loss.pixel_losses(jnp.asarray(logits, jnp.bfloat16), labels).dtype == jnp.float32
  right = (logits.argmax(-1) == labels)[labels != IGNORE].mean()
  np.testing.assert_allclose(loss.train_metrics(logits, labels)['pixel_accuracy'], right,
                             rtol=1e-6)


def test_a_label_outside_the_classes_makes_the_loss_nan():
  labels = np.array([[[0, 7]]], np.int32)  # 7: neither a class of 4 nor the ignore label.
  out = losses.PixelLoss().pixel_losses(np.zeros((1, 1, 2, C), np.float32), labels)
  assert np.isfinite(out[0, 0, 0]) and np.isnan(out[0, 0, 1])


def test_an_all_ignored_batch_has_loss_zero():
  labels = np.full((1, 2, 2), IGNORE, np.int32)
  assert float(losses.PixelLoss().batch_loss(np.ones((1, 2, 2, C)), labels)) == 0.0


def test_image_labels():
  assert losses.PixelLoss().image_labels(np.zeros((2, 3, 3), np.int32)) is None
  onehot = np.eye(3, dtype=np.float32)[[2, 0]]
  np.testing.assert_array_equal(losses.Loss('softmax_xent').image_labels(onehot), [2, 0])


@pytest.fixture(scope='module')
def segmenter():
  return models.resolve(SEGMENTER, image_size=(8, 8))


@pytest.fixture(scope='module')
def classifier():
  return models.resolve({**SEGMENTER, 'decoder': None})


def test_resolve_gives_the_pixel_loss_with_its_defaults(segmenter):
  assert losses.resolve({'name': 'pixel_softmax_xent'}, segmenter) == losses.PixelLoss(
      'pixel_softmax_xent', 255, 0.0)
  assert losses.resolve({'name': 'pixel_softmax_xent', 'ignore_label': -1,
                         'label_smoothing': 0.1}, segmenter).ignore_label == -1


@pytest.mark.parametrize('config, match', [
    ({'ignore_label': 2}, r'config\.loss\.ignore_label=2 is a class id of the model\'s 3 '
     r'classes .* use a label outside \[0, 3\), e\.g\. 255'),
    ({'ignore_label': 0}, r'ignore_label=0 is a class id'),
    ({'ignore_label': 2.5}, r'ignore_label=2\.5 must be an integer'),
    ({'label_smoothing': 1.0}, r'label_smoothing=1\.0 must be a number in \[0, 1\)'),
    ({'ensemble_size': 1}, r"Unknown key\(s\) \['ensemble_size'\] in config\.loss"),
])
def test_bad_pixel_loss_configs_are_named(segmenter, config, match):
  with pytest.raises(ValueError, match=match):
    losses.resolve({'name': 'pixel_softmax_xent', **config}, segmenter)


def test_loss_and_model_must_match(segmenter, classifier):
  with pytest.raises(ValueError, match=r"'pixel_softmax_xent' is a per-pixel loss for "
                     r"segmenters, .* set model\.decoder"):
    losses.resolve({'name': 'pixel_softmax_xent'}, classifier)
  with pytest.raises(ValueError, match=r"'softmax_xent' is an image-classification loss, "
                     r"but the model is a segmenter \(model\.decoder\.name='linear'\).*"
                     r"use 'pixel_softmax_xent'"):
    losses.resolve({'name': 'softmax_xent'}, segmenter)


@pytest.fixture(scope='module')
def tiny(segmenter):
  model = models.build(segmenter)
  params = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))['params']
  return model, params


def _batches(labels, images, valid, size):
  return [{'image': images[i:i + size], 'labels': labels[i:i + size],
           '__valid__': valid[i:i + size]} for i in range(0, len(valid), size)]


def _eval_data():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (6, 8, 8)).astype(np.int32)
  labels[:, :2, :3] = IGNORE
  valid = np.arange(6) < 5
  images[5] = np.nan  # A padding example must reach no sum.
  return images, labels, valid


@pytest.mark.parametrize('flush', [False, True])
def test_evaluation_counts_every_valid_pixel_once(tiny, monkeypatch, flush):
  """Two batches of 2 + 2 + 2 examples, the last one padding: the metrics equal numpy's
  over the 5 valid examples; with `flush` the integer sums leave the device after each
  batch (as before they could overflow int32), with the same result."""
  model, params = tiny
  if flush:
    monkeypatch.setattr(evaluator, '_MAX_DEVICE_COUNT', 2 * 8 * 8)
  images, labels, valid = _eval_data()
  step = evaluator.make_eval_step(model, losses.PixelLoss(), params_sharding=None,
                                  batch_sharding=None, routing_stats=True)
  out = evaluator.evaluate(step, params, _batches(labels, images, valid, 2),
                           num_examples=5)
  logits = np.concatenate([np.asarray(model.apply({'params': params}, images[i:i + 2])[0])
                           for i in (0, 2, 4)])[:5].astype(np.float64)
  y = labels[:5]
  keep = y != IGNORE
  matrix = np.zeros((3, 3), int)
  np.add.at(matrix, (y[keep], logits.argmax(-1)[keep]), 1)
  want = segmentation.metrics(matrix)
  assert want['num_pixels'] == 5 * (64 - 6)
  assert set(out) == set(want) | {'loss', 'num_examples', 'dropped/encoderblock_1'}
  assert out['num_examples'] == 5
  assert {k: v for k, v in out.items() if k in want} == pytest.approx(want)
  np.testing.assert_allclose(out['loss'], np.nanmean(_numpy_pixel_loss(logits, y, 0.0)),
                             rtol=1e-5)
  assert 0 <= out['dropped/encoderblock_1'] <= 1
  assert evaluator.headline(out) == ('miou', out['miou'])
  assert evaluator.summary(out) == (f'miou={out["miou"]:.4f} pixel_acc='
                                    f'{out["pixel_accuracy"]:.4f} loss={out["loss"]:.4f}')


def test_evaluation_refuses_labels_outside_the_classes(tiny):
  model, params = tiny
  images, labels, valid = _eval_data()
  labels[1, 4, 4] = 7
  step = evaluator.make_eval_step(model, losses.PixelLoss(), params_sharding=None,
                                  batch_sharding=None)
  with pytest.raises(ValueError, match=r'1 pixels of the eval split have labels that are '
                     r'neither a class id in \[0, 3\)'):
    evaluator.evaluate(step, params, _batches(labels, images, valid, 2), num_examples=5)


def test_headline_of_a_classifier():
  metrics = {'prec@1': 0.98765, 'loss': 0.1, 'ece': 0.01, 'num_examples': 3}
  assert evaluator.headline(metrics) == ('prec@1', 0.98765)
  assert evaluator.summary(metrics) == 'prec@1=0.9877 loss=0.1000'


def test_forward_returns_a_segmenters_logits(tiny):
  model, params = tiny
  images, _, _ = _eval_data()
  logits, _ = evaluator.Forward(model)(params, images[:4])
  assert logits.shape == (4, 8, 8, 3)
  with pytest.raises(ValueError, match="outputs='pre_logits' is a classifier's"):
    evaluator.Forward(model, outputs='pre_logits')


def test_train_step_learns_from_pixels(tiny):
  model, params = tiny
  images, labels, _ = _eval_data()
  tx = optax.sgd(0.1)
  state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params))
  train_step = jax.jit(step_lib.make_train_step(
      model, tx, lambda s: 0.1, losses.PixelLoss(), seed=0, rng_names=('gating',),
      mixup_config=None, num_shards=1))
  batch = {'image': images[:4], 'labels': labels[:4]}
  new, metrics = train_step(state, batch)
  assert 'prec@1' not in metrics and 0 <= float(metrics['pixel_accuracy']) <= 1
  logits, _ = model.apply({'params': params}, images[:4], train=True,
                          rngs=train_state.rng_streams(0, 0, ('gating',)))
  logits = np.asarray(logits, np.float64)
  np.testing.assert_allclose(metrics['main_loss'],
                             np.nanmean(_numpy_pixel_loss(logits, labels[:4], 0.0)),
                             rtol=1e-5)
  assert float(metrics['nonfinite_steps']) == 0.0 and int(new.step) == 1
  _, after = train_step(new, batch)
  assert float(after['main_loss']) < float(metrics['main_loss'])
