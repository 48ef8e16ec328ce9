"""What the command-line entry points share (vmoe.main, vmoe.evaluate, vmoe.plan,
vmoe.export, vmoe.tools.*): flags, the log file, multi-process start-up, user errors.

The terminal shows what a person needs (vmoe.utils.console: progress, results), the
warnings and the errors; the full logs (absl and every library's Python logging, INFO and
up, and the C++ lines TensorFlow and XLA print while they load) go to a log file
(`log_to_file`), and also to the terminal with --alsologtostderr.
"""
import contextlib
import functools
import io
import logging as std_logging
import os
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
from vmoe.utils import checks
from vmoe.utils import dotted
from vmoe.utils import files


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
      try:
        dotted.check_path(config, path)
      except ValueError as e:
        _exit_with(e)
  return app.parse_flags_with_usage(argv)


def log_to_file(program: str, workdir: str | None = None, *,
                tensorflow: bool = True) -> str:
  """Sends the logs to WORKDIR/logs/PROGRAM.log (PROGRAM.process<i>.log for process
  i > 0; without a workdir, --log_dir or the temp dir), appending: INFO and up, Python
  warnings included. The terminal keeps warnings and errors (--stderrthreshold, default
  'warning'; everything with --alsologtostderr). Returns the file's path.

  Call it first in main(), before importing what loads TensorFlow: JAX's backends start
  and (with `tensorflow`) TensorFlow loads here, their C++ start-up lines (which bypass
  Python's logging) going to the file too.
  """
  if workdir:
    directory = os.path.join(workdir, 'logs')
    files.check_writable(workdir, workdir, directory)
  else:
    directory = flags.FLAGS.log_dir or tempfile.gettempdir()
  handler = logging.get_absl_handler().python_handler
  early = io.StringIO()  # What is logged before the file's name (the process) is known.
  handler.setStream(early)
  with _native_stderr() as native:
    import jax  # pylint: disable=g-import-not-at-top
    index = jax.process_index()  # Starts the backends (after jax.distributed).
    if tensorflow:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  path = os.path.join(directory, program + (f'.process{index}' if index else '') + '.log')
  log = open(path, 'a', buffering=1)  # pylint: disable=consider-using-with
  log.write(early.getvalue() + ''.join(native))
  handler.setStream(log)
  if not flags.FLAGS['stderrthreshold'].present:
    flags.FLAGS.stderrthreshold = 'warning'
  std_logging.captureWarnings(True)
  return path


@contextlib.contextmanager
def _native_stderr():
  """Inside: what C++ code writes to file descriptor 2 is captured (the yielded list
  holds it after the block); Python's sys.stderr still reaches the terminal."""
  text = []
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile('w+') as capture:
    os.dup2(capture.fileno(), 2)
    python_stderr = sys.stderr
    sys.stderr = os.fdopen(os.dup(saved), 'w', buffering=1)
    try:
      yield text
    finally:
      sys.stderr.close()
      sys.stderr = python_stderr
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      text.append(capture.read())


def check_single_process(tool: str):
  """Tools that gather per-example outputs on one host run as one process."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    raise ValueError(f'{tool} gathers per-example outputs on one host; run it as one '
                     f'process (it uses all local devices), not {jax.process_count()}.')


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
    checks.one_of(mode, DISTRIBUTED_MODES, '--distributed')
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
