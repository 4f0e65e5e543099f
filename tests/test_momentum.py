"""Momentum distillation ('momentum' term): the loss against ALBEF's formula written out
(queues partly filled or empty, saturated at scale 100, alpha 0), the ramp, and the EMA
and queue rotation of real train steps on 8 fake devices against one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import clip_vitb16
from hvla import losses, sharding, train
from hvla.data import synthetic
from hvla.losses import momentum
from hvla.losses.objective import towers
import tiny


def term(**options):
  t = momentum.Momentum(**{"queue_size": 8, **options})
  t.name = "momentum"
  t.embed_dim = 4
  return t


def normalised(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def setting(n=4, q=8, count=5, seed=0):
  rng = np.random.default_rng(seed)
  emb = lambda k: jnp.asarray(normalised(rng.normal(size=(k, 4))), jnp.float32)  # noqa: E731
  features = {"image": {"embedding": emb(n)}, "text": {"embedding": emb(n)},
              "momentum_image": {"embedding": emb(n)}, "momentum_text": {"embedding": emb(n)}}
  state = {"image_queue": emb(q), "text_queue": emb(q), "count": jnp.int32(count),
           "pointer": jnp.int32(count % q)}
  return features, state


def ctx(step=0, epoch_steps=0.0):
  return losses.Context(step=jnp.int32(step), total_steps=100, rng=jax.random.PRNGKey(0),
                        epoch_steps=epoch_steps)


def naive(features, state, log_scale, alpha):
  """ALBEF's ITA with momentum distillation, one anchor at a time; only the filled
  queue entries are columns."""
  scale = jnp.exp(log_scale)
  count = int(state["count"])
  total = 0.0
  for rows, rows_m, cols_m, queue in (("image", "momentum_image", "momentum_text", "text_queue"),
                                      ("text", "momentum_text", "momentum_image", "image_queue")):
    x, xm = features[rows]["embedding"], features[rows_m]["embedding"]
    cols = jnp.concatenate([features[cols_m]["embedding"], state[queue][:count]])
    loss = 0.0
    for i in range(x.shape[0]):
      student = jax.nn.log_softmax(scale * cols @ x[i])
      teacher = jax.nn.softmax(jax.lax.stop_gradient(scale) * cols @ xm[i])
      target = alpha * teacher + (1 - alpha) * jax.nn.one_hot(i, cols.shape[0])
      loss += -jnp.sum(target * student)
    total += loss / x.shape[0] / 2
  return total


def term_loss(t, features, state, log_scale, step_ctx):
  return t.loss({"logit_scale": log_scale}, state, features, step_ctx)[0]


@pytest.mark.parametrize("count", [0, 5, 8])
@pytest.mark.parametrize("regime", ["moderate", "saturated", "hard"])
def test_the_loss_matches_albefs_formula(count, regime):
  features, state = setting(count=count)
  log_scale = jnp.float32(np.log(1 / 0.07))
  alpha = 0.4
  if regime == "saturated":  # separated pairs at scale 100: each row's own column wins
    basis = jnp.eye(4)
    for key in features:
      features[key]["embedding"] = basis
    log_scale = jnp.float32(np.log(100.0))
  t = term(alpha=1.0 if regime == "saturated" else (0.0 if regime == "hard" else alpha),
           ramp_epochs=0.0)
  alpha = t.alpha
  student = lambda f, s: {**features, "image": {"embedding": f}, "text": {"embedding": s}}  # noqa
  got = jax.value_and_grad(lambda f, s, ls: term_loss(t, student(f, s), state, ls, ctx()),
                           argnums=(0, 1, 2))(features["image"]["embedding"],
                                              features["text"]["embedding"], log_scale)
  want = jax.value_and_grad(lambda f, s, ls: naive(student(f, s), state, ls, alpha),
                            argnums=(0, 1, 2))(features["image"]["embedding"],
                                               features["text"]["embedding"], log_scale)
  # Saturated, the loss is a few float32 roundings of logits near 100 (~1e-6).
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_the_ramp_rises_over_the_first_epoch_then_stays():
  t = term(alpha=0.4, ramp_epochs=1.0)
  got = [float(t.weight(ctx(step, epoch_steps=10.0))) for step in (0, 5, 10, 30)]
  np.testing.assert_allclose(got, [0.0, 0.2, 0.4, 0.4], rtol=1e-6)
  assert float(t.weight(ctx(0, epoch_steps=0.0))) == pytest.approx(0.4)  # length unknown
  assert float(term(ramp_epochs=0.0).weight(ctx(0, epoch_steps=10.0))) == pytest.approx(0.4)


def test_a_queue_that_is_not_a_multiple_of_the_batch_is_refused():
  features, state = setting(n=3)
  with pytest.raises(ValueError, match="queue_size=8 must be a multiple of the global batch 3"):
    term_loss(term(), features, state, jnp.float32(1.0), ctx())


def momentum_config(batch_size=8, queue_size=16):
  config = clip_vitb16.get_config("runlocal")
  tiny.shrink(config, batch_size=batch_size, image_depth=1, text_depth=1)
  config.objective.terms = {"momentum": losses.term_config(
      "momentum", queue_size=queue_size, decay=0.9)}
  return config


def run_steps(config, batches, devices):
  setup = train.Setup(config, devices=devices)
  state = setup.init_state()
  step = setup.compile_train_step(train.global_batch_spec(batches[0]))
  history = []
  for batch in batches:
    history.append(jax.device_get(state))
    state, _ = step(state, sharding.make_global_batch(batch, setup.mesh))
  return setup, history, jax.device_get(state)


def test_ema_and_queue_rotation_on_8_devices_equal_one_device():
  config = momentum_config()
  spec = synthetic.batch_spec(config.data, config.batch_size)
  batches = [synthetic.batch(spec, config.model.text.vocab_size, seed=s) for s in range(3)]
  config.mesh.update(data=8, fsdp=1, model=1)
  setup, history, eight = run_steps(config, batches, jax.devices())
  queue = setup.state_shardings["objective"]["momentum"]["image_queue"]
  assert queue.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  config.mesh.update(data=1)
  _, _, one = run_steps(config, batches, jax.devices()[:1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               eight["objective"], one["objective"])
  got = eight["objective"]["momentum"]
  assert int(got["pointer"]) == (3 * 8) % 16 and int(got["count"]) == 16
  # The EMA after three steps, from the parameters after each step.
  ema = towers(history[0]["params"])
  for params in [h["params"] for h in history[1:]] + [eight["params"]]:
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, towers(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got["ema"], ema)
  # Rows 0:8 hold step 3's momentum features (the EMA before it), rows 8:16 step 2's.
  for rows, when in ((slice(0, 8), 2), (slice(8, 16), 1)):
    weights = history[when]["objective"]["momentum"]["ema"]
    for modality, method, field in (("image", "encode_image", ("images", "image")),
                                    ("text", "encode_text", ("tokens", "caption"))):
      want = setup.model.apply({"params": weights}, batches[when][field[0]][field[1]],
                               method=method)["embedding"]
      np.testing.assert_allclose(got[f"{modality}_queue"][rows], want, rtol=1e-4, atol=1e-5)
