"""Config-driven training with periodic evaluation and checkpointing.

  train_and_evaluate(config, workdir):
    run = resolve / with_data / with_inputs   every check, before anything compiles
    program = build(run)                      model, optimizer, shardings, jitted steps
    state = restore_or_create(program, ckpt)  the latest readable checkpoint, else new
    train(program, state, ...)                the loop: steps, reports, checkpoints, evals

Parallelism: the mesh of config.mesh (vmoe.parallel.mesh): every batch split over all
its axes, the experts' weights and their optimizer state over 'expert', other params
replicated (or over 'data' too with config.fsdp); the MoE layers move tokens to their
experts' devices by all-to-all.
"""
import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Mapping, Optional

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import flax.linen as nn
import jax
import ml_collections
import optax
from vmoe.checkpoints import initialization
from vmoe.checkpoints import training as checkpoints
from vmoe.data import pipeline
from vmoe.nn import models
from vmoe.parallel import mesh as mesh_lib
from vmoe.train import config as config_lib
from vmoe.train import evaluator
from vmoe.train import fewshot
from vmoe.train import monitors
from vmoe.train import optimizers
from vmoe.train import preemption
from vmoe.train import step as step_lib
from vmoe.train import train_state as train_state_lib
from vmoe.utils import console
from vmoe.utils import files

P = jax.sharding.PartitionSpec
TrainState = train_state_lib.TrainState
# Keys of an evaluation's metrics that are counts, not scalars for TensorBoard.
COUNTS = ('num_examples', 'num_pixels')


@dataclasses.dataclass(frozen=True)
class Parts:
  """What a run trains, from its resolved Run alone (no device is touched): the planner
  (vmoe.plan) reads the abstract state for a mesh of its own."""
  run: config_lib.Run
  model: nn.Module  # The train model, without sharding annotations.
  tx: optax.GradientTransformation
  schedule: Callable[[Any], Any]
  init_fn: Callable[[], TrainState]  # A new state (params from the 'params' stream).
  abstract_state: TrainState  # Its jax.ShapeDtypeStructs.


def parts(run: config_lib.Run) -> Parts:
  """The model, optimizer and state of a run resolved with_inputs."""
  train = run.entry('dataset.train')
  model = models.build(train.model)
  moe = run.model.encoder.moe
  tx, schedule = optimizers.create_optimizer(
      **run.optimizer, total_steps=run.train_steps,
      balance_biases=bool(moe and run.model.encoder.moe_layers and moe.bias_balancing))
  init_fn = train_state_lib.make_init_fn(
      model, tx, image_shape=(train.images_per_device,) + train.image_shape, seed=run.seed)
  return Parts(run, model, tx, schedule, init_fn, jax.eval_shape(init_fn))


@dataclasses.dataclass(frozen=True)
class Program:
  """Parts placed on a device mesh, with the jitted train step and one eval step per eval
  split (splits whose models agree share one)."""
  parts: Parts
  mesh: jax.sharding.Mesh
  state_sharding: TrainState  # Of NamedShardings.
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable[[TrainState, Any], tuple[TrainState, Any]]
  eval_steps: dict[str, Callable[[Any, Any], Any]]

  @property
  def run(self) -> config_lib.Run:
    return self.parts.run


