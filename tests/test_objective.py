"""The objective framework through the trainer's step: shared tower passes run once, a
term's own parameters and state live in the sharded train state, gradient-free passes
run once under accumulation, the step context reaches the terms, the inference path is
the objective's; and, for every registered term type, per-example passes and exact
accumulation with randomness on."""
import collections
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import kill_resume
import momentum_term
import tiny

from configs import clip_vitb16, pyramid_vitb16, uniclip_vitb32
from hvla import checkpointing, grad_cache, losses, optim, sharding, train
from hvla.data import synthetic
from hvla.losses import objective as objective_lib
from hvla.models import TwoTowers

TOWER_METHODS = ("encode_image", "encode_text", "encode_image_with_rois")


def tiny_config(name, *, batch_size=16, image_depth=2):
  """A runlocal config with tiny towers: 'clip', 'siglip', 'pyramid' (six terms),
  'pyramid_siglip' (six terms + SigLIP), 'pyramid_features' (regions from stored
  features, no LeFF: patch dropout allowed), 'unified' (UniCLIP), 'hierarchical'
  (CLIP with ViCHA's layer-wise alignment) or 'momentum' (the test-only term)."""
  if name == "unified":
    config = uniclip_vitb32.get_config("runlocal")
  elif name.startswith("pyramid"):
    arg = {"pyramid": "", "pyramid_siglip": "siglip=0.5",
           "pyramid_features": "roi=features,leff=false"}[name]
    config = pyramid_vitb16.get_config(",".join(filter(None, ("runlocal", arg))))
  else:
    config = clip_vitb16.get_config(f"runlocal,loss={'sigmoid' if name == 'siglip' else 'softmax'}")
  tiny.shrink(config, image_depth=image_depth, batch_size=batch_size)
  if name == "pyramid_features":
    config.model.pyramid.roi.feature_dim = 8
  if name == "momentum":
    config.objective.terms = {"momentum": dict(type=momentum_term.TYPE, embed_dim=32)}
  if name == "hierarchical":
    config.model.text.depth = 3
    config.objective.terms.hierarchical = losses.term_config("hierarchical", weight=0.1)
  if name == "vicha":  # momentum distillation, layer-wise alignment, concepts, MAE
    config.model.concept_depth = 1
    config.data.text.fields = ("caption", "concepts")
    concepts = dict(concepts="concepts")
    config.objective.terms = {
        "ita": losses.term_config("momentum", queue_size=2 * batch_size, **concepts),
        "hierarchical": losses.term_config("hierarchical", weight=0.1, **concepts),
        "mae": losses.term_config("mae", decoder_width=16, decoder_depth=1,
                                  decoder_heads=2)}
  return config


def host_batch(config, seed=0):
  spec = synthetic.batch_spec(config.data, config.batch_size)
  batch = synthetic.batch(spec, config.model.text.vocab_size, seed=seed)
  if config.model.pyramid.roi.source == "features":  # as a dataset with stored features
    regions = batch["rois"]["mask"].shape + (config.model.pyramid.roi.feature_dim,)
    batch["rois"]["features"] = np.random.default_rng(seed).normal(size=regions).astype(
        np.float32)
  return batch


@pytest.fixture
def tower_calls(monkeypatch):
  """Counts the model's tower-method calls (at trace time)."""
  calls = collections.Counter()
  for method in TOWER_METHODS:
    def counted(self, *args, _method=method, _original=getattr(TwoTowers, method), **kwargs):
      calls[_method] += 1
      return _original(self, *args, **kwargs)
    monkeypatch.setattr(TwoTowers, method, counted)
  return calls


# ----------------------------------------------------------------------------------------
# Passes.
# ----------------------------------------------------------------------------------------
def test_terms_share_passes_by_identity_and_merge_their_outputs():
  obj = losses.get_objective(tiny_config("pyramid_siglip").objective)
  assert list(obj.passes) == ["encode_image_with_rois(images/global, rois)",
                              "encode_text(tokens/summary)", "encode_text(tokens/tags)",
                              "encode_text(tokens/caption)", "encode_image(images/local)"]
  assert set(obj.passes["encode_image_with_rois(images/global, rois)"].outputs) == {
      "embedding", "roi_embedding"}
  assert obj.reads["siglip"] == {"image": "encode_image(images/local)",
                                 "text": "encode_text(tokens/caption)"}
  assert obj.reads["peer_local"] == obj.reads["siglip"]


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_each_distinct_pass_runs_once_per_step(tower_calls, accum_steps):
  """PyramidCLIP's six terms with a SigLIP term read five passes: the global view with
  its regions, the local view, three text fields. With accumulation each runs once in
  each of GradCache's two passes."""
  config = tiny_config("pyramid_siglip")
  config.accum_steps = accum_steps
  setup = train.Setup(config)
  setup.abstract_state()  # Initialising the model calls both towers once.
  tower_calls.clear()
  setup.lower_train_step(train.global_batch_spec(host_batch(config)))
  assert dict(tower_calls) == {"encode_image_with_rois": accum_steps,
                               "encode_image": accum_steps, "encode_text": 3 * accum_steps}


