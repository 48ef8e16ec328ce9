"""Sweep rows, plots and tables of classifiers and segmenters."""
import jax
import numpy as np

from vmoe.evaluate import sweep
from vmoe.nn import models
from vmoe.train import config as config_lib
from vmoe.train import losses
from vmoe.utils import files

CF = 'model.encoder.moe.router.dispatcher.capacity_factor'
K = 'model.encoder.moe.router.num_selected_experts'


def _segmenter(capacity_factor=1.0):
  return models.resolve(dict(
      name='VisionTransformerMoe', num_classes=3, patch_size=(4, 4), hidden_size=8,
      classifier='gap', decoder={'name': 'linear'},
      encoder=dict(num_layers=2, mlp_dim=8, num_heads=1, moe=dict(
          layers=(1,), num_experts=2, group_size=8,
          router=dict(num_selected_experts=1, noise_std=0.0, dispatcher=dict(
              name='einsum', capacity_factor=capacity_factor))))), image_size=(8, 8))


class _Split(list):
  """Eval batches with the iterable's num_examples."""
  num_examples = 3


def _variant(capacity_factor):
  data = config_lib.Data('dataset.test', None, 2, model=_segmenter(capacity_factor))
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (2, 2, 8, 8)).astype(np.int32)
  labels[:, :, 0] = 255
  split = _Split({'image': rng.normal(size=(2, 8, 8, 3)).astype(np.float32),
                  'labels': labels[i], '__valid__': np.array([True, i == 0])}
                 for i in range(2))
  return sweep.Variant({CF: capacity_factor}, data, split, losses.PixelLoss())


def test_segmenter_variants_give_miou_rows(capsys):
  variants = [_variant(0.5), _variant(2.0)]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32),
                        models.param_shapes(variants[0].data.model))
  rows = sweep.run(None, params, variants)
  assert list(rows[0])[:6] == ['capacity_factor', 'miou', 'pixel_accuracy', 'mean_accuracy',
                               'loss', 'dropped_mean']
  assert 'accuracy' not in rows[0] and 'ece' not in rows[0]
  for r in rows:
    assert 0 <= r['miou'] <= 1 and 0 <= r['pixel_accuracy'] <= 1 and np.isfinite(r['loss'])
    assert r['gflops_per_image'] > 0 and r['images_per_s'] > 0
  # Capacity 2x: no token dropped; 0.5x: some.
  assert rows[1]['dropped/encoderblock_1'] == 0 < rows[0]['dropped/encoderblock_1']
  assert 'capacity_factor=0.5: miou ' in capsys.readouterr().out


def _rows(quality):
  return [{'capacity_factor': cf, 'num_selected_experts': k, **quality(cf, k),
           'dropped_mean': 0.0, 'gflops_per_image': cf * k, 'images_per_s': 10.0,
           'compile_s': 1.0} for k in (1, 2) for cf in (0.5, 1.0)]


def _plotted(rows, tmp_path, monkeypatch):
  """The figure sweep.plot draws for `rows`."""
  figures = []
  with monkeypatch.context() as m:
    m.setattr(files, 'save_figure', lambda fig, path: figures.append(fig))
    sweep.plot(rows, str(tmp_path / 'sweep.png'))
  return figures[0]


def test_segmenter_plot_shows_miou_against_gflops(tmp_path, monkeypatch):
  rows = _rows(lambda cf, k: {'miou': 0.1 * cf * k, 'pixel_accuracy': 0.9,
                              'mean_accuracy': 0.5, 'loss': 0.3})
  fig = _plotted(rows, tmp_path, monkeypatch)
  by_cf, by_gflops = fig.axes[:2]
  assert by_cf.get_xlabel() == 'capacity_factor' and by_cf.get_ylabel() == 'mIoU (%)'
  line = by_gflops.get_lines()[1]  # num_selected_experts=2.
  assert line.get_label() == 'num_selected_experts=2'
  np.testing.assert_allclose(line.get_xdata(), [1.0, 2.0])
  np.testing.assert_allclose(line.get_ydata(), [10.0, 20.0])
  paths = sweep.write(rows, str(tmp_path), title='segmenter')
  assert (tmp_path / 'sweep.png').stat().st_size > 1000
  assert open(paths['csv']).readline().strip() == (
      'capacity_factor,num_selected_experts,miou,pixel_accuracy,mean_accuracy,loss,'
      'dropped_mean,gflops_per_image,images_per_s,compile_s')
  table = sweep.table(rows).splitlines()
  assert table[0].startswith('| capacity_factor | num_selected_experts | miou |')
  assert table[2].startswith('| 0.5 | 1 | 0.05 | 0.9 |')


def test_classifier_plot_shows_accuracy(tmp_path, monkeypatch):
  rows = _rows(lambda cf, k: {'accuracy': 0.5 + 0.1 * cf, 'loss': 0.3, 'ece': 0.01})
  fig = _plotted(rows, tmp_path, monkeypatch)
  assert fig.axes[0].get_ylabel() == 'accuracy (%)'
  np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [55.0, 60.0])