def build(run: config_lib.Run, mesh: Optional[jax.sharding.Mesh] = None) -> Program:
  """The program of a run resolved with_inputs, on `mesh` (default: config.mesh)."""
  p = parts(run)
  mesh = mesh or mesh_lib.make_mesh(run.mesh)
  replicated = jax.sharding.NamedSharding(mesh, P())
  batch_sharding = jax.sharding.NamedSharding(mesh, mesh_lib.batch_spec(mesh))
  state_sharding = mesh_lib.state_sharding(mesh, p.abstract_state,
                                           fsdp=run.get('fsdp', False))
  # Params do not depend on the mesh: init_fn uses the model without it.
  moe_sharding = mesh_lib.moe_sharding(mesh)
  train_step = jax.jit(
      step_lib.make_train_step(
          p.model.clone(moe_sharding=moe_sharding), p.tx, p.schedule, run.loss,
          seed=run.seed, rng_names=run.rng_names, mixup_config=run.mixup,
          num_shards=mesh.size),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  steps = {}
  for d in run.evals:
    if d.model not in steps:
      steps[d.model] = evaluator.make_eval_step(
          models.build(d.model, moe_sharding), run.loss,
          params_sharding=state_sharding.params, batch_sharding=batch_sharding,
          routing_stats=True)
  return Program(p, mesh, state_sharding, batch_sharding, train_step,
                 {d.name: steps[d.model] for d in run.evals})


class Inputs:
  """The run's data: the train batches from `start` on (batch t is read at step t + 1),
  and an eval iterable per eval split and few-shot set."""

  def __init__(self, run: config_lib.Run, start: int):
    self.run, self.start = run, start
    self._train = pipeline.make_train_iterator(run.entry('dataset.train').config,
                                               seed=run.seed, start_batch=start)
    self._first = next(self._train)
    self.evals = {d.name: pipeline.make_eval_iterable(d.config) for d in run.data
                  if d.name != 'dataset.train'}

  def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
    """Of one process-local batch of every dataset, for config.with_inputs."""
    return {'dataset.train': {k: v.shape for k, v in self._first.items()},
            **{name: it.shapes() for name, it in self.evals.items()}}

  def train_batches(self, sharding) -> Iterator[dict[str, jax.Array]]:
    """Global train batches, dataset.train.prefetch_device of them on the devices ahead."""
    def local():
      yield self._first
      yield from self._train
    ahead = self.run.get('dataset.train.prefetch_device')
    return mesh_lib.device_batches(local(), sharding, prefetch=1 if ahead is None else ahead)


def restore_or_create(program: Program, ckpt: checkpoints.TrainCheckpointer) -> TrainState:
  """The state of the latest readable checkpoint; else a new one, with the params of
  config.initialization if set (checked before anything compiles). A resumed run ignores
  config.initialization: its own checkpoint wins."""
  run, p = program.run, program.parts
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          p.abstract_state, program.state_sharding)
  restored = ckpt.restore_latest(abstract)
  init = run.get('initialization')
  if restored is not None:
    console.say(f'Resuming from the checkpoint of step {restored[0]}'
                + ('; config.initialization is not used.' if init else '.'))
    return restored[1]
  if init:
    initialization.plan(abstract.params, init.to_dict())
  state = jax.jit(p.init_fn, out_shardings=program.state_sharding)()
  if init:
    params, report = initialization.initialize(abstract.params, state.params, init.to_dict())
    # Its summary; the whole report (every param) is in the log.
    console.say(initialization.format_report(report).splitlines()[0])
    # Optimizer state for these params (its shape may depend on their values).
    opt_state = jax.jit(p.tx.init, out_shardings=program.state_sharding.opt_state)(params)
    state = state.replace(params=params, opt_state=opt_state)
  return state


