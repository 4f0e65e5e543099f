"""The trainer: sharded state, one jitted train step for every objective, the loop.

The model, the objective and the evaluators are picked by name from the config; this
file never knows which ones run. State is a plain dict {step, params, opt_state, rng}
(and `objective`, the objective's state, when a term keeps one) created already sharded
on the mesh, updated in place (donated) by the train step, and checkpointed
asynchronously together with the data-iterator position.
"""
import functools
import json
import os
import time

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from hvla import checkpointing
from hvla import config as config_lib
from hvla import evaluators
from hvla import grad_cache
from hvla import losses
from hvla import metrics as metrics_lib
from hvla import models
from hvla import optim
from hvla import sharding
from hvla.data import pipeline


# ----------------------------------------------------------------------------------------
# Setup shared by training, evaluation and the benchmark.
# ----------------------------------------------------------------------------------------
class Setup:
  """Everything a run derives from its config: mesh, model, objective, optimizer, state."""

  def __init__(self, config, *, examples_per_epoch=None, devices=None):
    config_lib.validate(config)
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh, devices)
    batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if config.batch_size % batch_shards:
      raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                       f"{batch_shards} batch shards of the mesh {dict(self.mesh.shape)}.")
    self.rules = sharding.rules(config)
    self.model = models.get_model(config.model)
    self.objective = losses.get_objective(config.objective)
    self.objective.attach(self.model)
    self.encoders = self.objective.encoders(self.model)
    self.total_steps = optim.total_steps(config, examples_per_epoch)
    self._examples_per_epoch = examples_per_epoch
    abstract_boxed = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
    params = nn.unbox(abstract_boxed["params"])
    self.bounds = {**models.param_bounds(self.model), **self.objective.param_bounds()}
    optim.check_bounds(params, self.bounds)
    self.tx, self.schedule = optim.make_optimizer(config, params, examples_per_epoch)
    self.state_shardings = self._state_shardings(abstract_boxed, params)

  def _init_boxed(self, rng):
    """Parameters (the towers', then the objective's own) and the objective's state,
    in flax's logical-axis boxes."""
    image_size = self.config.model.image.image_size
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, self.config.model.text.max_len), jnp.int32)
    # The towers take `rng` itself, so that they start the same whatever the objective.
    params = dict(self.model.init({"params": rng}, images, tokens)["params"])
    own = self.objective.init_params(jax.random.fold_in(rng, 1))
    if own:
      params["objective"] = own
    return {"params": params, "objective": self.objective.init_state(params)}

  def _state_shardings(self, abstract_boxed, params):
    boxed_shardings = sharding.logical_shardings(abstract_boxed, self.mesh, self.rules)
    replicated = sharding.replicated(self.mesh)
    opt_shardings = sharding.like_params(
        jax.eval_shape(self.tx.init, params), params, boxed_shardings["params"], replicated)
    shardings = {"step": replicated, "params": boxed_shardings["params"],
                 "opt_state": opt_shardings, "rng": replicated}
    if boxed_shardings["objective"]:
      shardings["objective"] = boxed_shardings["objective"]
    return shardings

  def _init_state(self, rng):
    boxed = nn.unbox(self._init_boxed(rng))
    params = boxed["params"]
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": self.tx.init(params), "rng": rng}
    if boxed["objective"]:
      state["objective"] = boxed["objective"]
    return state

  def init_state(self):
    """A fresh state, created directly in its shardings (never whole on one device)."""
    rng = jax.random.PRNGKey(self.config.seed)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(self._init_state, out_shardings=self.state_shardings)(rng)

  @functools.cache
  def abstract_state(self):
    """The state's shapes, dtypes and shardings (traced once)."""
    shapes = jax.eval_shape(self._init_state, jax.random.PRNGKey(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def image_size_error(self, size):
    """Why the image tower cannot take `size` px images, or None: traced, not compiled."""
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    try:
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        jax.eval_shape(self.encoders.image, self.abstract_state()["params"], images)
    except Exception as e:  # Whatever the tower raises is what the message reports.
      return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None

  def put_params(self, state, params):
    """Replaces the state's parameters by host arrays (from `config.init`)."""
    expected = jax.tree.structure(state["params"])
    if jax.tree.structure(params) != expected:
      raise ValueError("config.init: the checkpoint's parameters do not match this model's.")
    state = dict(state)
    state["params"] = jax.device_put(params, self.state_shardings["params"])
    return state

  # --------------------------------------------------------------------------------------
  # The train step.
  # --------------------------------------------------------------------------------------
  def train_step_fn(self):
    """state, batch -> new state, metrics: the towers' passes, the objective's loss and
    gradient (over `accum_steps` micro-batches), the update, the parameters' bounds, then
    the objective's state."""
    model, objective, tx, schedule = self.model, self.objective, self.tx, self.schedule
    accum_steps, total_steps, bounds = self.config.accum_steps, self.total_steps, self.bounds
    epoch_steps = (self._examples_per_epoch or 0) / self.config.batch_size

    def train_step(state, batch):
      ctx = losses.Context(step=state["step"], total_steps=total_steps,
                           rng=jax.random.fold_in(state["rng"], state["step"]),
                           epoch_steps=epoch_steps)
      objective_state = state.get("objective", {})
      pass_rng, loss_rng = jax.random.split(ctx.rng)

      def embed(params, batch, rng, grad):
        return objective.embed(model, params, objective_state, batch, train=True, rng=rng,
                               grad=grad)

      def loss(params, features, fixed):
        return objective.loss(params, objective_state, {**features, **fixed},
                              ctx._replace(rng=loss_rng))

      (value, metrics), grads, features = grad_cache.value_and_grad(
          embed, loss, state["params"], batch, pass_rng, accum_steps)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optim.project(optax.apply_updates(state["params"], updates), bounds)
      metrics = dict(metrics, loss=value, lr=schedule(state["step"]),
                     grad_norm=optim.gradient_norm(grads), param_norm=optax.global_norm(params))
      new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
      if objective_state:
        new_state["objective"] = objective.update_state(
            objective_state, params, jax.lax.stop_gradient(features),
            ctx._replace(rng=loss_rng))
      return new_state, metrics

    return train_step

  def lower_train_step(self, batch_spec):
    """The train step traced and lowered for a batch of `batch_spec` shapes."""
    batch_sharding = sharding.batch_sharding(self.mesh)
    jitted = jax.jit(
        self.train_step_fn(),
        in_shardings=(self.state_shardings, batch_sharding),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=0)
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding), batch_spec)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jitted.lower(self.abstract_state(), abstract_batch)

  def compile_train_step(self, batch_spec):
    """Ahead-of-time compiles the train step for a batch of `batch_spec` shapes."""
    lowered = self.lower_train_step(batch_spec)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return lowered.compile()


