r"""Trains and evaluates a model described by a config file.

  python -m vmoe.main --config=configs/digits.py --workdir=/tmp/digits
  python -m vmoe.main --config=configs/digits.py:router=NoisyTopItemsPerExpertRouter \
      --workdir=/tmp/digits_ec --config.train_steps=500

Running again with the same --workdir resumes from its latest checkpoint.
TensorBoard: `tensorboard --logdir WORKDIR`. The final eval metrics are printed
and written to WORKDIR/final_metrics.json.
"""
import logging as std_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
from vmoe.train import config_checks
from vmoe.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with an argument: FILE.py[:ARG].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, TensorBoard events and the '
    'final metrics. Resumes from its latest checkpoint, if any.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags; an override of a key the config lacks is a ValueError
  that lists the valid keys (config_flags would raise a bare AttributeError)."""
  config_arg = [a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')]
  config_arg += [b for a, b in zip(argv[1:], argv[2:]) if a == '--config']
  overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv[1:]
               if a.startswith('--config.')]
  if config_arg and overrides:
    config = flags.FLAGS['config'].parser.parse(config_arg[-1])
    for path in overrides:
      config_checks.check_key_path(config, path)
  return app.parse_flags_with_usage(argv)


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's INFO lines (dozens per checkpoint); keeps its warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  logging.info('JAX devices: %s (process %d of %d)', jax.devices(),
               jax.process_index(), jax.process_count())
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
