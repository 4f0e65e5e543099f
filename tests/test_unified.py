"""UniCLIP's 'unified' term: MP-NCE over two views and the caption against a per-anchor
loop, its reduction to CLIP, its strategies on 8 fake devices, the augmentation-aware
embedding, the inference path and a runlocal training run."""
import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from configs import uniclip_vitb32
from hvla import config as config_lib
from hvla import losses, models, train
from hvla.losses import contrastive, objective as objective_lib, unified
import test_evaluators
import tiny

CTX = losses.Context(step=jnp.int32(0), total_steps=10, rng=jax.random.PRNGKey(0))
PAIR_OF = {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 2}  # domains -> index in unified.PAIRS


def term(**options):
  t = unified.Unified(**options)
  t.name = "unified"
  return t


def normalised(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def triples(n, d=6, seed=0, views=2):
  """Random normalised embeddings: views x [n, d] images and [n, d] captions."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(normalised(rng.normal(size=(n, d))), jnp.float32)
          for _ in range(views + 1)]


def features_of(parts):
  return {**{f"image_{i}": {"embedding": p} for i, p in enumerate(parts[:-1])},
          "text": {"embedding": parts[-1]}}


def params_of(log_scale, offset):
  return {"objective": {"unified": {"logit_scale": jnp.asarray(log_scale, jnp.float32),
                                    "offset": jnp.asarray(offset, jnp.float32)}}}


def term_loss(t, parts, log_scale, offset):
  return t.loss(params_of(log_scale, offset), {}, features_of(parts), CTX)[0]


def per_anchor_loop(parts, log_scale, offset, pairs=unified.PAIRS):
  """MP-NCE by METHODS.md §4, written out: every embedding of every example is an anchor;
  its positives are the other embeddings of its example, its negatives all of the other
  examples'; s = (cos - b) / tau of the pair's domains; pairs outside `pairs` ignored."""
  items = [(example, k, p[example]) for example in range(parts[0].shape[0])
           for k, p in enumerate(parts)]
  domain = lambda k: int(k == len(parts) - 1)
  scored = lambda a, b: unified.PAIRS[PAIR_OF[(domain(a), domain(b))]] in pairs
  total = 0.0
  for i, (ei, ki, xi) in enumerate(items):
    def s(j):
      _, kj, xj = items[j]
      pair = PAIR_OF[(domain(ki), domain(kj))]
      return jnp.exp(log_scale[pair]) * (xi @ xj - offset[pair])
    others = [j for j in range(len(items)) if j != i and scored(ki, items[j][1])]
    positives = [j for j in others if items[j][0] == ei]
    negatives = jnp.stack([s(j) for j in others if items[j][0] != ei])
    neg_lse = jax.nn.logsumexp(negatives)
    total += sum(jnp.logaddexp(s(p), neg_lse) - s(p) for p in positives) / len(positives)
  return total / len(items)


SCALES = {"moderate": ([2.0, 2.6, 1.5], [0.1, -0.2, 0.05]),
          "saturated": ([np.log(100.0)] * 3, [0.0, 0.3, -0.2])}


@pytest.mark.parametrize("regime", sorted(SCALES))
def test_mpnce_matches_a_per_anchor_loop_in_value_and_gradient(regime):
  log_scale, offset = (jnp.asarray(v, jnp.float32) for v in SCALES[regime])
  if regime == "saturated":  # separated triples: each example's three embeddings equal
    base = jnp.eye(5, 8)
    parts = [base, base, 0.9 * base + jnp.sqrt(0.19) * jnp.roll(jnp.eye(5, 8), 4, axis=1)]
  else:
    parts = triples(5)
  t = term()
  got = jax.value_and_grad(lambda p, s, b: term_loss(t, p, s, b), argnums=(0, 1, 2))(
      parts, log_scale, offset)
  want = jax.value_and_grad(per_anchor_loop, argnums=(0, 1, 2))(parts, log_scale, offset)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_a_masked_domain_pair_matches_the_loop():
  parts, log_scale, offset = triples(4), jnp.asarray([2.0, 2.5, 1.0]), jnp.asarray([0.1, 0, 0.2])
  t = term(pairs=("image_text", "text_text"))
  got = jax.value_and_grad(lambda p: term_loss(t, p, log_scale, offset))(parts)
  want = jax.value_and_grad(lambda p: per_anchor_loop(p, log_scale, offset, t.pairs))(parts)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("log_scale", [np.log(1 / 0.07), np.log(100.0)])
def test_one_view_without_same_domain_pairs_is_clips_loss(log_scale):
  image, text = triples(6, views=1)
  t = term(views=("view1",), pairs=("image_text",))
  def uni(image, text, s):
    return term_loss(t, [image, text], jnp.full(3, s), jnp.zeros(3))
  def clip(image, text, s):
    return contrastive.contrastive_loss(image, text, scale=jnp.exp(s))
  args = (image, text, jnp.float32(log_scale))
  got = jax.value_and_grad(uni, argnums=(0, 1, 2))(*args)
  want = jax.value_and_grad(clip, argnums=(0, 1, 2))(*args)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def mesh8():
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def sharded_value_and_grads(t, parts, log_scale, offset, mesh):
  on_batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  parts = [jax.device_put(p, on_batch) for p in parts]
  fn = jax.jit(jax.value_and_grad(lambda p, s, b: term_loss(t, p, s, b), argnums=(0, 1, 2)))
  with jax.set_mesh(mesh):
    return fn(parts, log_scale, offset)


@pytest.mark.parametrize("regime", sorted(SCALES))
def test_chunked_and_sharded_equal_dense_on_8_devices(regime):
  log_scale, offset = (jnp.asarray(v, jnp.float32) for v in SCALES[regime])
  parts = triples(16, seed=3)
  if regime == "saturated":
    parts = [parts[0]] * 3  # every example's embeddings coincide: saturated positives
  mesh = mesh8()
  want = jax.value_and_grad(lambda p, s, b: term_loss(term(), p, s, b), argnums=(0, 1, 2))(
      parts, log_scale, offset)
  for options in (dict(strategy="chunked", block_size=5), dict(strategy="sharded"),
                  dict(strategy="sharded", block_size=4)):
    got = sharded_value_and_grads(term(**options), parts, log_scale, offset, mesh)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=str(options))


def test_sharded_set_keeps_each_devices_rows_local():
  """The example-major 3N set is built without moving rows between devices: the only
  collectives are the columns' all-gather and the reductions, none that reshuffles."""
  mesh, t = mesh8(), term(strategy="sharded")
  on_batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  parts = [jax.device_put(p, on_batch) for p in triples(16, seed=4)]
  fn = jax.jit(jax.value_and_grad(lambda p: term_loss(t, p, jnp.zeros(3), jnp.zeros(3))))
  with jax.set_mesh(mesh):
    hlo = fn.lower(parts).compile().as_text()
  for op in ("all-to-all", "collective-permute"):
    assert op not in hlo, op
  assert "all-gather" in hlo


def test_options_are_checked_by_name():
  for options, message in ((dict(views=()), "one or more distinct views"),
                           (dict(pairs=("image_image", "audio")), "non-empty subset"),
                           (dict(views=("a",), pairs=("image_image",)), "no positive pair"),
                           (dict(tau_init=0.001), "must lie in scale_range"),
                           (dict(offset_init=2.0), "must lie in offset_range"),
                           (dict(strategy="chunked"), "needs block_size")):
    with pytest.raises(ValueError, match=message):
      unified.Unified(**options)


def test_parameters_metrics_and_bounds():
  t = term()
  own = t.init_params(None)
  np.testing.assert_allclose(np.exp(own["logit_scale"]), 1 / 0.07, rtol=1e-6)
  np.testing.assert_array_equal(own["offset"], 0.0)
  _, metrics = t.loss(params_of(own["logit_scale"], own["offset"]), {},
                      features_of(triples(4)), CTX)
  assert sorted(metrics) == sorted(f"{k}_{p}" for k in ("tau", "offset") for p in unified.PAIRS)
  np.testing.assert_allclose(metrics["tau_image_text"], 0.07, rtol=1e-6)
  assert t.param_bounds() == {"logit_scale": (0.0, pytest.approx(np.log(100.0))),
                              "offset": (-1.0, 1.0)}


# ----------------------------------------------------------------------------------------
# The augmentation-aware embedding and the inference path.
# ----------------------------------------------------------------------------------------
def tiny_model(aug_mlp_width=8):
  config = models.default_model_config()
  config.embed_dim = 8
  config.aug_mlp_width = aug_mlp_width
  config.image.update(image_size=8, patch_size=4, width=16, depth=1, heads=2)
  config.text.update(vocab_size=16, max_len=test_evaluators.TEXT_LEN, width=16, depth=1,
                     heads=2)
  return models.get_model(config)


def init(model, seed=0):
  return nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)),
                             jnp.zeros((1, test_evaluators.TEXT_LEN), jnp.int32))["params"])


