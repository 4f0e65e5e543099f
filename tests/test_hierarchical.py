"""ViCHA's layer-wise alignment ('hierarchical' term): each level against a naive loop in
value and gradient (moderate, saturated at scale 100, bfloat16 features), stop-gradient
columns, the default level pairs, the strategies on 8 fake devices, and a train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from configs import clip_vitb16
from hvla import losses, sharding, train
from hvla.data import synthetic
from hvla.losses import hierarchical
import tiny

CTX = losses.Context(step=jnp.int32(0), total_steps=10, rng=jax.random.PRNGKey(0))
WIDTHS = (6, 5, 4)  # image width, text width, joint width


def term(pairs=((1, 2), (3, 1)), **options):
  t = hierarchical.Hierarchical(pairs=pairs, **options)
  t.name = "hierarchical"
  t.widths = WIDTHS
  return t


def inputs(t, n=6, depth=3, seed=0, dtype=jnp.float32):
  """Random level features [n, depth, W] per tower and the term's parameters."""
  rng = np.random.default_rng(seed)
  image = jnp.asarray(rng.normal(size=(n, depth, WIDTHS[0])), dtype)
  text = jnp.asarray(rng.normal(size=(n, depth, WIDTHS[1])), dtype)
  own = jax.tree.map(lambda b: b.value, t.init_params(jax.random.PRNGKey(seed)),
                     is_leaf=lambda b: hasattr(b, "value"))
  own = jax.tree.map(lambda v: v + 0.1 * jnp.asarray(rng.normal(size=v.shape), v.dtype), own)
  return image, text, own


def term_loss(t, image, text, own, log_scale):
  params = {"logit_scale": log_scale, "objective": {"hierarchical": own}}
  features = {"image": {"levels": image}, "text": {"levels": text}}
  return t.loss(params, {}, features, CTX)[0]


def level_embeddings(own, level, image, text, i, t):
  def head(side, x):
    y = x.astype(jnp.float32) @ own[side]["kernel"][level] + own[side]["bias"][level]
    return y / jnp.linalg.norm(y, axis=-1, keepdims=True)
  return head("image", image[:, i - 1]), head("text", text[:, t - 1])


def direction(rows, cols, log_scale):
  """Mean over anchors of -log softmax over every column, at the anchor's own column."""
  n = rows.shape[0]
  loss = 0.0
  for a in range(n):
    logits = jnp.stack([jnp.exp(log_scale) * rows[a] @ cols[b] for b in range(n)])
    loss += -jax.nn.log_softmax(logits)[a]
  return loss / n


def naive(pairs, weights, image, text, own, log_scale, stop_grad_cols=True):
  """ViCHA's levels written out: per level the heads and L2 norm, then both directions,
  the columns constant with stop_grad_cols."""
  cut = jax.lax.stop_gradient if stop_grad_cols else (lambda v: v)
  total = 0.0
  for level, ((i, t), w) in enumerate(zip(pairs, weights)):
    x, y = level_embeddings(own, level, image, text, i, t)
    total += w * (direction(x, cut(y), log_scale) + direction(y, cut(x), log_scale)) / 2
  return total


REGIMES = {"moderate": np.log(1 / 0.07), "saturated": np.log(100.0)}


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_levels_match_a_naive_loop_in_value_and_gradient(regime, dtype):
  t = term(level_weights=(1.0, 0.5))
  image, text, own = inputs(t, dtype=dtype)
  if regime == "saturated":  # separated pairs: the heads map each pair to one direction
    own = {"image": {"kernel": jnp.stack([jnp.eye(WIDTHS[0], WIDTHS[2])] * 2),
                     "bias": jnp.zeros((2, WIDTHS[2]))},
           "text": {"kernel": jnp.stack([jnp.eye(WIDTHS[1], WIDTHS[2])] * 2),
                    "bias": jnp.zeros((2, WIDTHS[2]))}}
    basis = jnp.eye(WIDTHS[2])
    rows = jnp.concatenate([basis, -basis[:2]])  # six separated directions
    image = jnp.zeros_like(image).at[..., :WIDTHS[2]].set(rows[:, None].astype(dtype))
    text = jnp.zeros_like(text).at[..., :WIDTHS[2]].set(rows[:, None].astype(dtype))
  log_scale = jnp.float32(REGIMES[regime])
  args = (image, text, own, log_scale)
  got = jax.value_and_grad(lambda *a: term_loss(t, *a), argnums=(0, 1, 2, 3))(*args)
  want = jax.value_and_grad(lambda *a: naive(t.pairs, (1.0, 0.5), *a),
                            argnums=(0, 1, 2, 3))(*args)
  tol = dict(rtol=1e-4, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-3)
  np.testing.assert_allclose(got[0], want[0], **tol)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **tol)
  assert np.isfinite(got[0]) and all(np.all(np.isfinite(np.asarray(g, np.float32)))
                                     for g in jax.tree.leaves(got[1]))


