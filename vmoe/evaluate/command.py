"""The work of `python -m vmoe.evaluate` (see vmoe/evaluate/__main__.py), callable
without flags."""
import json
import os
from typing import Optional

from absl import logging
import jax
import ml_collections

from vmoe.data import pipeline
from vmoe.evaluate import analysis
from vmoe.evaluate import fewshot
from vmoe.evaluate import runner
from vmoe.evaluate import sweep
from vmoe.evaluate import sweep_spec
from vmoe.nn import models
from vmoe.nn.routers import per_image
from vmoe.train import config_checks


def default_fewshot_config(config, eval_set: str) -> ml_collections.ConfigDict:
  """Shots from the train split, preprocessed like the eval set, scored on the eval set."""
  test = config.dataset[eval_set]
  train = ml_collections.ConfigDict(test.to_dict())
  train.split = config.dataset.train.split
  return ml_collections.ConfigDict(dict(train=train, test=test))


def check(config, eval_set: str, spec: str) -> list:
  """Everything the flags say, checked before any data is read or anything compiles."""
  config_checks.check_config(config, num_devices=jax.device_count(),
                             num_processes=jax.process_count())
  evals = [k for k in config.dataset if k != 'train']
  if eval_set not in evals:
    raise ValueError(f'--eval_set={eval_set!r} is not an eval set of the config; '
                     f'valid: {evals}.')
  variants = sweep_spec.parse(spec, config) if spec else []
  sweep.check_variants(config, variants, eval_set)
  return variants


def analyze(config, params, eval_set: str, out_dir: str, threshold: float) -> dict:
  model_config = models.validate(config_checks.eval_model_config(config.to_dict()))
  forward = runner.Forward(models.build_model(model_config), outputs='intermediates')
  stats = analysis.collect(forward, params, pipeline.make_eval_iterable(
      config.dataset[eval_set]), model_config['num_classes'])
  if not stats:
    raise ValueError('The model has no sparse MoE layer to analyse (dense model or '
                     'Soft MoE).')
  router = model_config['encoder']['moe']['router']
  table = None
  if router.get('superclasses') is not None:
    table = per_image.load_superclasses(router['superclasses'],
                                        model_config['num_classes'],
                                        model_config['encoder']['moe']['num_experts'])
  summaries = {k: s.summary(table) for k, s in stats.items()}
  report = {'eval_set': eval_set, 'layers': summaries,
            'recommendation': analysis.recommend(summaries, threshold)}
  analysis.write_json(os.path.join(out_dir, 'routing.json'), report)
  analysis.plot_layers(summaries, os.path.join(out_dir, 'routing.png'))
  analysis.plot_summary(summaries, os.path.join(out_dir, 'routing_summary.png'))
  if table is not None:
    analysis.plot_superclasses(summaries, os.path.join(out_dir, 'routing_superclasses.png'))
  return report


def evaluate(config, workdir: str, *, checkpoint: Optional[str] = None,
             spec: str = sweep_spec.DEFAULT_SWEEP, routing: bool = False,
             few_shot: bool = False, eval_set: Optional[str] = None,
             output_dir: Optional[str] = None, threshold: float = 0.5) -> str:
  """Checks everything, then writes the sweep / analysis / few-shot files -> out dir."""
  eval_set = eval_set or next((k for k in config.dataset if k != 'train'), None)
  variants = check(config, eval_set, spec)
  runner.check_single_process('vmoe.evaluate')
  out_dir = output_dir or os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  source, params = runner.restore_params(workdir, checkpoint)
  logging.info('Evaluating %s', source)
  if variants:
    rows = sweep.run(config, params, variants, eval_set=eval_set)
    paths = sweep.write(rows, out_dir, title=f'{source}, {eval_set}')
    print(sweep.table(rows), flush=True)
    print(f'Sweep of {len(rows)} variants -> {paths["csv"]}, {paths["png"]}', flush=True)
  if routing:
    report = analyze(config, params, eval_set, out_dir, threshold)
    print(json.dumps(report['recommendation']), flush=True)
  if few_shot:
    cfg = config.get('fewshot') or default_fewshot_config(config, eval_set)
    model_config = config_checks.eval_model_config(config.to_dict())
    results = fewshot.FewshotEvaluator(model_config, cfg.to_dict())(params)
    analysis.write_json(os.path.join(out_dir, 'fewshot.json'), results)
    fewshot.plot(results, os.path.join(out_dir, 'fewshot.png'))
    print(json.dumps(fewshot.scalars(results)), flush=True)
  return out_dir
