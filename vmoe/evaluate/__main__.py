r"""Evaluates trained weights: test-time sweeps, routing analysis, few-shot probes and a
segmenter's predicted masks.

  python -m vmoe.evaluate --config=configs/digits.py --workdir=/tmp/vmoe_digits \
      [--checkpoint=PATH] [--sweep='capacity_factor=0.1,0.25,0.5,1,1.5,2;\
num_selected_experts=1,2;batch_priority=false,true'] [--analyze] [--fewshot]
  python -m vmoe.evaluate --config=configs/digits_seg.py --workdir=/tmp/vmoe_digits_seg \
      [--sweep=...] [--analyze] [--predictions=N]

The weights: the latest checkpoint of WORKDIR, or --checkpoint (one of our checkpoint
directories, a workdir, or a released legacy prefix). The config describes the model and
the eval sets (--eval_set, default the first). Everything is written to WORKDIR/eval/
(or --output_dir):
- --sweep (default DEFAULT_SWEEP; '' skips it): sweep.csv, sweep.json, sweep.png. Any
  config key can be swept (KEY=V1,V2;KEY2=...; short names in sweep_spec.ALIASES). Per
  variant a classifier's accuracy, loss and ECE or a segmenter's mIoU, pixel and mean
  accuracy and loss, with dropped tokens, GFLOPs and images/s; the plot: accuracy (mIoU)
  against the first swept key and against GFLOPs per image.
- --analyze: routing.json, routing.png (load and class x expert per MoE layer),
  routing_summary.png, and routing_superclasses.png for super-class guided routers. A
  token's class: its image's label, for a segmenter the majority pixel class of its patch.
- --fewshot (classifiers): fewshot.json and fewshot.png, with config.fewshot if the config
  has one, else shots from the train split under the eval set's preprocessing.
- --predictions=N (segmenters; default command.DEFAULT_PREDICTIONS, 0 skips it):
  predictions.png (image, true and predicted mask of the first N examples) and
  predictions.json (each one's pixel accuracy and mIoU).
All files are written atomically (a temporary file, then renamed).
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from vmoe import cli
from vmoe.evaluate import sweep_spec
from vmoe.utils import console

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file of the model.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of the trained model.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Weights (default: latest of workdir).')
_SWEEP = flags.DEFINE_string('sweep', sweep_spec.DEFAULT_SWEEP,
                             "Test-time sweep KEY=V1,V2;KEY2=...; '' for none.")
_ANALYZE = flags.DEFINE_bool('analyze', False, 'Write the routing analysis.')
_FEWSHOT = flags.DEFINE_bool('fewshot', False, 'Run the few-shot linear evaluation.')
_EVAL_SET = flags.DEFINE_string('eval_set', None, 'Eval set of config.dataset '
                                '(default: the first).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Default: WORKDIR/eval.')
_THRESHOLD = flags.DEFINE_float('threshold', 0.5, 'Layers specialising less than this '
                                "times the best layer's are recommended dense.")
_PREDICTIONS = flags.DEFINE_integer('predictions', None, "A segmenter's examples shown in "
                                    'predictions.png (default 4; 0: none).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.say(f'Full logs: {cli.log_to_file("evaluate", _WORKDIR.value)}')
  # After the log file: TensorFlow's C++ start-up lines go there (cli.log_to_file).
  from vmoe.evaluate import command  # pylint: disable=g-import-not-at-top
  command.evaluate(_CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value,
                   spec=_SWEEP.value, routing=_ANALYZE.value, few_shot=_FEWSHOT.value,
                   eval_set=_EVAL_SET.value, output_dir=_OUTPUT_DIR.value,
                   threshold=_THRESHOLD.value, predictions=_PREDICTIONS.value)


if __name__ == '__main__':
  cli.run(main)
