"""Config-driven training with periodic evaluation and checkpointing.

Parallelism: the mesh of config.mesh (vmoe.parallel.mesh): every batch split
over all its axes, the experts' weights and their optimizer state over 'expert',
other params replicated (or over 'data' too with config.fsdp); the MoE layers
move tokens to their experts' devices by all-to-all.
"""
import contextlib
import json
import math
import os
import time
from typing import Any, Mapping

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import optax
from vmoe.checkpoints import initialization
from vmoe.checkpoints import training as checkpoints
from vmoe.data import pipeline
from vmoe.evaluate import fewshot
from vmoe.nn import models
from vmoe.parallel import mesh as mesh_lib
from vmoe.train import config_checks
from vmoe.train import evaluator
from vmoe.train import losses
from vmoe.train import mixup as mixup_lib
from vmoe.train import optimizers
from vmoe.train import preemption
from vmoe.train import train_state as train_state_lib

P = jax.sharding.PartitionSpec
TrainState = train_state_lib.TrainState


def get_train_steps(config, num_train_examples: int) -> int:
  if config.get('train_steps') is not None:
    return config.train_steps
  batch_size = config.dataset.train.batch_size
  return math.ceil(config.train_epochs * num_train_examples / batch_size)


def summarize_metrics(metrics: Mapping[str, Any], prefix: str = '') -> dict:
  """Nested model metrics -> scalars {'encoderblock_1/importance_loss': ...}.

  A [G] metric (one value per group) gives its mean. A [G, E] one (e.g.
  expert_load) gives the max over experts of its mean over groups
  ('..._max'), since its mean over experts is a constant 1/E.
  """
  out = {}
  for k, v in metrics.items():
    if isinstance(v, Mapping):
      out.update(summarize_metrics(v, f'{prefix}{k}/'))
    elif jnp.ndim(v) > 1:
      out[f'{prefix}{k}_max'] = jnp.max(jnp.mean(v, axis=0))
    else:
      out[f'{prefix}{k}'] = jnp.mean(v)
  return out


def make_train_step(model, tx: optax.GradientTransformation, schedule, loss_fn,
                    *, seed: int, rng_names, mixup_config, num_shards: int):
  """Returns train_step(state, batch) -> (state, metrics: {name: []})."""
  def train_step(state: TrainState, batch):
    rngs = train_state_lib.rng_streams(seed, state.step,
                                       tuple(rng_names) + ('mixup',))
    mixup_rng = rngs.pop('mixup')
    images, labels = batch['image'], batch['labels']
    if mixup_config:
      images, labels = mixup_lib.mixup(mixup_rng, images, labels,
                                       num_shards=num_shards, **mixup_config)

    def loss_and_metrics(params):
      # Class ids, for routers that learn from them (super-class guided
      # routing); with mixup, the class of the dominant example.
      logits, metrics = model.apply({'params': params}, images, train=True,
                                    labels=jnp.argmax(labels, axis=-1), rngs=rngs)
      main_loss = jnp.mean(loss_fn(logits, labels))
      auxiliary_loss = jnp.mean(metrics['auxiliary_loss'])
      metrics = summarize_metrics(metrics)
      metrics.update(
          main_loss=main_loss, auxiliary_loss=auxiliary_loss,
          loss=main_loss + auxiliary_loss,
          **{'prec@1': jnp.mean(losses.precision_at_1(logits, labels))})
      return main_loss + auxiliary_loss, metrics

    grads, metrics = jax.grad(loss_and_metrics, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    # A step with a NaN/Inf loss or gradient norm, or whose update would make
    # the state non-finite, is not applied: the state stays finite, so no
    # checkpoint can hold NaNs. The step counter (hence the data and random
    # numbers) advances anyway, so that a restart stays deterministic.
    ok = (jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
          & all_finite((params, opt_state)))
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                     (params, opt_state),
                                     (state.params, state.opt_state))
    metrics['grad_norm'] = grad_norm
    metrics['nonfinite_steps'] = 1.0 - ok.astype(jnp.float32)
    metrics['learning_rate'] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params,
                      opt_state=opt_state), metrics
  return train_step


def all_finite(tree) -> jax.Array:
  """[] bool: no float leaf of `tree` holds a NaN or Inf."""
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.inexact)] or [True]))


