"""Schedules against hand computations; decay masks and freezing by regex."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hvla import config as config_lib
from hvla import optim


def make_config(name="cosine", **schedule):
  c = config_lib.base_config()
  c.batch_size = 10
  c.total_steps = 110
  c.optimizer.lr = 1.0
  c.schedule.name = name
  c.schedule.warmup_steps = 10
  for k, v in schedule.items():
    c.schedule[k] = v
  return c


def test_cosine_schedule_by_hand():
  s = optim.make_schedule(make_config("cosine"))
  assert float(s(0)) == pytest.approx(0.1)      # (0 + 1) / 10 of the way up.
  assert float(s(9)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.5)     # Half way through the cosine.
  assert float(s(110)) == pytest.approx(0.0, abs=1e-7)


def test_linear_rsqrt_constant_by_hand():
  assert float(optim.make_schedule(make_config("linear", end_factor=0.5))(60)) == (
      pytest.approx(0.75))
  assert float(optim.make_schedule(make_config("rsqrt"))(50)) == pytest.approx(
      1 / math.sqrt((50 - 10) / 10 + 1))  # rsqrt of the post-warm-up steps in warm-ups.
  assert float(optim.make_schedule(make_config("constant"))(100)) == pytest.approx(1.0)


def test_lengths_in_epochs_and_examples():
  c = make_config()
  c.total_steps, c.total_epochs = None, 2.0
  c.schedule.warmup_steps, c.schedule.warmup_examples = None, 45
  assert optim.total_steps(c, examples_per_epoch=1000) == 200
  assert optim.to_steps(c, "warmup_", c.schedule, 1000) == 5  # ceil(45 / 10)
  with pytest.raises(ValueError, match="dataset size"):
    optim.total_steps(c, examples_per_epoch=None)


def test_warmup_longer_than_training_fails():
  c = make_config()
  c.schedule.warmup_steps = 500
  with pytest.raises(ValueError, match="warm-up"):
    optim.make_schedule(c)


def params():
  return {"img": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                  "norm": {"scale": jnp.ones(2)}},
          "txt": {"dense": {"kernel": jnp.ones((2, 2))}},
          "logit_scale": jnp.array(2.0)}


def test_weight_decay_skips_biases_norms_and_logit_scale():
  c = make_config("constant", warmup_steps=None)  # lr = 1 from the first step.
  c.optimizer.weight_decay = 0.5
  c.optimizer.clip_norm = 0.0
  p = params()
  tx, _ = optim.make_optimizer(c, p)
  zero = jax.tree.map(jnp.zeros_like, p)
  updates, _ = tx.update(zero, tx.init(p), p)
  # With zero gradients only decoupled weight decay moves a parameter: -lr * wd * p.
  np.testing.assert_allclose(updates["img"]["dense"]["kernel"], -0.5 * jnp.ones((2, 2)))
  np.testing.assert_allclose(updates["txt"]["dense"]["kernel"], -0.5 * jnp.ones((2, 2)))
  for leaf in (updates["img"]["dense"]["bias"], updates["img"]["norm"]["scale"],
               updates["logit_scale"]):
    np.testing.assert_allclose(leaf, 0.0)


def test_freeze_by_regex():
  c = make_config("constant")
  c.optimizer.freeze = (r"^img/",)
  p = params()
  tx, _ = optim.make_optimizer(c, p)
  grads = jax.tree.map(jnp.ones_like, p)
  updates, _ = tx.update(grads, tx.init(p), p)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["img"]))
  assert float(jnp.abs(updates["txt"]["dense"]["kernel"]).max()) > 0


@pytest.mark.parametrize("scale", [0.01, 10.0])  # below and above the threshold
def test_clip_by_global_norm_matches_optax(scale):
  grads = {"a": jnp.arange(6.0).reshape(2, 3) * scale, "b": -jnp.ones(4) * scale}
  ours = optim.clip_by_global_norm(1.0)
  theirs = optax.clip_by_global_norm(1.0)
  clipped, _ = ours.update(grads, ours.init(grads))
  expected, _ = theirs.update(grads, theirs.init(grads))
  for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
  assert float(optax.global_norm(clipped)) == pytest.approx(min(norm, 1.0), rel=1e-6)


def test_gradient_norm_matches_numpy():
  grads = {"a": jnp.arange(6.0).reshape(2, 3), "b": -jnp.ones(4)}
  expected = np.sqrt(np.sum(np.arange(6.0) ** 2) + 4)
  assert float(jax.jit(optim.gradient_norm)(grads)) == pytest.approx(expected, rel=1e-6)


def test_gradient_clipping_by_hand():
  """Adam's first update is -lr * g / (|g| + eps) per element; with eps = 1 it shows
  whether g was clipped: 4 elements of 10 have norm 20, clipped to 0.5 each."""
  c = make_config("constant")
  c.optimizer.clip_norm = 1.0
  c.optimizer.weight_decay = 0.0
  c.optimizer.eps = 1.0
  p = {"w": jnp.zeros(4)}
  tx, schedule = optim.make_optimizer(c, p)
  lr = float(schedule(0))
  for g, clipped in ((10.0, 0.5), (0.1, 0.1)):  # above and below the threshold
    updates, _ = tx.update({"w": jnp.full(4, g)}, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], -lr * clipped / (clipped + 1.0), rtol=1e-6)


def test_project_clips_only_the_bounded_parameters():
  params = {"logit_scale": jnp.float32(5.0), "objective": {"t": {"tau": jnp.float32(-9.0)}},
            "w": jnp.full((2,), 7.0)}
  bounds = {"logit_scale": (0.0, math.log(100.0)), "objective/t/tau": (-6.9, -0.69)}
  out = optim.project(params, bounds)
  np.testing.assert_allclose(out["logit_scale"], math.log(100.0), rtol=1e-6)
  np.testing.assert_allclose(out["objective"]["t"]["tau"], -6.9, rtol=1e-6)
  np.testing.assert_array_equal(out["w"], params["w"])
  inside = optim.project({"logit_scale": jnp.float32(2.0)}, {"logit_scale": (0.0, 4.6)})
  assert float(inside["logit_scale"]) == 2.0
  with pytest.raises(ValueError, match=r"parameter\(s\) \['nope'\] that do not exist"):
    optim.project(params, {"nope": (0.0, 1.0)})
