"""`vmoe.evaluate` (command.evaluate) of a tiny digit_scenes segmenter with random
weights saved as a checkpoint: the sweep reproduces vmoe.load_segmenter's mIoU, the
routing analysis counts tokens by pixel class, the predictions are written; flags that do
not fit a segmenter (or a classifier) are refused before anything runs."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

import vmoe
from vmoe.checkpoints import legacy
from vmoe.configs import common
from vmoe.data import digit_scenes
from vmoe.data import pipeline
from vmoe.evaluate import command
from vmoe.nn import models
from vmoe.train import segmentation
from vmoe.utils import dotted

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS = 64 + 1  # An 8x8 grid of 4x4 patches and the class token.


def tiny_config():
  config = common.load_config(os.path.join(REPO, 'configs/digits_seg.py:num_experts=4'))
  return ml_collections.ConfigDict(dotted.with_values(config, {
      'model.hidden_size': 16, 'model.encoder.num_layers': 2, 'model.encoder.mlp_dim': 16,
      'model.encoder.num_heads': 2, 'model.encoder.moe.layers': (1,),
      'model.decoder': {'name': 'fpn', 'layers': (0,), 'dim': 8},
      'model.classifier': 'token', 'model.encoder.moe.group_size': 4 * TOKENS}))


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """(prefix of random params of tiny_config's model, with $TFDS_DATA_DIR holding
  digit_scenes)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  digit_scenes.prepare(data_dir)
  spec = models.resolve(tiny_config().model, image_size=(32, 32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
                        models.param_shapes(spec))
  prefix = str(tmp_path_factory.mktemp('ckpt') / 'segmenter')
  legacy.save(prefix, params)
  with pytest.MonkeyPatch.context() as m:
    m.setenv('TFDS_DATA_DIR', data_dir)
    yield prefix


def test_sweep_routing_and_predictions(checkpoint, tmp_path):
  config = tiny_config()
  out = command.evaluate(config, str(tmp_path), checkpoint=checkpoint,
                         spec='capacity_factor=0.5,1.05', routing=True, predictions=3)
  assert out == str(tmp_path / 'eval')
  with open(os.path.join(out, 'sweep.json')) as f:
    rows = json.load(f)
  assert [r['capacity_factor'] for r in rows] == [0.5, 1.05]
  assert rows[0]['dropped/encoderblock_1'] > rows[1]['dropped/encoderblock_1']
  # The config's variant (cf 1.05) scores what load_segmenter predicts, from one
  # confusion matrix of the split.
  segment = vmoe.load_segmenter(checkpoint, config.model)
  matrix = 0
  for batch in pipeline.make_eval_iterable(config.dataset.test):
    matrix += np.asarray(segmentation.confusion(
        segment(batch['image']).argmax(-1), batch['labels'], batch['__valid__'], 11, 255))
  np.testing.assert_allclose(rows[1]['miou'], segmentation.metrics(matrix)['miou'],
                             rtol=1e-6)
  with open(os.path.join(out, 'routing.json')) as f:
    routing = json.load(f)
  layer = routing['layers']['encoderblock_1']
  assert routing['class_names'][:2] == ['background', '0']
  assert np.asarray(layer['class_expert_counts']).shape == (11, 4)
  np.testing.assert_allclose(layer['dropped_fraction'], rows[1]['dropped/encoderblock_1'],
                             rtol=1e-6)
  with open(os.path.join(out, 'predictions.json')) as f:
    assert [e['index'] for e in json.load(f)] == [0, 1, 2]
  for name in ('sweep.png', 'routing.png', 'routing_summary.png', 'predictions.png'):
    assert os.path.getsize(os.path.join(out, name)) > 1000, name


def test_flags_that_do_not_fit_the_model():
  with pytest.raises(ValueError, match=r'--fewshot fits linear classifiers .* the model is '
                                       r"a segmenter \(config.model.decoder.name='fpn'\); "
                                       'leave out --fewshot'):
    command.prepare(tiny_config(), eval_set='test', spec='', few_shot=True)
  assert command.num_predictions(True, None) == command.DEFAULT_PREDICTIONS
  assert command.num_predictions(False, None) == 0
  assert command.num_predictions(True, 0) == 0
  with pytest.raises(ValueError, match=r'--predictions=2 shows predicted segmentation '
                                       r'masks, but the model is a classifier'):
    command.num_predictions(False, 2)
  with pytest.raises(ValueError, match='--predictions=-1 must be 0'):
    command.num_predictions(True, -1)
