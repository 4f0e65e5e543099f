"""Contrastive-correct gradient accumulation equals the full-batch gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hvla import grad_cache


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
