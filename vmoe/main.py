r"""Trains and evaluates a model described by a config file.

  python -m vmoe.main --config=configs/digits.py --workdir=/tmp/digits
  python -m vmoe.main --config=configs/digits.py:router=NoisyTopItemsPerExpertRouter \
      --workdir=/tmp/digits_ec --config.train_steps=500

Running again with the same --workdir resumes from its latest checkpoint.
TensorBoard: `tensorboard --logdir WORKDIR`. The final eval metrics are printed
and written to WORKDIR/final_metrics.json.
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
from vmoe import cli
from vmoe.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with an argument: FILE.py[:ARG].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, TensorBoard events and the '
    'final metrics. Resumes from its latest checkpoint, if any.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.quiet_orbax()
  logging.info('JAX devices: %s (process %d of %d)', jax.devices(),
               jax.process_index(), jax.process_count())
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