def test_a_pass_output_must_be_per_example():
  class GridReader(losses.Term):
    def passes(self):
      return {"image": losses.Pass("encode_image", ("images/image",), outputs=("grid",))}

    def loss(self, params, state, features, ctx):
      return 0.0, {}
  config = tiny_config("clip")
  setup = train.Setup(config)
  obj = losses.Objective({"grid": GridReader()}, {"grid": 1.0})
  batch = host_batch(config)
  with pytest.raises(ValueError, match="output 'grid' is not a per-example array"):
    jax.eval_shape(lambda p: obj.embed(setup.model, p, {}, batch, train=False, rng=None),
                   setup.abstract_state()["params"])


def test_gradient_free_passes_run_once_under_accumulation(tower_calls):
  """The momentum pass (EMA weights) runs in GradCache's first pass only."""
  config = tiny_config("momentum")
  config.accum_steps = 2
  setup = train.Setup(config)
  setup.abstract_state()  # Initialising the model calls both towers once.
  tower_calls.clear()
  setup.lower_train_step(train.global_batch_spec(host_batch(config)))
  assert dict(tower_calls) == {"encode_image": 2, "encode_text": 2 + 1}


def test_pyramid_with_siglip_trains_and_logs_every_term():
  config = tiny_config("pyramid_siglip")
  config.mesh.update(data=8, fsdp=1, model=1)
  setup = train.Setup(config)
  state = setup.init_state()
  step = setup.compile_train_step(train.global_batch_spec(host_batch(config)))
  losses_seen = []
  for seed in range(3):
    state, metrics = step(state, sharding.make_global_batch(host_batch(config, seed),
                                                            setup.mesh))
    losses_seen.append(float(metrics["loss"]))
  terms = {*pyramid_term_names(), "siglip"}
  assert {k for k in metrics if k.endswith("/loss")} == {f"{t}/loss" for t in terms}
  weighted = sum(setup.objective.weights[t] * metrics[f"{t}/loss"] for t in terms)
  np.testing.assert_allclose(metrics["loss"], weighted, rtol=1e-5)
  assert "siglip/logit_bias" in metrics and np.all(np.isfinite(losses_seen))


def pyramid_term_names():
  from hvla.losses import pyramid  # pylint: disable=g-import-not-at-top
  return set(pyramid.TERMS)


# ----------------------------------------------------------------------------------------
# A term's own parameters and state.
# ----------------------------------------------------------------------------------------
def test_own_parameters_join_the_sharded_init_decay_mask_and_freezing():
  config = tiny_config("momentum")
  config.mesh.update(data=4, fsdp=1, model=2)
  config.sharding.rules = tuple((k, "model" if k == "joint" else v)
                                for k, v in config.sharding.rules)
  config.optimizer.freeze = (r"^objective/momentum/",)
  setup = train.Setup(config)
  state = setup.init_state()
  scale = state["params"]["objective"]["momentum"]["gain"]
  assert scale.sharding.spec == jax.sharding.PartitionSpec("model")  # its logical 'joint'
  queue = state["objective"]["momentum"]["queue"]
  assert queue.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  decay = jax.tree.map(lambda m: not m, optim.match_tree(state["params"],
                                                         config.optimizer.no_decay))
  assert decay["objective"]["momentum"]["gain"]
  before = jax.device_get(state["params"])
  step = setup.compile_train_step(train.global_batch_spec(host_batch(config)))
  state, _ = step(state, sharding.make_global_batch(host_batch(config), setup.mesh))
  after = jax.device_get(state["params"])
  np.testing.assert_array_equal(after["objective"]["momentum"]["gain"],
                                before["objective"]["momentum"]["gain"])  # frozen
  assert not np.array_equal(after["img"]["cls"], before["img"]["cls"])


