"""vmoe: Vision Mixture-of-Experts in JAX/Flax (linen)."""
import setuptools

# Versions are pinned to the set measured to work together on CPU (see docs/).
INSTALL_REQUIRES = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'ml_collections==1.1.0',
    'tensorflow-cpu==2.21.0',
    'tensorflow-datasets==4.9.10',
    'clu==0.0.12',
    # Not pulled in by TF 2.21 any more, but needed: clu's metric writers import
    # tensorboard, tfds imports importlib_resources and decodes images with pillow.
    'tensorboard',
    'pillow',
    'importlib_resources',
    'scikit-learn',  # The offline default dataset (digits) ships inside it.
    'matplotlib',
    'msgpack',
    'numpy',
    'absl-py',
    'safetensors',
    'tqdm',  # The progress line on a terminal (vmoe.utils.console).
]
# What the README's test command and .ci/run need besides: the test runner, the linter
# and the import-layering checker (configured in ruff.toml and .importlinter).
TEST_REQUIRES = ['pytest', 'pytest-xdist', 'ruff==0.17.6', 'import-linter==2.17']

setuptools.setup(
    name='vmoe',
    version='0.1.0',
    description='Vision Mixture-of-Experts: train, fine-tune and evaluate in JAX/Flax.',
    packages=setuptools.find_packages(include=['vmoe', 'vmoe.*']),
    python_requires='>=3.11',
    install_requires=INSTALL_REQUIRES,
    extras_require={'test': TEST_REQUIRES},
)
