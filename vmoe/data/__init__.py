"""Input data: the offline 'digits' TFDS dataset, pp ops and tf.data pipelines.

Import the submodules (pipeline, pp_ops, digits); this package import itself
stays light (no TensorFlow).
"""
