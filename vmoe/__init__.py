"""vmoe: Vision Mixture-of-Experts in JAX/Flax.

  model = vmoe.build_model(config.model, image_size=224)   # A flax module.
  classifier = vmoe.load_classifier(workdir_or_checkpoint, config.model)
  logits = classifier(images)          # float32 [B, H, W, 3] -> [B, classes]
  segmenter = vmoe.load_segmenter(workdir_or_checkpoint, config.model)
  logits = segmenter(images)           # float32 [B, H, W, 3] -> [B, H, W, classes]

`build_model` takes `config.model` of a vmoe config or of the reference's config files
(google-research/vmoe) as it is; see docs/routers.md for the router options. A model
config with a decoder (config.model.decoder, e.g. {'name': 'linear'}) is a segmenter: it
labels every pixel; load it with `load_segmenter`, a classifier with `load_classifier`.
"""
from vmoe.inference import load_classifier
from vmoe.inference import load_segmenter
from vmoe.nn.models import build_model

__all__ = ['build_model', 'load_classifier', 'load_segmenter']