def test_stop_gradient_columns_carry_no_gradient():
  """With the switch on, a text's gradient is that of its own anchor (text->image) with
  the images constant: the image->text direction sends it nothing."""
  t = term(pairs=((2, 2),))
  image, text, own = inputs(t)
  log_scale = jnp.float32(2.0)
  got = jax.grad(lambda y: term_loss(t, image, y, own, log_scale))(text)

  def anchor_only(y):
    x_emb, y_emb = level_embeddings(own, 0, image, y, 2, 2)
    return direction(y_emb, jax.lax.stop_gradient(x_emb), log_scale) / 2
  np.testing.assert_allclose(got, jax.grad(anchor_only)(text), rtol=1e-4, atol=1e-6)
  both = jax.grad(lambda y: term_loss(term(pairs=((2, 2),), stop_grad_cols=False),
                                      image, y, own, log_scale))(text)
  want_both = jax.grad(lambda y: naive(t.pairs, (1.0,), image, y, own, log_scale,
                                       False))(text)
  np.testing.assert_allclose(both, want_both, rtol=1e-4, atol=1e-6)
  assert not np.allclose(got, both, atol=1e-4)


@pytest.mark.parametrize("depths, pairs", [
    ((12, 6), ((7, 1), (8, 2), (9, 3), (10, 4), (11, 5))),
    ((12, 12), ((7, 7), (8, 8), (9, 9), (10, 10), (11, 11))),
    ((4, 4), ((1, 1), (2, 2), (3, 3))),
    ((4, 2), ((3, 1),)),
])
def test_default_pairs_are_the_official_ones_and_top_aligned(depths, pairs):
  assert hierarchical.default_pairs(*depths) == pairs


@pytest.mark.parametrize("options, message", [
    (dict(pairs=((0, 1),)), "1-indexed"),
    (dict(pairs=((1, 1), (1, 1))), "a pair twice"),
    (dict(pairs=((1, 1),), level_weights=(1.0, 2.0)), "2 weights for 1 pairs"),
    (dict(embed_dim=-1), "embed_dim"),
])
def test_bad_options_are_refused(options, message):
  with pytest.raises(ValueError, match=message):
    hierarchical.Hierarchical(**options)


def tiny_config(**options):
  config = clip_vitb16.get_config("runlocal")
  tiny.shrink(config, image_depth=3, text_depth=2)
  config.objective.terms.hierarchical = losses.term_config("hierarchical", weight=0.1,
                                                           **options)
  return config


def test_attach_refuses_pairs_outside_the_towers():
  config = tiny_config(pairs=((4, 1),))
  with pytest.raises(ValueError, match=r"hierarchical.pairs: \(4, 1\) lies outside"):
    train.Setup(config)
  config = tiny_config()
  config.model.image.depth = config.model.text.depth = 1
  with pytest.raises(ValueError, match="no intermediate layers"):
    train.Setup(config)


def test_sharded_and_chunked_equal_dense_on_8_devices():
  """The correct global targets: every device's rows against all columns, positives on
  the global diagonal, whatever the strategy."""
  t_dense = term()
  image, text, own = inputs(t_dense, n=16, seed=2)
  log_scale = jnp.float32(np.log(30.0))
  grad = lambda t: jax.value_and_grad(lambda *a: term_loss(t, *a), argnums=(0, 1, 2))
  want = grad(t_dense)(image, text, own, log_scale)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  on_batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  sharded = [jax.device_put(v, on_batch) for v in (image, text)]
  for options in (dict(strategy="sharded"), dict(strategy="chunked", block_size=5)):
    with jax.set_mesh(mesh):
      got = jax.jit(grad(term(**options)))(*sharded, own, log_scale)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=str(options))


def test_a_train_step_with_the_levels_logs_each_level():
  config = tiny_config()
  setup = train.Setup(config)
  assert setup.objective.terms["hierarchical"].pairs == ((2, 1),)
  # The main term and the levels share the image pass and the text pass.
  assert len(setup.objective.passes) == 2
  state = setup.init_state()
  heads = state["params"]["objective"]["hierarchical"]
  assert heads["image"]["kernel"].shape == (1, 32, 32) and heads["text"]["bias"].shape == (1, 32)
  spec = synthetic.batch_spec(config.data, config.batch_size)
  batch = synthetic.batch(spec, config.model.text.vocab_size, seed=0)
  step = setup.compile_train_step(train.global_batch_spec(batch))
  before = jax.device_get(heads)
  state, metrics = step(state, sharding.make_global_batch(batch, setup.mesh))
  assert {"hierarchical/loss", "hierarchical/image2_text1", "clip/loss"} <= set(metrics)
  np.testing.assert_allclose(metrics["loss"], metrics["clip/loss"] +
                             0.1 * metrics["hierarchical/loss"], rtol=1e-5)
  after = jax.device_get(state["params"]["objective"]["hierarchical"])
  assert not np.allclose(after["image"]["kernel"], before["image"]["kernel"])