def with_random_output_layer(params, seed=1):
  out = params["aug_embed"]["out"]
  rng = np.random.default_rng(seed)
  out = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in out.items()}
  return {**params, "aug_embed": {**params["aug_embed"], "out": out}}


def test_augmentation_embedding_starts_at_zero_and_follows_the_parameters():
  model = tiny_model()
  params = init(model)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 3)), jnp.float32)
  flipped = np.tile(unified.NEUTRAL_AUGS, (3, 1))
  flipped[:, 4] = 1.0
  def embed(p, augs):
    return model.apply({"params": p}, images, jnp.asarray(augs), method="encode_image_with_augs")
  towers_out = model.apply({"params": params}, images, method="encode_image")
  assert set(embed(params, flipped)) == set(towers_out)  # what grounding reads, too
  plain = towers_out["embedding"]
  np.testing.assert_allclose(embed(params, flipped)["embedding"], plain, atol=1e-6)
  trained = with_random_output_layer(params)
  neutral = np.tile(unified.NEUTRAL_AUGS, (3, 1))
  a, b = embed(trained, neutral)["embedding"], embed(trained, flipped)["embedding"]
  assert np.abs(a - b).max() > 1e-3 and np.abs(a - plain).max() > 1e-3
  grads = jax.grad(lambda p: jnp.sum(embed(p, flipped)["embedding"][:, 0]))(params)
  assert np.abs(grads["aug_embed"]["out"]["kernel"]).max() > 0
  assert set(params["aug_embed"]) == {"hidden", "out"}
  assert params["aug_embed"]["hidden"]["kernel"].shape == (len(unified.NEUTRAL_AUGS), 8)


