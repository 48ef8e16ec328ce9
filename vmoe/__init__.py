"""vmoe: Vision Mixture-of-Experts in JAX/Flax."""
from vmoe.inference import load_classifier

__all__ = ['load_classifier']