class MetricsWindow:
  """Averages the train metrics of the steps since the last report (counts
  such as 'nonfinite_steps' are summed instead).

  Sums stay on the device, so that no step waits for the previous one.
  """
  COUNTS = ('nonfinite_steps',)

  def __init__(self):
    self._sums, self._n = None, 0
    self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

  def add(self, metrics):
    self._sums = metrics if self._sums is None else self._add(self._sums, metrics)
    self._n += 1

  def __bool__(self) -> bool:
    return self._n > 0

  def pop(self, *, last: Mapping[str, Any]) -> dict[str, float]:
    means = {k: float(v) / (1 if k in self.COUNTS else self._n)
             for k, v in jax.device_get(self._sums).items()}
    means['learning_rate'] = float(last['learning_rate'])  # Not an average.
    self._sums, self._n = None, 0
    return means


def write_json_atomically(path: str, obj):
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class NonFiniteError(FloatingPointError):
  """A train step was not finite and config.nonfinite is 'stop'."""


class NonfiniteGuard:
  """Finds the steps whose update was not applied (a NaN/Inf loss, gradient
  norm or updated state) and acts on config.nonfinite: 'stop' raises
  NonFiniteError, 'skip' logs them.

  The first such step and their count stay on the device; `check` reads them,
  at progress reports and before checkpoint saves only, so that training
  never waits for the host in between.
  """

  def __init__(self, mode: str, ckpt: checkpoints.TrainCheckpointer, on_stop):
    self._stop, self._ckpt, self._on_stop = mode == 'stop', ckpt, on_stop
    self._first_and_count = jnp.zeros((2,), jnp.int32)
    self._logged = 0
    self._update = jax.jit(lambda fc, bad, step: jnp.stack([
        jnp.where((fc[0] == 0) & (bad > 0), step, fc[0]), fc[1] + (bad > 0)]))

  def add(self, step: int, metrics):
    self._first_and_count = self._update(self._first_and_count,
                                         metrics['nonfinite_steps'], step)

  def check(self, step: int):
    first, count = (int(x) for x in jax.device_get(self._first_and_count))
    if not count or count == self._logged:
      return
    if not self._stop:
      logging.warning('Step %d: %d step(s) of this run skipped for a NaN/Inf loss, '
                      'gradient norm or update, the first at step %d '
                      '(config.nonfinite="skip").', step, count, first)
      self._logged = count
      return
    self._ckpt.wait()
    good = self._ckpt.latest_step()
    self._ckpt.close()
    self._on_stop()
    raise NonFiniteError(
        f'Training stopped: step {first} gave a NaN or Inf loss, gradient norm '
        f'or update, so its update was not applied (config.nonfinite="stop"; '
        f'{count} such step(s) up to step {step}). '
        + (f'The last good checkpoint is step {good}: '
           f'{os.path.join(self._ckpt.directory, str(good))}; a restart resumes '
           'from it (and fails again with the same config). ' if good else
           'No checkpoint was saved before it. ')
        + 'Lower the learning rate (config.optimizer.learning_rate), clip the '
        'gradients (config.optimizer.gradient_clip.global_norm), or set '
        'config.nonfinite="skip" to skip such steps.')


def first_batch_shapes(iterable) -> dict[str, tuple[int, ...]]:
  return {k: v.shape for k, v in next(iter(iterable)).items()}


def restore_or_create_state(ckpt, init_fn, state_sharding, *, tx,
                            config) -> TrainState:
  """The state of the latest readable checkpoint; else a new one, with the
  params of config.initialization if set (checked before anything compiles).
  A resumed run ignores config.initialization: its own checkpoint wins."""
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(init_fn), state_sharding)
  restored = ckpt.restore_latest(abstract)
  if restored is not None:
    logging.info('Resuming from the checkpoint of step %d%s.', restored[0],
                 '; config.initialization is not used' if config.get(
                     'initialization') else '')
    return restored[1]
  config_checks.check_initialization(config, abstract.params)
  state = jax.jit(init_fn, out_shardings=state_sharding)()
  if config.get('initialization'):
    params, _ = initialization.initialize(abstract.params, state.params,
                                          config.initialization)
    # Optimizer state for these params (its shape may depend on their values).
    opt_state = jax.jit(tx.init, out_shardings=state_sharding.opt_state)(params)
    state = state.replace(params=params, opt_state=opt_state)
  return state


