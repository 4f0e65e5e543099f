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
from hvla.data import synthetic


def embed(params, batch, rng, grad):
  """Per-example features: with a gradient 'a' (noisy, so that both GradCache passes must
  draw the same noise) and 'b'; without one 'c', from frozen weights."""
  if not grad:
    return {"c": jnp.sin(batch["y"] @ jax.lax.stop_gradient(params["v"]))}
  noise = 0.1 * jax.random.normal(rng, batch["x"].shape[:1] + (params["w"].shape[1],))
  h = jnp.tanh(batch["x"] @ params["w"] + noise)
  return {"a": h / jnp.linalg.norm(h, axis=-1, keepdims=True), "b": batch["y"] @ params["v"]}


def loss(params, features, fixed):
  # InfoNCE couples every example with every other one: the case plain accumulation breaks.
  logits = jnp.exp(params["t"]) * features["a"] @ (features["b"] + fixed["c"]).T
  value = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))
  return value, {"loss/x": value}


def reference(params, batch, rng, accum_steps):
  """The same function by plain autodiff: micro-batch i embedded with key i."""
  micro, keys = grad_cache.split(batch, accum_steps), jax.random.split(rng, accum_steps)
  parts = [jax.tree.map(lambda x, i=i: x[i], micro) for i in range(accum_steps)]

  def merged(grad):
    outs = [embed(params, part, key, grad) for part, key in zip(parts, keys)]
    return grad_cache.merge(jax.tree.map(lambda *x: jnp.stack(x), *outs))
  return loss(params, merged(True), merged(False))


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


@pytest.mark.parametrize("accum_steps", [1, 2, 3, 4])
def test_accumulated_gradient_equals_plain_autodiff(accum_steps):
  params, batch = setup()
  rng = jax.random.PRNGKey(1)
  (want, _), want_grads = jax.value_and_grad(
      lambda p: reference(p, batch, rng, accum_steps) if accum_steps > 1 else
      loss(p, embed(p, batch, rng, True), embed(p, batch, rng, False)), has_aux=True)(params)
  (value, metrics), grads, features = jax.jit(
      lambda p, b: grad_cache.value_and_grad(embed, loss, p, b, rng, accum_steps))(
          params, batch)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/x"], want, rtol=1e-6)
  assert set(features) == {"a", "b", "c"} and features["a"].shape == (24, 3)
  assert np.abs(grads["w"]).max() > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads, want_grads)


def test_a_key_mismatch_between_the_two_passes_is_seen():
  """The check above would fail if the pull-back drew other noise than the first pass."""
  params, batch = setup()
  rng = jax.random.PRNGKey(1)
  _, want = jax.value_and_grad(lambda p: reference(p, batch, rng, 4), has_aux=True)(params)
  _, mismatched = jax.value_and_grad(
      lambda p: reference(p, batch, jax.random.PRNGKey(2), 4), has_aux=True)(params)
  assert not np.allclose(want["w"], mismatched["w"], rtol=1e-3)


def test_accumulation_on_sharded_batch():
  params, batch = setup(batch_size=32)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  rng = jax.random.PRNGKey(1)
  _, expected = jax.value_and_grad(lambda p: reference(p, batch, rng, 4), has_aux=True)(params)
  _, grads, _ = jax.jit(
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
  spec = synthetic.batch_spec(config.data, config.batch_size)
  host_batch = synthetic.batch(spec, config.model.text.vocab_size)
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
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
               accum_update, full_update)
