"""The console: one progress line per report off a terminal, results to stdout."""
import io

from vmoe.utils import console


def test_progress_off_a_terminal_prints_one_line_per_report(capsys):
  stream = io.StringIO()  # Not a terminal: no bar, no terminal codes.
  progress = console.Progress(100, initial=20, desc='train', stream=stream)
  for _ in range(30):
    progress.advance()
  progress.report(loss=0.123456)
  progress.advance(50)
  progress.report(loss=0.01)
  progress.close()
  lines = stream.getvalue().splitlines()
  assert [line.split(' [')[0] for line in lines] == ['train: 50/100', 'train: 100/100']
  assert lines[0].endswith('step/s, loss=0.1235]') and '\x1b' not in stream.getvalue()
  console.say('Final test: x')
  assert capsys.readouterr().out == 'Final test: x\n'
