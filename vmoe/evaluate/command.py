"""The work of `python -m vmoe.evaluate` (see vmoe/evaluate/__main__.py), callable
without flags."""
import json
import os
from typing import Optional

import jax
import ml_collections

from vmoe import cli
from vmoe.checkpoints import sources
from vmoe.data import pipeline
from vmoe.evaluate import analysis
from vmoe.evaluate import predictions as predictions_lib
from vmoe.evaluate import sweep
from vmoe.evaluate import sweep_spec
from vmoe.nn import models
from vmoe.train import config as config_lib
from vmoe.train import evaluator
from vmoe.train import fewshot
from vmoe.utils import console
from vmoe.utils import files


# Examples in predictions.png when --predictions is not given: for a segmenter (a
# classifier has no masks to show).
DEFAULT_PREDICTIONS = 4


def num_predictions(segmenter: bool, predictions: Optional[int]) -> int:
  """--predictions for this model (None: the default), checked."""
  if predictions is None:
    return DEFAULT_PREDICTIONS if segmenter else 0
  if predictions < 0:
    raise ValueError(f'--predictions={predictions} must be 0 (none) or more examples.')
  if predictions and not segmenter:
    raise ValueError(f'--predictions={predictions} shows predicted segmentation masks, but '
                     'the model is a classifier (no config.model.decoder); leave out '
                     '--predictions.')
  return predictions


def with_fewshot(config, eval_set: str) -> dict:
  """config, with shots from the train split preprocessed like the eval set and scored on
  the eval set, unless it has config.fewshot."""
  c = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  if not c.get('fewshot'):
    test = c['dataset'][eval_set]
    c['fewshot'] = dict(train={**test, 'split': c['dataset']['train']['split']}, test=test)
  return c


def prepare(config, *, eval_set: Optional[str], spec: str, few_shot: bool
            ) -> tuple[config_lib.Run, list[sweep.Variant]]:
  """Everything the flags say, checked before anything compiles: the config, the eval
  set, every sweep variant, the datasets' metadata and their images (one example each)."""
  evals = [k for k in config.dataset if k != 'train']
  if eval_set not in evals:
    raise ValueError(f'--eval_set={eval_set!r} is not an eval set of the config; '
                     f'valid: {evals}.')
  model = models.resolve(config.model)
  if few_shot and model.segmenter:
    raise ValueError('--fewshot fits linear classifiers of images on the model\'s '
                     'representation, but the model is a segmenter (config.model.decoder'
                     f'.name={model.decoder.name!r}); leave out --fewshot (--predictions=N '
                     'shows its masks).')
  config = with_fewshot(config, eval_set) if few_shot else config
  run = config_lib.resolve(config, num_devices=jax.device_count(),
                           num_processes=jax.process_count())
  config_lib.log_inert_options(run)
  values = sweep_spec.parse(spec, config) if spec else []
  run = config_lib.with_data(run)
  names = [f'dataset.{eval_set}'] + (['fewshot.train', 'fewshot.test'] if few_shot else [])
  iterables = {n: pipeline.make_eval_iterable(run.entry(n).config) for n in names}
  train = pipeline.make_eval_iterable(run.entry('dataset.train').config).shapes()
  run = config_lib.with_inputs(run, {'dataset.train': train,
                                     **{n: it.shapes() for n, it in iterables.items()}})
  variants = sweep.resolve(config, values, eval_set=eval_set, train_shapes=train)
  return run, variants


def class_names(data: config_lib.Data) -> Optional[tuple[str, ...]]:
  """The names of a segmentation dataset's pixel classes, if known and as many as the
  model's."""
  names = analysis.CLASS_NAMES.get(data.config.name.partition(':')[0])
  return names if names and len(names) == data.model.num_classes else None


