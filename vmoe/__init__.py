"""vmoe: Vision Mixture-of-Experts in JAX/Flax.

  model = vmoe.build_model(config.model, image_size=224)   # A flax module.
  classifier = vmoe.load_classifier(workdir_or_checkpoint)  # A trained model, ready to run.

`build_model` takes `config.model` of a vmoe config or of the reference's config files
(google-research/vmoe) as it is; see docs/routers.md for the router options.
"""
from vmoe.inference import load_classifier
from vmoe.nn.models import build_model

__all__ = ['build_model', 'load_classifier']
