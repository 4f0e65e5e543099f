"""Schedules against hand computations; decay masks and freezing by regex."""
import math

import jax
import jax.numpy as jnp
import ml_collections
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


def test_gradient_clipping():
  c = make_config("constant")
  c.optimizer.clip_norm = 1.0
  c.optimizer.weight_decay = 0.0
  p = {"w": jnp.zeros(4)}
  tx = optim.make_optimizer(c, p)[0]
  clip = optax.clip_by_global_norm(1.0)
  g = {"w": jnp.full(4, 10.0)}
  clipped, _ = clip.update(g, clip.init(p))
  assert float(optax.global_norm(clipped)) == pytest.approx(1.0)
  updates, _ = tx.update(g, tx.init(p), p)
  assert np.isfinite(np.asarray(updates["w"])).all()
