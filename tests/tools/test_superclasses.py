"""Super-classes from a confusion matrix: confused classes share an expert."""
import json

import numpy as np
import pytest

from vmoe.nn.routers import per_image
from vmoe.tools import superclasses


def test_confused_pairs_share_a_group(tmp_path):
  labels = np.repeat(np.arange(6), 20)
  pred = labels.copy()
  for a, b in ((0, 3), (1, 4), (2, 5)):  # Each class is confused with its partner.
    pred[np.flatnonzero(labels == a)[:6]] = b
    pred[np.flatnonzero(labels == b)[:6]] = a
  conf = superclasses.confusion_matrix(labels, pred, 6)
  assert conf.sum() == 120 and conf[0, 3] == 6
  groups = superclasses.cluster_classes(conf, 3)
  assert groups[0] == groups[3] and groups[1] == groups[4] and groups[2] == groups[5]
  assert len(set(groups.tolist())) == 3 and groups[0] == 0
  path = str(tmp_path / 'sc.json')
  superclasses.write_superclasses(path, groups, conf)
  superclasses.plot_grouped_confusion(conf, groups, str(tmp_path / 'sc.png'))
  assert (tmp_path / 'sc.png').stat().st_size > 1000
  # The file is what PerImageRouter reads.
  assert per_image.load_superclasses(path, 6, 3) == tuple(groups.tolist())
  assert json.load(open(path))['num_experts'] == 3


def test_more_experts_than_classes_is_an_error():
  with pytest.raises(ValueError, match='Cannot split 3 classes into num_experts=4'):
    superclasses.cluster_classes(np.eye(3), 4)