def report_final(workdir: str, step: int, results: Mapping[str, Any], **info):
  """Prints one line per eval split and writes WORKDIR/final_metrics.json:
  {split: {'prec@1', 'loss', 'num_examples'}, 'step': ..., **info}."""
  for name, r in results.items():
    line = (f'Final {name}: prec@1={r["prec@1"]:.4f} loss={r["loss"]:.4f} '
            f'({r["num_examples"]} examples, step {step})')
    print(line, flush=True)
    logging.info(line)
  if jax.process_index() == 0:
    write_json_atomically(os.path.join(workdir, 'final_metrics.json'),
                          {**results, 'step': step, **info})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains (resuming from WORKDIR/checkpoints if any) and evaluates.

  Everything is checked before anything compiles: the config, the workdir,
  the datasets' metadata, then the shapes of the first batches.

  Returns the final eval metrics {split: {'prec@1', 'loss', 'num_examples'}},
  or None if SIGTERM stopped the run (after saving a checkpoint). Raises
  NonFiniteError if a step is not finite and config.nonfinite is 'stop'.
  """
  config_checks.check_config(config, num_devices=jax.device_count(),
                             num_processes=jax.process_count())
  ckpt = checkpoints.TrainCheckpointer(  # Fails here if WORKDIR is not writable.
      workdir, every_steps=config.get('save_checkpoint', {}).get('every_steps'),
      keep_last=config.get('save_checkpoint', {}).get('keep_last', 1),
      keep_every=config.get('save_checkpoint', {}).get('keep_every'),
      seed=config.get('seed', 0))
  config_checks.check_data(config, num_processes=jax.process_count())
  mesh = mesh_lib.make_mesh(config.get('mesh'))
  replicated = jax.sharding.NamedSharding(mesh, P())
  batch_sharding = jax.sharding.NamedSharding(mesh, mesh_lib.batch_spec(mesh))
  seed = config.get('seed', 0)
  train_cfg = config.dataset.train
  num_train_examples, _ = pipeline.get_dataset_info(train_cfg)
  train_steps = get_train_steps(config, num_train_examples)
  eval_model_config = config_checks.eval_model_config(config.to_dict())
  model = models.build_model(config.model)
  eval_model = models.build_model(eval_model_config)
  # config.initialization.freeze joins the optimizer's frozen params.
  tx, schedule = optimizers.create_optimizer(
      **initialization.optimizer_config(config.to_dict()), total_steps=train_steps)
  loss_fn = losses.LOSSES[config.loss.name]

  # The data position is the step: a resumed run reads the batches an
  # uninterrupted run would read next.
  init_step = ckpt.latest_step() or 0
  train_iter = pipeline.make_train_iterator(train_cfg, seed=seed,
                                            start_batch=init_step)
  eval_sets = {name: pipeline.make_eval_iterable(cfg)
               for name, cfg in config.dataset.items() if name != 'train'}
  fewshot_eval = (fewshot.FewshotEvaluator(eval_model_config, config.fewshot.to_dict())
                  if config.get('fewshot') else None)
  fewshot_every = (config.get('fewshot') or {}).get('every_steps')
  first = next(train_iter)
  shapes = {'dataset.train': first_batch_shapes([first]),
            **{f'dataset.{name}': first_batch_shapes(iterable)
               for name, iterable in eval_sets.items()}}
  if fewshot_eval:
    shapes['fewshot.train'] = first_batch_shapes(fewshot_eval.train)
    shapes['fewshot.test'] = first_batch_shapes(fewshot_eval.test)
  config_checks.check_inputs(config, shapes, num_devices=jax.device_count())
  per_device_batch = train_cfg.batch_size // jax.device_count()
  init_fn = train_state_lib.make_init_fn(
      model, tx, image_shape=(per_device_batch,) + first['image'].shape[1:],
      seed=seed)
  state_sharding = mesh_lib.state_sharding(mesh, jax.eval_shape(init_fn),
                                           fsdp=config.get('fsdp', False))
  state = restore_or_create_state(ckpt, init_fn, state_sharding, tx=tx,
                                  config=config)
  if int(state.step) != init_step:  # The latest checkpoint was unreadable.
    init_step = int(state.step)
    train_iter = pipeline.make_train_iterator(train_cfg, seed=seed,
                                              start_batch=init_step)
    first = next(train_iter)
  # 'global': statistics computed on the devices, as params may span processes.
  parameter_overview.log_parameter_overview(state.params, include_stats='global')

  # Params do not depend on the mesh: init_fn uses the model without it.
  moe_sharding = mesh_lib.moe_sharding(mesh)
  train_step = jax.jit(
      make_train_step(model.clone(moe_sharding=moe_sharding), tx, schedule,
                      loss_fn, seed=seed,
                      rng_names=config.get('extra_rng_keys', ()),
                      mixup_config=(config.mixup.to_dict()
                                    if config.get('mixup') else None),
                      num_shards=jax.device_count()),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,))
  eval_step = evaluator.make_eval_step(
      eval_model.clone(moe_sharding=moe_sharding), loss_fn,
      params_sharding=state_sharding.params,
      batch_sharding=batch_sharding, routing_stats=True)

  def run_fewshot(step: int) -> dict[str, float]:
    with progress.timed('fewshot'):
      scalars = fewshot.scalars(fewshot_eval(state.params))
    logging.info('Step %d, few-shot: %s', step, scalars)
    writer.write_scalars(step, scalars)
    return scalars

  def run_evaluation(step: int) -> dict[str, dict[str, float]]:
    results = {}
    for name, iterable in eval_sets.items():
      with progress.timed(f'eval_{name}'):
        results[name] = evaluator.evaluate(
            eval_step, state.params,
            (mesh_lib.global_batch(b, batch_sharding) for b in iterable),
            num_examples=iterable.num_examples)
      logging.info('Step %d, %s: prec@1=%.4f loss=%.4f', step, name,
                   results[name]['prec@1'], results[name]['loss'])
    writer.write_scalars(step, {f'{name}/{k}': v for name, r in results.items()
                                for k, v in r.items() if k != 'num_examples'})
    return results

  if jax.process_index() == 0:
    write_json_atomically(os.path.join(workdir, 'config.json'),
                          json.loads(config.to_json_best_effort()))
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  guard = NonfiniteGuard(config.get('nonfinite', 'stop'), ckpt, writer.close)
  report = config.get('report_progress', {})
  progress = periodic_actions.ReportProgress(
      num_train_steps=train_steps, writer=writer,
      every_steps=report.get('every_steps'), every_secs=report.get('every_secs'))
  eval_every = config.get('evaluate', {}).get('every_steps')
  window = MetricsWindow()
  batches = _chain([first], train_iter)
  timer = StepTimer()
  with jax.set_mesh(mesh), preemption.SigtermFlag() as sigterm:
    for step in range(init_step + 1, train_steps + 1):
      state, metrics = train_step(state, mesh_lib.global_batch(next(batches),
                                                      batch_sharding))
      timer.step_done(step - init_step, metrics)
      window.add(metrics)
      guard.add(step, metrics)
      if progress(step):
        writer.write_scalars(step, {f'train/{k}': v for k, v in
                                    window.pop(last=metrics).items()})
        guard.check(step)
      if ckpt.should_save(step) or step == train_steps:
        guard.check(step)
        with progress.timed('checkpoint'), timer.excluded():
          ckpt.save(step, state)
      if eval_every and step % eval_every == 0 and step != train_steps:
        with timer.excluded():
          run_evaluation(step)
      if fewshot_every and step % fewshot_every == 0 and step != train_steps:
        with timer.excluded():
          run_fewshot(step)
      if sigterm.is_set():
        guard.check(step)
        ckpt.save(step, state)
        ckpt.close()
        writer.close()
        logging.warning('Stopped by SIGTERM at step %d; checkpoint saved.', step)
        return None
    if window:  # E.g. a resumed run of a single step never triggers progress.
      writer.write_scalars(train_steps, {f'train/{k}': v for k, v in
                                         window.pop(last=metrics).items()})
    seconds_per_step = timer.seconds_per_step(state)
    results = run_evaluation(train_steps)
    extra = {'fewshot': run_fewshot(train_steps)} if fewshot_eval else {}
  ckpt.close()
  writer.close()
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  report_final(workdir, train_steps, results, num_params=num_params,
               train_seconds_per_step=seconds_per_step, **extra)
  return results


class StepTimer:
  """Seconds per train step of this run, without the first step (compilation)
  and without the time spent checkpointing and evaluating."""

  def __init__(self):
    self._start, self._steps, self._excluded = None, 0, 0.0

  def step_done(self, steps_this_run: int, metrics):
    if steps_this_run == 1:
      jax.block_until_ready(metrics)
      self._start = time.perf_counter()
    self._steps = steps_this_run

  @contextlib.contextmanager
  def excluded(self):
    t = time.perf_counter()
    yield
    self._excluded += time.perf_counter() - t

  def seconds_per_step(self, state) -> float | None:
    if self._steps < 2:
      return None
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - self._start - self._excluded
    logging.info('Trained %d steps at %.1f ms per step.', self._steps,
                 1e3 * elapsed / (self._steps - 1))
    return elapsed / (self._steps - 1)


def _chain(*iterables):
  for it in iterables:
    yield from it
