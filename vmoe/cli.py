"""What the command-line entry points share (vmoe.main, vmoe.evaluate, vmoe.tools.*)."""
import functools
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags; an override of a key the config lacks is a ValueError
  that lists the valid keys (config_flags would raise a bare AttributeError)."""
  # Here, not at the top: config_checks imports TensorFlow (seconds), which
  # `user_errors` alone (vmoe.export) needs not.
  from vmoe.train import config_checks  # pylint: disable=g-import-not-at-top
  config_arg = [a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')]
  config_arg += [b for a, b in zip(argv[1:], argv[2:]) if a == '--config']
  overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv[1:]
               if a.startswith('--config.')]
  if config_arg and overrides:
    config = flags.FLAGS['config'].parser.parse(config_arg[-1])
    for path in overrides:
      try:
        config_checks.check_key_path(config, path)
      except ValueError as e:
        _exit_with(e)
  return app.parse_flags_with_usage(argv)


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's INFO lines (dozens per checkpoint); keeps its warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def quiet_orbax():
  logging.get_absl_handler().addFilter(_QuietOrbax())


DISTRIBUTED_MODES = ('auto', 'on', 'off')


def cluster_env() -> str | None:
  """'slurm' or 'tpu' when the environment says that this is one of several processes
  that JAX can find each other from (a SLURM step of >1 tasks, a multi-host TPU)."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_STEP_NODELIST' in os.environ:
    return 'slurm'
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len(hosts.split(',')) > 1 or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu'
  return None


def initialize_distributed(mode: str = 'auto', *, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           heartbeat_timeout: int = 30) -> bool:
  """Joins a multi-process run (jax.distributed) before JAX touches any device.

  mode 'auto': with coordinator_address (then num_processes and process_id too), or
  when cluster_env() finds SLURM or a TPU pod (jax.distributed.initialize() then reads
  everything from the environment); else a single process. 'on': always (JAX fills in
  what is not given, e.g. from the TPU VM metadata); 'off': never. A process that stops
  sending heartbeats for `heartbeat_timeout` seconds (killed, host lost) makes the others
  exit with an error instead of waiting forever in a collective. Returns whether it
  initialised.
  """
  explicit = {'coordinator_address': coordinator_address,
              'num_processes': num_processes, 'process_id': process_id}
  given = [k for k, v in explicit.items() if v is not None]
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f'--distributed={mode!r} is unknown; valid: {DISTRIBUTED_MODES}.')
  if mode == 'off' and given:
    raise ValueError(f'--distributed=off contradicts --{given[0]}; drop one of them.')
  if given and (coordinator_address is None or len(given) < 3) and not cluster_env():
    raise ValueError(
        f'--{", --".join(given)} given without the rest: a multi-process run needs '
        '--coordinator_address=HOST:PORT (process 0\'s), --num_processes=N and '
        '--process_id=I (0..N-1) on every process, or a SLURM / TPU pod environment.')
  if (num_processes is not None and process_id is not None
      and not 0 <= process_id < num_processes):
    raise ValueError(f'--process_id={process_id} must be in [0, --num_processes='
                     f'{num_processes}).')
  if heartbeat_timeout < 1:
    raise ValueError(f'--heartbeat_timeout={heartbeat_timeout} must be >= 1 (seconds).')
  if mode == 'off' or (mode == 'auto' and not given and not cluster_env()):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(**explicit, heartbeat_timeout_seconds=heartbeat_timeout)
  logging.info('Process %d of %d (jax.distributed).', jax.process_index(),
               jax.process_count())
  return True


def user_errors(main):
  """main, where bad input ends the program with one line and exit status 2.

  Bad input (flags, config, files) raises ValueError, by the checks that run before
  anything compiles or trains: the user needs its message, which names the bad value and
  the fix, not a traceback through absl. The traceback is still logged at debug level
  (--verbosity=1) for the case that the ValueError is a bug.
  """
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except ValueError as e:
      _exit_with(e)
  return wrapped


def _exit_with(e: ValueError):
  logging.debug('Traceback of the error below:', exc_info=True)
  name = '' if type(e) is ValueError else f'{type(e).__name__}: '
  print(f'error: {name}{e}', file=sys.stderr, flush=True)
  sys.exit(2)


def run(main, required=('config', 'workdir')):
  """app.run(main) with the flag checks above and `user_errors`; `required` flags must
  be given."""
  flags.mark_flags_as_required(list(required))
  app.run(user_errors(main), flags_parser=parse_flags)