def test_the_neutral_vector_reaches_the_evaluators(monkeypatch):
  """Zero-shot with the objective's encoders: every image it embeds carries the neutral
  augmentation vector, and its result is the one of that embedding, not the towers'."""
  seen = []
  original = models.TwoTowers.encode_image_with_augs

  def recorded(self, images, augs, **kwargs):
    jax.debug.callback(lambda a: seen.append(np.asarray(a)), augs)
    return original(self, images, augs, **kwargs)
  monkeypatch.setattr(models.TwoTowers, "encode_image_with_augs", recorded)
  model = tiny_model()
  params = with_random_output_layer(init(model))
  obj = objective_lib.Objective({"unified": term(views=("image",))}, {"unified": 1.0})
  data = {"test": test_evaluators.shapes(32, seed=2)}

  def zeroshot(encoders):
    config = test_evaluators.evaluators.default_eval_config(
        "zeroshot", batch_size=8, label="place", templates="short")
    evaluator = test_evaluators.common.registered("zeroshot")(
        "zeroshot", config, encoders=encoders, mesh=test_evaluators.mesh_of(8),
        source=test_evaluators.ArraySource(data, 8), tokenizer=test_evaluators.TOKENIZER)
    return evaluator.run(params)[0]["zeroshot/top1"]
  via_objective = zeroshot(obj.encoders(model))
  assert seen and all(np.array_equal(a, np.broadcast_to(unified.NEUTRAL_AUGS, a.shape))
                      for a in seen)
  neutral = np.broadcast_to(unified.NEUTRAL_AUGS, (8, len(unified.NEUTRAL_AUGS)))
  by_hand = losses.Encoders(
      image=lambda p, x: model.apply({"params": p}, x, jnp.asarray(neutral[:x.shape[0]]),
                                     method="encode_image_with_augs"),
      text=losses.Encoders.of_towers(model).text)
  assert via_objective == zeroshot(by_hand)
  assert unified.NEUTRAL_AUGS.tolist() == [0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0]


def test_without_augmentation_awareness_the_towers_embed():
  t = term(augmentation_aware=False)
  assert {p.method for p in t.passes().values()} == {"encode_image", "encode_text"}
  obj = objective_lib.Objective({"unified": t}, {"unified": 1.0})
  model = tiny_model(aug_mlp_width=0)
  obj.attach(model)
  images = jnp.ones((2, 8, 8, 3))
  params = init(model)
  np.testing.assert_array_equal(obj.encoders(model).image(params, images)["embedding"],
                                losses.Encoders.of_towers(model).image(params, images)["embedding"])
  with pytest.raises(ValueError, match="needs the augmentation embedding"):
    term().attach(model)


# ----------------------------------------------------------------------------------------
# The config, trained.
# ----------------------------------------------------------------------------------------
def test_config_switches():
  for arg in (None, "runlocal", "runlocal,aware=false,text_text=false,steps=7"):
    config_lib.validate(uniclip_vitb32.get_config(arg))
  config = uniclip_vitb32.get_config("aware=false,image_image=false")
  assert config.model.aug_mlp_width == 0 and config.model.image.patch_size == 32
  uni = config.objective.terms.unified
  assert uni.pairs == ("image_text", "text_text") and not uni.augmentation_aware
  local = uniclip_vitb32.get_config("runlocal")
  assert set(local.data.views) == {"view1", "view2"} and not local.data.views.view1.flip
  assert {ev.view for ev in local.evals.values()} == {"view1"}
  assert local.model.aug_mlp_width == uniclip_vitb32.AUG_MLP_WIDTH


def scalars(workdir):
  """{tag: [values]} of the TensorBoard event files in workdir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        array = tf.make_ndarray(value.tensor)
        if array.ndim == 0 and array.dtype.kind == "f":  # a scalar, not text or hparams
          out.setdefault(value.tag, []).append(float(array))
  return out


def test_runlocal_trains_with_every_domain_pair_in_tensorboard(tmp_path):
  config = tiny.shrink(uniclip_vitb32.get_config("runlocal,evals=false"))
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.shapes.update(num_train=64, num_validation=16, num_test=16)
  config.total_steps, config.log_every, config.checkpoint_every = 4, 2, 4
  config.schedule.warmup_steps = 1
  train.train(config, str(tmp_path / "run"))
  logged = scalars(str(tmp_path / "run"))
  for pair in unified.PAIRS:
    for name in ("tau", "offset"):
      values = logged[f"unified/{name}_{pair}"]
      assert len(values) == 2 and all(np.isfinite(values))
  assert all(np.isfinite(logged["unified/loss"]))
  assert logged["unified/tau_image_text"][-1] != pytest.approx(0.07, abs=1e-7)
