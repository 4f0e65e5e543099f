"""Contrastive-correct gradient accumulation equals the full-batch gradient."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import clip_vitb16, pyramid_vitb16
from hvla import grad_cache
from hvla import sharding
from hvla import train
from hvla.tools import benchmark


def embed(params, batch, rng):
  noise = 0.0 * jax.random.normal(rng, batch["x"].shape[:1] + (params["w"].shape[1],))
  h = jnp.tanh(batch["x"] @ params["w"] + noise)
  return {"a": h / jnp.linalg.norm(h, axis=-1, keepdims=True), "b": batch["y"] @ params["v"]}


def loss(params, features):
  # InfoNCE couples every example with every other one: the case plain accumulation breaks.
  logits = jnp.exp(params["t"]) * features["a"] @ features["b"].T
  value = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))
  return value, {"loss/x": value}


def setup(batch_size=24):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w": jax.random.normal(k[0], (5, 3)), "v": jax.random.normal(k[1], (4, 3)),
            "t": jnp.array(0.5)}
  batch = {"x": jax.random.normal(k[2], (batch_size, 5)),
           "y": jax.random.normal(k[3], (batch_size, 4))}
  return params, batch


def test_split_merge_roundtrip_and_striding():
  x = jnp.arange(12)
  micro = grad_cache.split({"x": x}, 3)["x"]
  np.testing.assert_array_equal(micro[1], [1, 4, 7, 10])
  np.testing.assert_array_equal(grad_cache.merge({"x": micro})["x"], x)
  with pytest.raises(ValueError, match="accum_steps=5"):
    grad_cache.split({"x": x}, 5)


@pytest.mark.parametrize("accum_steps", [2, 3, 4])
def test_accumulated_gradient_equals_full_batch(accum_steps):
  params, batch = setup()
  rng = jax.random.PRNGKey(1)
  (full, _), full_grads = jax.value_and_grad(
      lambda p: loss(p, embed(p, batch, rng)), has_aux=True)(params)
  (value, metrics), grads = jax.jit(
      lambda p, b: grad_cache.value_and_grad(embed, loss, p, b, rng, accum_steps))(
          params, batch)
  np.testing.assert_allclose(value, full, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/x"], full, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads, full_grads)


def test_accumulation_on_sharded_batch():
  params, batch = setup(batch_size=32)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  rng = jax.random.PRNGKey(1)
  _, expected = jax.value_and_grad(
      lambda p: loss(p, embed(p, batch, rng)), has_aux=True)(params)
  _, grads = jax.jit(
      lambda p, b: grad_cache.value_and_grad(embed, loss, p, b, rng, 4))(params, sharded)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads, expected)


def tiny_objective_config(name):
  """A runlocal config of objective `name` with tiny towers, on all 8 devices."""
  if name == "pyramid":
    config = pyramid_vitb16.get_config("runlocal")
  else:
    config = clip_vitb16.get_config(f"runlocal,loss={name}")
  tiny.shrink(config, image_depth=4, batch_size=32)
  config.mesh.update(data=8, fsdp=1, model=1)
  # Adam's first update is g / (|g| + eps): a large eps keeps it proportional to the
  # gradient, so the comparison below measures gradients rather than rounding signs.
  config.optimizer.update(eps=1.0, lr=1.0, clip_norm=0.0)
  config.schedule.update(name="constant", warmup_steps=0)
  return config


def step_once(config, host_batch):
  setup = train.Setup(config)
  state = setup.init_state()
  before = jax.device_get(state["params"])
  step = setup.compile_train_step(train.global_batch_spec(host_batch))
  state, metrics = step(state, sharding.make_global_batch(host_batch, setup.mesh))
  update = jax.tree.map(lambda new, old: new - old, jax.device_get(state["params"]), before)
  return update, jax.device_get(metrics)


@pytest.mark.parametrize("name", ["softmax", "sigmoid", "pyramid"])
def test_train_step_with_real_objective_accumulates_exactly(name):
  """The trainer's step with CLIP, SigLIP and PyramidCLIP on 8 devices: accum_steps=4
  gives the full-batch loss, every logged term, gradient norm and parameter update."""
  config = tiny_objective_config(name)
  spec = benchmark.batch_spec(config.data, config.batch_size)
  host_batch = benchmark.synthetic_batch(spec, config.model.text.vocab_size)
  full_update, full = step_once(config, host_batch)
  config.accum_steps = 4
  accum_update, accum = step_once(config, host_batch)
  assert set(full) == set(accum) and full["grad_norm"] > 0
  for key in full:
    np.testing.assert_allclose(accum[key], full[key], rtol=2e-5, atol=1e-6, err_msg=key)
  still = {jax.tree_util.keystr(path, simple=True, separator="/")
           for path, u in jax.tree_util.tree_leaves_with_path(full_update) if not u.any()}
  frozen = {p for p in still if any(re.search(r, p) for r in config.optimizer.freeze)}
  assert still == frozen  # every trainable parameter moves (lr=1: far above rounding)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               accum_update, full_update)