def test_the_towers_start_the_same_whatever_the_objective():
  plain, own = (jax.device_get(train.Setup(tiny_config(name)).init_state()["params"])
                for name in ("clip", "momentum"))
  assert "objective" not in plain and "objective" in own
  jax.tree.map(np.testing.assert_array_equal, plain, objective_lib.towers(own))


def test_state_is_updated_after_the_step_with_the_context_and_new_parameters():
  config = tiny_config("momentum")
  setup = train.Setup(config)
  state = setup.init_state()
  ema = jax.device_get(state["objective"]["momentum"]["ema"])
  step = setup.compile_train_step(train.global_batch_spec(host_batch(config)))
  for seed in range(2):
    state, metrics = step(state, sharding.make_global_batch(host_batch(config, seed),
                                                            setup.mesh))
    # EMA (decay 0.5) of the parameters after this step's update.
    ema = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, ema,
                       objective_lib.towers(jax.device_get(state["params"])))
  momentum = jax.device_get(state["objective"]["momentum"])
  assert momentum["last_step"] == 1 and momentum["pointer"] == (2 * 16) % 8
  assert metrics["momentum/queue_norm"] > 0  # the second step saw the first's queue
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               momentum["ema"], ema)


def test_bounded_parameters_are_projected_after_the_update():
  """The model's logit scale (CLIP's clamp at 100) and a term's own bounds."""
  config = tiny_config("momentum")
  setup = train.Setup(config)
  assert setup.bounds == {"logit_scale": (0.0, np.log(100.0)),
                          "objective/momentum/gain": (0.0, 1.5)}
  state = setup.init_state()
  params = jax.device_get(state["params"])
  params["logit_scale"] = np.float32(np.log(500.0))
  params["objective"]["momentum"]["gain"] = np.full((32,), 5.0, np.float32)
  state = setup.put_params(state, params)
  step = setup.compile_train_step(train.global_batch_spec(host_batch(config)))
  state, _ = step(state, sharding.make_global_batch(host_batch(config), setup.mesh))
  after = jax.device_get(state["params"])
  np.testing.assert_allclose(after["logit_scale"], np.log(100.0), rtol=1e-6)
  np.testing.assert_allclose(after["objective"]["momentum"]["gain"], 1.5)


def test_the_objective_provides_the_inference_embedding():
  config = tiny_config("momentum")
  setup = train.Setup(config)
  params = jax.device_get(setup.init_state()["params"])
  params["objective"]["momentum"]["gain"] = np.linspace(0.1, 2.0, 32).astype(np.float32)
  images = host_batch(config)["images"]["image"]
  got = setup.encoders.image(params, images)["embedding"]
  plain = losses.Encoders.of_towers(setup.model).image(params, images)["embedding"]
  want = plain * params["objective"]["momentum"]["gain"]
  np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True),
                             rtol=1e-5)
  config.evals = clip_vitb16.get_config("runlocal").evals
  assert all(ev.encoders is setup.encoders for ev in train.make_evaluators(setup).values())


def test_two_terms_defining_inference_are_refused():
  config = ml_collections.ConfigDict(dict(terms={
      "a": dict(type=momentum_term.TYPE), "b": dict(type=momentum_term.TYPE)}))
  with pytest.raises(ValueError, match=r"terms \['a', 'b'\] each define the inference"):
    losses.get_objective(config)


@pytest.mark.parametrize("config, message", [
    (dict(terms={}), "objective.terms is empty"),
    (dict(name="clip", terms={"c": dict(type="clip")}), r"Unknown key\(s\) objective.name"),
    (dict(terms={"c": dict(type="clipp")}), r"terms.c.type: unknown term type 'clipp'"),
    (dict(terms={"c": dict(type="clip", weight=-1.0)}), r"terms.c.weight must be"),
])
def test_bad_objective_configs_are_named(config, message):
  with pytest.raises(ValueError, match=message):
    losses.get_objective(config)


def test_a_type_is_registered_once():
  class Other(losses.Term):
    passes = loss = None
  with pytest.raises(ValueError, match="'clip' is already registered"):
    losses.register("clip")(Other)


def load_state(workdir):
  root, step = checkpointing.find_checkpoint(workdir)
  return step, checkpointing.load_tree(os.path.join(root, str(step), "state"))


def hvla_main(workdir, data_dir):
  return [sys.executable, "-m", "hvla.main",
          "--config=tests/momentum_config.py:runlocal,evals=false", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.total_steps=8",
          "--config.checkpoint_every=4", "--config.log_every=2", "--config.batch_size=16",
          "--config.schedule.warmup_steps=2", "--config.model.image.depth=1",
          "--config.model.text.depth=1"]