def global_batch_spec(host_batch):
  """Global shapes of a batch from one process's slice."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(),) + x.shape[1:],
                                     x.dtype), host_batch)


def compiled_flops(compiled):
  """FLOPs of one call according to XLA's cost analysis (0 when unavailable)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


# ----------------------------------------------------------------------------------------
# What the towers are fed, checked before anything compiles.
# ----------------------------------------------------------------------------------------
def training_tokenizer(data_config):
  """The tokenizer of the training texts (None without text fields)."""
  return pipeline.tokenizer_for(data_config) if data_config.text.fields else None


def check_tokenizer(tokenizer, key, vocab_size):
  """Every id a tokenizer gives is below its piece count: one that fits the text tower's
  embedding table never indexes past it."""
  if tokenizer is None or tokenizer.vocab_size <= vocab_size:
    return
  raise ValueError(
      f"{key}: the tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} pieces, more "
      f"than the text tower's model.text.vocab_size={vocab_size}: its ids would index past "
      f"the embedding table. Retrain it with python -m hvla.tools.train_tokenizer "
      f"--dataset=DATASET --vocab_size={vocab_size}, or set --config.model.text.vocab_size="
      f"{tokenizer.vocab_size} or more.")


def check_feeds(setup, evals):
  """The training data and every evaluation's data give the towers what they take: token
  ids inside the vocabulary, texts no longer than the text tower's, image sizes the image
  tower accepts. Raises ValueError naming the key and the fix."""
  model = setup.config.model
  feeds = [("config.data", setup.config.data, training_tokenizer(setup.config.data))]
  feeds += [(f"config.evals.{name}.data", ev.source.config, ev.tokenizer)
            for name, ev in evals.items()]
  size_error = functools.cache(setup.image_size_error)
  for prefix, data, tokenizer in feeds:
    check_tokenizer(tokenizer, f"{prefix}.text.tokenizer", model.text.vocab_size)
    if data.text.fields and data.text.max_len > model.text.max_len:
      raise ValueError(f"{prefix}.text.max_len: {data.text.max_len} tokens do not fit the "
                       f"text tower's model.text.max_len={model.text.max_len}.")
    for view, options in data.views.items():
      error = size_error(options["size"])
      if error:
        raise ValueError(
            f"{prefix}.views.{view}.size: the image tower ({model.image.name} at "
            f"model.image.image_size={model.image.image_size}) cannot take "
            f"{options['size']} px images ({error}); use a size it takes, e.g. "
            f"{model.image.image_size}.")


