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
from vmoe.evaluate import sweep
from vmoe.evaluate import sweep_spec
from vmoe.nn import models
from vmoe.train import config as config_lib
from vmoe.train import evaluator
from vmoe.train import fewshot
from vmoe.utils import console
from vmoe.utils import files


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


def analyze(run: config_lib.Run, params, eval_set: str, out_dir: str, threshold: float
            ) -> dict:
  data = run.entry(f'dataset.{eval_set}')
  forward = evaluator.Forward(models.build(data.model), outputs='intermediates')
  stats = analysis.collect(forward, params, pipeline.make_eval_iterable(data.config),
                           data.model.num_classes)
  if not stats:
    raise ValueError('The model has no sparse MoE layer to analyse (dense model or '
                     'Soft MoE).')
  table = data.model.encoder.moe.superclasses
  summaries = {k: s.summary(table) for k, s in stats.items()}
  report = {'eval_set': eval_set, 'layers': summaries,
            'recommendation': analysis.recommend(summaries, threshold)}
  files.write_json(os.path.join(out_dir, 'routing.json'), report)
  analysis.plot_layers(summaries, os.path.join(out_dir, 'routing.png'))
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


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             checkpoint: Optional[str] = None, spec: str = sweep_spec.DEFAULT_SWEEP,
             routing: bool = False, few_shot: bool = False,
             eval_set: Optional[str] = None, output_dir: Optional[str] = None,
             threshold: float = 0.5) -> str:
  """Checks everything, then writes the sweep / analysis / few-shot files -> out dir."""
  cli.check_single_process('vmoe.evaluate')
  eval_set = eval_set or next((k for k in config.dataset if k != 'train'), None)
  run, variants = prepare(config, eval_set=eval_set, spec=spec, few_shot=few_shot)
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
  return out_dir