class Evaluations:
  """The run's evaluations: every eval split (evaluator.evaluate: a classifier's prec@1,
  a segmenter's mIoU, per-class IoU and pixel accuracies; the loss; dropped tokens) and
  the few-shot probes; each writes its scalars and prints one line."""

  def __init__(self, program: Program, inputs: Inputs, writer, timed):
    run = program.run
    self._program, self._inputs, self._writer, self._timed = program, inputs, writer, timed
    self._fewshot = None
    if run.get('fewshot'):
      train, test = run.entry('fewshot.train'), run.entry('fewshot.test')
      self._fewshot = fewshot.FewshotEvaluator(
          train.model, run.config.fewshot, inputs.evals[train.name], inputs.evals[test.name])

  def splits(self, step: int, params) -> dict[str, dict[str, float]]:
    results = {}
    for d in self._program.run.evals:
      iterable, name = self._inputs.evals[d.name], d.name.split('.', 1)[1]
      with self._timed(f'eval_{name}'):
        results[name] = evaluator.evaluate(
            self._program.eval_steps[d.name], params,
            (mesh_lib.global_batch(b, self._program.batch_sharding) for b in iterable),
            num_examples=iterable.num_examples)
      console.say(f'Step {step}, {name}: {evaluator.summary(results[name])}')
    self._writer.write_scalars(step, {f'{name}/{k}': v for name, r in results.items()
                                      for k, v in r.items() if k not in COUNTS})
    return results

  def fewshot(self, step: int, params) -> Optional[dict[str, float]]:
    if self._fewshot is None:
      return None
    with self._timed('fewshot'):
      scalars = fewshot.scalars(self._fewshot(params))
    console.say(f'Step {step}, few-shot: '
                + ' '.join(f'{k.split("/")[-1]}={v:.4f}' for k, v in scalars.items()))
    self._writer.write_scalars(step, scalars)
    return scalars


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains (resuming from WORKDIR/checkpoints if any) and evaluates.

  Everything is checked before anything compiles: the config, the workdir, the datasets'
  metadata, then the shapes of the first batches.

  Returns the final eval metrics {split: evaluator.evaluate's dict} ({'prec@1', 'loss',
  'ece', 'num_examples', ...}; a segmenter's {'miou', 'pixel_accuracy', ...}), or None if
  SIGTERM stopped the run (after saving a checkpoint). Raises NonFiniteError if a step is
  not finite and config.nonfinite is 'stop'.
  """
  run = config_lib.resolve(config, num_devices=jax.device_count(),
                           num_processes=jax.process_count())
  config_lib.log_inert_options(run)
  ckpt = checkpoints.TrainCheckpointer(  # Fails here if WORKDIR is not writable.
      workdir, every_steps=run.get('save_checkpoint.every_steps'),
      keep_last=run.get('save_checkpoint.keep_last', 1),
      keep_every=run.get('save_checkpoint.keep_every'), seed=run.seed)
  run = config_lib.with_data(run)
  inputs = Inputs(run, start=ckpt.latest_step() or 0)
  run = config_lib.with_inputs(run, inputs.shapes())
  program = build(run)
  state = restore_or_create(program, ckpt)
  if int(state.step) != inputs.start:  # The latest checkpoint was unreadable.
    inputs = Inputs(run, start=int(state.step))
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'config.json'),
                     json.loads(ml_collections.ConfigDict(config).to_json_best_effort()),
                     indent=2, sort_keys=True)
  # 'global': statistics computed on the devices, as params may span processes.
  parameter_overview.log_parameter_overview(state.params, include_stats='global')
  return train(program, state, ckpt, inputs, workdir)


def train(program: Program, state: TrainState, ckpt: checkpoints.TrainCheckpointer,
          inputs: Inputs, workdir: str):
  """Runs the steps of `program` from `state` to run.train_steps (see
  train_and_evaluate)."""
  run, init_step = program.run, int(state.step)
  steps = run.train_steps
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  report = periodic_actions.ReportProgress(
      num_train_steps=steps, writer=writer,
      every_steps=run.get('report_progress.every_steps'),
      every_secs=run.get('report_progress.every_secs'))
  evals = Evaluations(program, inputs, writer, report.timed)
  guard = monitors.NonfiniteGuard(run.nonfinite, ckpt, writer.close)
  window, timer = monitors.MetricsWindow(), monitors.StepTimer()
  progress = console.Progress(steps, initial=init_step)
  console.say(f'Training {_summary(program, state)} for {steps} steps '
              f'(from step {init_step}).')
  batches = inputs.train_batches(program.batch_sharding)
  periodic = lambda every, step: bool(every) and step % every == 0 and step != steps
  metrics, means = None, {}
  with jax.set_mesh(program.mesh), preemption.SigtermFlag() as sigterm:
    for step in range(init_step + 1, steps + 1):
      state, metrics = program.train_step(state, next(batches))
      timer.step_done(step - init_step, metrics)
      window.add(metrics)
      guard.add(step, metrics)
      progress.advance()
      if report(step):
        means = window.pop(last=metrics)
        writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
        progress.report(loss=means['loss'])
        guard.check(step)
      if ckpt.should_save(step) or step == steps:
        guard.check(step)
        with report.timed('checkpoint'), timer.excluded():
          ckpt.save(step, state)
      if periodic(run.get('evaluate.every_steps'), step):
        with timer.excluded():
          evals.splits(step, state.params)
      if periodic(run.get('fewshot.every_steps'), step):
        with timer.excluded():
          evals.fewshot(step, state.params)
      if sigterm.is_set():
        guard.check(step)
        ckpt.save(step, state)
        ckpt.close()
        writer.close()
        progress.close()
        logging.warning('Stopped by SIGTERM at step %d; checkpoint saved.', step)
        return None
    progress.close()
    if window:  # E.g. a resumed run of a single step never triggers a report.
      means = window.pop(last=metrics)
      writer.write_scalars(steps, {f'train/{k}': v for k, v in means.items()})
    seconds_per_step = timer.seconds_per_step(state)
    results = evals.splits(steps, state.params)
    few = evals.fewshot(steps, state.params)
  ckpt.close()
  writer.close()
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  # 'train': the train metrics of the last report window (e.g. the experts' loads).
  report_final(workdir, steps, results, num_params=num_params,
               train_seconds_per_step=seconds_per_step, train=means,
               **({'fewshot': few} if few is not None else {}))
  return results


def _summary(program: Program, state: TrainState) -> str:
  """E.g. 'VisionTransformerMoe (369,610 params, 2 MoE layers of 8 experts)'."""
  spec = program.run.model
  n = sum(x.size for x in jax.tree.leaves(state.params))
  moe = spec.encoder.moe
  layers = len(spec.encoder.moe_layers)
  what = (f', {layers} MoE layer{"s" * (layers > 1)} of {moe.num_experts} experts, '
          f'{moe.router}' if moe else '')
  return f'{spec.name} ({n:,} params{what})'


def report_final(workdir: str, step: int, results: Mapping[str, Any], **info):
  """Prints one line per eval split (and for E3 one of its members) and writes
  WORKDIR/final_metrics.json: {split: evaluator.evaluate's dict ({'prec@1', 'loss',
  'ece', 'num_examples', E3: 'member_{m}/...'}, a segmenter's {'miou', 'iou/{c}', ...}),
  'step': ..., **info} (info: num_params, train_seconds_per_step, train: the last
  report's train metrics, fewshot)."""
  for name, r in results.items():
    console.say(f'Final {name}: {evaluator.summary(r)} '
                f'({r["num_examples"]} examples, step {step})')
    members = sorted(k.split('/')[0] for k in r if k.endswith('/prec@1'))
    if members:  # E3: the ensemble against its members.
      console.say(f'Final {name}, E3: ECE={r["ece"]:.4f}; members: ' + ', '.join(
          f'prec@1={r[f"{m}/prec@1"]:.4f} loss={r[f"{m}/loss"]:.4f} ECE={r[f"{m}/ece"]:.4f}'
          for m in members))
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'final_metrics.json'),
                     {**results, 'step': step, **info}, indent=2, sort_keys=True)