# ----------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------
def make_evaluators(setup):
  """The config's evaluators; their texts are tokenised as training's are, unless an
  eval's `data` names its own `text.tokenizer`."""
  config = setup.config
  if not config.evals:
    return {}
  data = config.data.copy_and_resolve_references()
  tokenizer = training_tokenizer(data)
  if tokenizer is not None:
    data.text.tokenizer = tokenizer.model_path
  return {name: evaluators.get_evaluator(name, ev, encoders=setup.encoders, mesh=setup.mesh,
                                         data_config=data)
          for name, ev in config.evals.items()}


RESULTS_FILE = "eval_results.jsonl"


def append_results(workdir, step, results):
  """One JSON line {"step", "results"} per evaluation in `<workdir>/eval_results.jsonl`
  (process 0). A resumed run may evaluate a step again: the last line of a step wins."""
  if jax.process_index() or not results:
    return
  with (epath.Path(workdir) / RESULTS_FILE).open("a") as f:
    f.write(json.dumps({"step": step, "results": results}, sort_keys=True) + "\n")


def run_evaluators(evals, params, step, writer, only_due=True):
  """Runs the evaluators due at `step` (all of them when `only_due` is False)."""
  results = {}
  for name, evaluator in evals.items():
    if only_due and step % evaluator.every_steps:
      continue
    start = time.perf_counter()
    scalars, images = evaluator.run(params)
    scalars[f"{name}/seconds"] = time.perf_counter() - start
    writer.write_scalars(step, scalars)
    if images:
      writer.write_images(step, images)
    results.update(scalars)
  if results:
    logging.info("eval at step %d: %s", step,
                 ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
  return results


# ----------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------
def write_config(config, workdir):
  """Logs the resolved config and writes it to `<workdir>/config.json` (process 0), so
  that a run says exactly what it ran, command-line overrides included."""
  logging.info("Config:\n%s", config)
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


class Interrupted(Exception):
  """Training stopped by Ctrl-C: says where the newest checkpoint is."""

  def __init__(self, workdir, step):
    if step is None:
      message = (f"Interrupted before the first checkpoint in {workdir}; the same command "
                 "starts again.")
    else:
      message = (f"Interrupted: the last checkpoint is step {step} in "
                 f"{checkpointing.checkpoint_dir(workdir)}; the same command resumes from it.")
    super().__init__(message)
    self.step = step


def train(config, workdir):
  """Trains from scratch or resumes from the newest checkpoint in `workdir`."""
  write_config(config, workdir)
  pipeline.ensure_dataset(config.data)
  loader = pipeline.make_loader(
      config.data, split=config.data.train_split, global_batch_size=config.batch_size,
      train=True, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  setup = Setup(config, examples_per_epoch=loader.num_records)
  evals = make_evaluators(setup)
  check_feeds(setup, evals)
  writer = metrics_lib.make_writer(workdir)
  data_iter = iter(loader)
  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  try:
    return _train_loop(setup, evals, data_iter, manager, writer, workdir)
  except KeyboardInterrupt:
    manager.wait_until_finished()  # A save under way completes: nothing half-written.
    raise Interrupted(workdir, manager.latest_step()) from None


def _train_loop(setup, evals, data_iter, manager, writer, workdir):
  """Restores or initialises the state, compiles the step and trains to the end."""
  config = setup.config
  latest = manager.latest_step()
  if latest is not None:
    logging.info("Resuming from step %d in %s.", latest, workdir)
    state = checkpointing.restore(manager, latest, setup.abstract_state(), data_iter)
  else:
    state = setup.init_state()
    if config.init:
      params, init_step = checkpointing.load_params(config.init)
      logging.info("Parameters from %s (step %d).", config.init, init_step)
      state = setup.put_params(state, params)
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  step = int(state["step"])

  first = next(data_iter)
  start = time.perf_counter()
  train_step = setup.compile_train_step(global_batch_spec(first))
  compile_seconds = time.perf_counter() - start
  flops = compiled_flops(train_step)
  logging.info("Train step compiled in %.1fs, %.3g FLOPs per step.", compile_seconds, flops)
  writer.write_scalars(step, {"perf/compile_seconds": compile_seconds})

  accumulator = metrics_lib.MeanAccumulator()
  throughput = metrics_lib.Throughput(config.batch_size, setup.total_steps, step)
  host_batch = first
  while step < setup.total_steps:
    batch = sharding.make_global_batch(host_batch, setup.mesh)
    state, step_metrics = train_step(state, batch)
    accumulator.add(step_metrics)
    step += 1
    last = step == setup.total_steps
    if step % config.log_every == 0 or last:
      scalars = accumulator.result()
      scalars.update(throughput.update(step))
      scalars["perf/tflops_per_sec"] = (
          flops * scalars["perf/steps_per_sec"] / 1e12)
      scalars.update(data_iter.metrics())
      writer.write_scalars(step, scalars)
      metrics_lib.log_console(step, setup.total_steps, scalars)
    # A preemption notice (SIGTERM on TPU VMs, SLURM) saves at once so nothing is lost.
    if step % config.checkpoint_every == 0 or last or manager.reached_preemption(step):
      checkpointing.save(manager, step, state, data_iter)
    results = run_evaluators(evals, state["params"], step, writer, only_due=not last)
    if results:
      append_results(workdir, step, results)
      throughput.restart(step)
    if not last:
      host_batch = next(data_iter)
  manager.wait_until_finished()
  manager.close()
  writer.flush()
  return state


def evaluate(config, workdir):
  """Evaluates the newest checkpoint of `workdir` (or `config.init`) with every eval."""
  pipeline.ensure_dataset(config.data)
  setup = Setup(config)
  evals = make_evaluators(setup)
  check_feeds(setup, evals)
  source = config.init or workdir
  params, step = checkpointing.load_params(source)
  state = setup.put_params(setup.init_state(), params)
  writer = metrics_lib.make_writer(workdir)
  results = run_evaluators(evals, state["params"], step, writer, only_due=False)
  writer.flush()
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"eval_results_step{step}.json")
    with open(path, "w") as f:
      json.dump({"step": step, "checkpoint": checkpointing.absolute(source),
                 "results": results}, f, indent=2, sort_keys=True)
    logging.info("Wrote %s", path)
  return results