def test_objective_state_survives_kill_and_resume_bit_exactly(tmp_path):
  data_dir = tmp_path / "tfds"
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir))
  straight, killed = kill_resume.straight_and_resumed(
      lambda workdir: hvla_main(workdir, data_dir), tmp_path, env)
  (step, want), (got_step, got) = load_state(straight), load_state(killed)
  assert step == got_step == 8 and int(want["objective"]["momentum"]["last_step"]) == 7
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert (straight / "config.json").exists()


# ----------------------------------------------------------------------------------------
# Every registered term type.
# ----------------------------------------------------------------------------------------
# A tiny config per term type and options worth covering; a new type fails here until
# it is added.
TERM_CASES = {"clip": ("clip", "siglip", "pyramid_features"), "unified": ("unified",),
              "hierarchical": ("hierarchical", "vicha"), "momentum": ("vicha",),
              "mae": ("vicha",), momentum_term.TYPE: ("momentum",)}


def test_every_registered_term_type_has_a_case():
  assert set(objective_lib._TERMS) == set(TERM_CASES)  # pylint: disable=protected-access


def step_functions(config):
  """(setup, params, objective state, batch, embed, loss) as the trainer builds them."""
  setup = train.Setup(config)
  state = jax.device_get(setup.init_state())
  batch = jax.tree.map(jnp.asarray, host_batch(config))
  obj, obj_state = setup.objective, state.get("objective", {})
  ctx = losses.Context(step=jnp.int32(3), total_steps=10, rng=jax.random.PRNGKey(5))

  def embed(params, batch, rng, grad):
    return obj.embed(setup.model, params, obj_state, batch, train=True, rng=rng, grad=grad)

  def loss(params, features, fixed):
    return obj.loss(params, obj_state, {**features, **fixed}, ctx)
  return state["params"], batch, embed, loss


@pytest.mark.parametrize("name", [c for cases in TERM_CASES.values() for c in cases])
def test_passes_are_per_example(name):
  config = tiny_config(name, batch_size=8)
  params, batch, embed, _ = step_functions(config)
  rng = jax.random.PRNGKey(1)  # random ops (MAE's mask) draw per example along the batch
  for grad in (True, False):
    whole = jax.jit(lambda b, g=grad: embed(params, b, rng, g))(batch)
    half = jax.jit(lambda b, g=grad: embed(params, b, rng, g))(
        jax.tree.map(lambda x: x[:4], batch))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[:4], b, rtol=1e-5, atol=1e-6),
                 whole, half)


@pytest.mark.parametrize("name", [c for cases in TERM_CASES.values() for c in cases])
def test_accumulation_equals_the_full_batch_with_randomness_on(name):
  """GradCache with patch dropout on equals plain autodiff of the same function: the
  loss of the features every micro-batch gets with its own key. A key that differed
  between GradCache's two passes would pull the gradient back through other patches."""
  config = tiny_config(name, batch_size=8)
  config.model.image.patch_dropout = 0.5
  config.accum_steps = 4
  params, batch, embed, loss = step_functions(config)
  rng = jax.random.PRNGKey(7)

  def reference(p):
    micro, keys = grad_cache.split(batch, 4), jax.random.split(rng, 4)
    parts = [jax.tree.map(lambda x, i=i: x[i], micro) for i in range(4)]
    features = grad_cache.merge(jax.tree.map(lambda *x: jnp.stack(x), *[
        embed(p, part, key, True) for part, key in zip(parts, keys)]))
    fixed = grad_cache.merge(jax.tree.map(lambda *x: jnp.stack(x), *[
        embed(p, part, key, False) for part, key in zip(parts, keys)]))
    return loss(p, features, fixed)

  (want, want_metrics), want_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(
      params)
  (got, got_metrics), got_grads, _ = jax.jit(
      lambda p: grad_cache.value_and_grad(embed, loss, p, batch, rng, 4))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for key in want_metrics:
    np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
  moved = [g for g in jax.tree.leaves(want_grads) if np.abs(g).max() > 0]
  assert len(moved) > 5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got_grads, want_grads)
  # Randomness is on: other keys give other features.
  other = jax.jit(lambda p: grad_cache.value_and_grad(embed, loss, p, batch,
                                                      jax.random.PRNGKey(8), 4))(params)
  assert not np.isclose(other[0][0], got)