def analyze(run: config_lib.Run, params, eval_set: str, out_dir: str, threshold: float
            ) -> dict:
  """Routing by class (a segmenter's: by the pixel class of each patch) -> routing.json
  and the PNGs."""
  data = run.entry(f'dataset.{eval_set}')
  spec = data.model
  forward = evaluator.Forward(models.build(spec), outputs='intermediates')
  labels_of = evaluator.labels_of
  if spec.segmenter:
    labels_of = lambda batch: analysis.token_labels(batch['labels'], spec,
                                                    run.loss.ignore_label)
  stats = analysis.collect(forward, params, pipeline.make_eval_iterable(data.config),
                           spec.num_classes, labels_of)
  if not stats:
    raise ValueError('The model has no sparse MoE layer to analyse (dense model or '
                     'Soft MoE).')
  table = spec.encoder.moe.superclasses
  summaries = {k: s.summary(table) for k, s in stats.items()}
  names = class_names(data) if spec.segmenter else None
  report = {'eval_set': eval_set,
            'token_class': ("majority pixel class of the token's patch (class token and "
                            'ignored patches: none)' if spec.segmenter
                            else "the image's label"),
            **({'class_names': list(names)} if names else {}),
            'layers': summaries,
            'recommendation': analysis.recommend(summaries, threshold)}
  files.write_json(os.path.join(out_dir, 'routing.json'), report)
  analysis.plot_layers(summaries, os.path.join(out_dir, 'routing.png'), names)
  analysis.plot_summary(summaries, os.path.join(out_dir, 'routing_summary.png'))
  if table is not None:
    analysis.plot_superclasses(summaries, os.path.join(out_dir, 'routing_superclasses.png'))
  return report


def probe(run: config_lib.Run, params, out_dir: str) -> dict:
  """Few-shot probes of config.fewshot (with_fewshot) -> fewshot.json and .png."""
  train, test = run.entry('fewshot.train'), run.entry('fewshot.test')
  results = fewshot.FewshotEvaluator(
      train.model, run.config.fewshot, pipeline.make_eval_iterable(train.config),
      pipeline.make_eval_iterable(test.config))(params)
  files.write_json(os.path.join(out_dir, 'fewshot.json'), results)
  fewshot.plot(results, os.path.join(out_dir, 'fewshot.png'))
  return results


def predict(run: config_lib.Run, params, eval_set: str, out_dir: str, num: int,
            title: str) -> dict:
  """A segmenter's masks of the first `num` examples -> predictions.png and .json."""
  data = run.entry(f'dataset.{eval_set}')
  forward = evaluator.Forward(models.build(data.model))
  return predictions_lib.write(
      forward, jax.device_put(params, forward.replicated),
      pipeline.make_eval_iterable(data.config), out_dir, num,
      ignore_label=run.loss.ignore_label, class_names=class_names(data), title=title)


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             checkpoint: Optional[str] = None, spec: str = sweep_spec.DEFAULT_SWEEP,
             routing: bool = False, few_shot: bool = False,
             eval_set: Optional[str] = None, output_dir: Optional[str] = None,
             threshold: float = 0.5, predictions: Optional[int] = None) -> str:
  """Checks everything, then writes the sweep / analysis / few-shot / predictions files
  -> out dir. predictions: examples for predictions.png (segmenters only; None:
  DEFAULT_PREDICTIONS for a segmenter, 0 for a classifier)."""
  cli.check_single_process('vmoe.evaluate')
  eval_set = eval_set or next((k for k in config.dataset if k != 'train'), None)
  run, variants = prepare(config, eval_set=eval_set, spec=spec, few_shot=few_shot)
  num = num_predictions(run.model.segmenter, predictions)
  out_dir = output_dir or os.path.join(workdir, 'eval')
  source, params = sources.load_params(checkpoint or workdir)
  models.check_params(params, run.entry(f'dataset.{eval_set}').model, source)
  console.say(f'Evaluating {source} on {eval_set}; writing to {out_dir}.')
  if variants:
    rows = sweep.run(config, params, variants)
    paths = sweep.write(rows, out_dir, title=f'{source}, {eval_set}')
    console.say(f'Sweep of {len(rows)} variants -> {paths["csv"]}, {paths["png"]}')
  if routing:
    report = analyze(run, params, eval_set, out_dir, threshold)
    console.say(f'Routing analysis -> {out_dir}/routing.json: '
                + json.dumps(report['recommendation']))
  if few_shot:
    results = probe(run, params, out_dir)
    console.say(f'Few-shot -> {out_dir}/fewshot.json: '
                + json.dumps(fewshot.scalars(results)))
  if num:
    shown = predict(run, params, eval_set, out_dir, num, title=f'{source}, {eval_set}')
    console.say(f'Predictions of {len(shown["examples"])} examples -> {shown["png"]}, '
                f'{shown["json"]}')
  return out_dir
