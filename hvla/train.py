"""The trainer: sharded state, one jitted train step for every objective, the loop.

The model, the objective and the evaluators are picked by name from the config; this
file never knows which ones run. State is a plain dict {step, params, opt_state, rng}
created already sharded on the mesh, updated in place (donated) by the train step, and
checkpointed asynchronously together with the data-iterator position.
"""
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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
    self.total_steps = optim.total_steps(config, examples_per_epoch)
    self._examples_per_epoch = examples_per_epoch
    self._abstract_boxed = jax.eval_shape(self._init_params, jax.random.PRNGKey(0))
    params = nn.unbox(self._abstract_boxed)
    self.tx, self.schedule = optim.make_optimizer(config, params, examples_per_epoch)
    self.state_shardings = self._state_shardings(params)

  def _init_params(self, rng):
    image_size = self.config.model.image.image_size
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, self.config.model.text.max_len), jnp.int32)
    return self.model.init({"params": rng}, images, tokens)["params"]

  def _state_shardings(self, params):
    param_shardings = sharding.logical_shardings(self._abstract_boxed, self.mesh, self.rules)
    replicated = sharding.replicated(self.mesh)
    opt_shardings = sharding.like_params(
        jax.eval_shape(self.tx.init, params), params, param_shardings, replicated)
    return {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
            "rng": replicated}

  def _init_state(self, rng):
    params = nn.unbox(self._init_params(rng))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params), "rng": rng}

  def init_state(self):
    """A fresh state, created directly in its shardings (never whole on one device)."""
    rng = jax.random.PRNGKey(self.config.seed)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(self._init_state, out_shardings=self.state_shardings)(rng)

  def abstract_state(self):
    shapes = jax.eval_shape(self._init_state, jax.random.PRNGKey(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

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
    model, objective, tx, schedule = self.model, self.objective, self.tx, self.schedule

    accum_steps = self.config.accum_steps

    def embed(params, batch, rng):
      return objective.embed(model, params, batch, train=True, rng=rng)

    def train_step(state, batch):
      rng = jax.random.fold_in(state["rng"], state["step"])
      if accum_steps > 1:
        (loss, metrics), grads = grad_cache.value_and_grad(
            embed, objective.loss, state["params"], batch, rng, accum_steps)
      else:
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: objective.loss(p, embed(p, batch, rng)), has_aux=True)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      metrics = dict(metrics, loss=loss, lr=schedule(state["step"]),
                     grad_norm=optim.gradient_norm(grads), param_norm=optax.global_norm(params))
      new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
      return new_state, metrics

    return train_step

  def compile_train_step(self, batch_spec):
    """Ahead-of-time compiles the train step for a batch of `batch_spec` shapes."""
    batch_sharding = sharding.batch_sharding(self.mesh)
    jitted = jax.jit(
        self.train_step_fn(),
        in_shardings=(self.state_shardings, batch_sharding),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=0)
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding), batch_spec)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jitted.lower(self.abstract_state(), abstract_batch).compile()


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
# Evaluation.
# ----------------------------------------------------------------------------------------
def make_evaluators(setup):
  config = setup.config
  if not config.evals:
    return {}
  tokenizer = pipeline.tokenizer_for(config.data)
  return {name: evaluators.get_evaluator(name, ev, model=setup.model, mesh=setup.mesh,
                                         data_config=config.data, tokenizer=tokenizer)
          for name, ev in config.evals.items()}


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
def train(config, workdir):
  """Trains from scratch or resumes from the newest checkpoint in `workdir`."""
  pipeline.ensure_dataset(config.data)
  loader = pipeline.make_loader(
      config.data, split=config.data.train_split, global_batch_size=config.batch_size,
      train=True, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  setup = Setup(config, examples_per_epoch=loader.num_records)
  writer = metrics_lib.make_writer(workdir)
  data_iter = iter(loader)
  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)

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

  evals = make_evaluators(setup)
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
    if run_evaluators(evals, state["params"], step, writer, only_due=not last):
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
  source = config.init or workdir
  params, step = checkpointing.load_params(source)
  state = setup.put_params(setup.init_state(), params)
  writer = metrics_lib.make_writer(workdir)
  results = run_evaluators(make_evaluators(setup), state["params"], step, writer,
                           only_due=False)
  writer.flush()
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"eval_results_step{step}.json")
    with open(path, "w") as f:
      json.dump({"step": step, "checkpoint": checkpointing.absolute(source),
                 "results": results}, f, indent=2, sort_keys=True)
    logging.info("Wrote %s", path)
  return results
