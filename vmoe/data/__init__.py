"""Input data: local TFDS datasets, pp ops and tf.data pipelines.

Submodules: pipeline (train / eval iterators over TFDS tfrecords), pp_ops (the
image and label ops of pp strings), seg_ops (joint image / segmentation-mask
ops, and the pp strings of the segmentation datasets), randaug, registry (the
pp-string parser), the offline datasets built on first use (local.prepare):
digits (scikit-learn's 8x8 digits, classification) and digit_scenes (canvases
of those digits with per-pixel masks, segmentation), and ade20k (the 150-class
ADE20K segmentation benchmark: its TFDS builder, CLASS_NAMES, NUM_CLASSES;
prepared from the manual download ADEChallengeData2016.zip by
`python -m vmoe.data.ade20k`, never on first use).
Import the submodules; this package import itself stays light (no TensorFlow).
"""
