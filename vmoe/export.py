"""Export a checkpoint's parameters (only) with the reference's names.

  python -m vmoe.export --workdir=DIR | --checkpoint=PATH \
      --format=legacy|safetensors|npz --out=PATH [--num_shards=N] [--overwrite]

--workdir takes its latest checkpoint; --checkpoint is WORKDIR/checkpoints/STEP or a
legacy prefix. 'legacy' writes OUT.index + OUT.data-NNNNN-of-NNNNN (the released V-MoE
format, readable by google-research/vmoe), 'safetensors' and 'npz' one file each.
"""
from absl import app
from absl import flags

from vmoe import cli
from vmoe.checkpoints import export as export_lib
from vmoe.checkpoints import sources
from vmoe.utils import checks
from vmoe.utils import console


def run(*, workdir: str | None, checkpoint: str | None, fmt: str, out: str,
        num_shards: int = 1, overwrite: bool = False) -> list[str]:
  """Checks the arguments, reads the params and writes them; returns the files."""
  if (workdir is None) == (checkpoint is None):
    raise ValueError('Give exactly one of --workdir (its latest checkpoint) and '
                     '--checkpoint (WORKDIR/checkpoints/STEP or a legacy prefix).')
  checks.one_of(fmt, export_lib.FORMATS, '--format')
  if num_shards < 1 or (num_shards > 1 and fmt != 'legacy'):
    raise ValueError(f'--num_shards={num_shards}: must be >= 1, and only --format=legacy '
                     'writes several files.')
  old = export_lib.outputs(fmt, out)
  if old and not overwrite:  # Before reading a possibly large checkpoint.
    raise ValueError(f'{old[0]} already exists; choose another --out or pass --overwrite.')
  _, params = sources.load_params(checkpoint or workdir)
  return export_lib.export(params, fmt, out, num_shards=num_shards, overwrite=overwrite)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  console.say(f"Full logs: {cli.log_to_file('export', f.workdir, tensorflow=False)}")
  files = run(workdir=f.workdir, checkpoint=f.checkpoint, fmt=f.format, out=f.out,
              num_shards=f.num_shards, overwrite=f.overwrite)
  console.say('Wrote ' + ', '.join(files))


def define_flags():
  """Only when run as a program: the library must not claim --workdir."""
  flags.DEFINE_string('workdir', None, 'Workdir whose latest checkpoint to export.')
  flags.DEFINE_string('checkpoint', None,
                      'WORKDIR/checkpoints/STEP or a legacy prefix (PREFIX.index).')
  flags.DEFINE_enum('format', None, list(export_lib.FORMATS), 'Output format.')
  flags.DEFINE_string('out', None, 'Output file (legacy: output prefix).')
  flags.DEFINE_integer('num_shards', 1, 'Data files of a legacy export (at most).')
  flags.DEFINE_bool('overwrite', False, 'Replace existing output files.')


if __name__ == '__main__':
  define_flags()
  cli.run(main, required=('format', 'out'))
