"""What the command-line entry points share (vmoe.main, vmoe.evaluate, vmoe.tools.*)."""
import logging as std_logging

from absl import app
from absl import flags
from absl import logging
from vmoe.train import config_checks


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


def quiet_orbax():
  logging.get_absl_handler().addFilter(_QuietOrbax())


def run(main, required=('config', 'workdir')):
  """app.run(main) with the flag checks above; `required` flags must be given."""
  flags.mark_flags_as_required(list(required))
  app.run(main, flags_parser=parse_flags)
