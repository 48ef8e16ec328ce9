r"""Trains and evaluates a model described by a config file.

  python -m vmoe.main --config=configs/digits.py --workdir=/tmp/digits
  python -m vmoe.main --config=configs/digits.py:router=NoisyTopItemsPerExpertRouter \
      --workdir=/tmp/digits_ec --config.train_steps=500

Multi-process (multi-host) runs: every process runs the same command with
--coordinator_address=HOST:PORT (process 0's host, any free port),
--num_processes=N and --process_id=I; on SLURM (srun) and TPU pods these are
found in the environment (scripts/slurm_gpu.sh, scripts/tpu_pod.sh). Each
process reads its own shard of the data; checkpoints are written together.

Running again with the same --workdir resumes from its latest checkpoint.
TensorBoard: `tensorboard --logdir WORKDIR`. The final eval metrics are printed
and written to WORKDIR/final_metrics.json. The terminal shows the progress, the
evaluations, warnings and errors; the full logs are in WORKDIR/logs/main.log
(--alsologtostderr also prints them).
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
from vmoe import cli
from vmoe.utils import console

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with an argument: FILE.py[:ARG].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, TensorBoard events and the '
    'final metrics. Resumes from its latest checkpoint, if any.')

_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', cli.DISTRIBUTED_MODES,
    'Multi-process run (jax.distributed): auto (with --coordinator_address, or '
    'on SLURM / a TPU pod), on (always; JAX finds the rest), off.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes of a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process of a multi-process run: 0..N-1.')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout', 30, 'Seconds after which a silent process counts as dead '
    'and the others of a multi-process run exit with an error.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.initialize_distributed(
      _DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      heartbeat_timeout=_HEARTBEAT.value)
  log = cli.log_to_file('main', _WORKDIR.value)
  # After the log file: TensorFlow's C++ start-up lines go there (cli.log_to_file).
  from vmoe.train import trainer  # pylint: disable=g-import-not-at-top
  console.say(f'Full logs: {log}')
  logging.info('JAX devices: %s (process %d of %d)', jax.devices(),
               jax.process_index(), jax.process_count())
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
