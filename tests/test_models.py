"""Tests of hvla.models: towers, dual encoder, config validation, sharding names."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvla import models
from hvla.models import layers, vit

IMAGE, PATCH = 16, 4  # a 4x4 patch grid
PAD, EOS = 0, 3


def tiny_config(**changes):
  c = models.default_model_config()
  c.embed_dim = 16
  c.image.update(image_size=IMAGE, patch_size=PATCH, width=32, depth=2, heads=2)
  c.text.update(vocab_size=64, max_len=8, width=32, depth=2, heads=2)
  for key, value in changes.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def make_inputs(batch=2, seed=0, size=IMAGE):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  tokens = np.zeros((batch, 8), np.int32)
  for i in range(batch):
    n = 2 + (3 * i) % 5
    tokens[i, :n] = rng.integers(4, 64, size=n)
    tokens[i, n] = EOS
  return jnp.asarray(images), jnp.asarray(tokens)


def build(config, seed=0):
  """(model, unboxed variables) for `config`."""
  model = models.get_model(config)
  images, tokens = make_inputs()
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(seed), images, tokens))


def run(model, variables, *args, method="__call__", **kwargs):
  """model.apply under jit (eager op-by-op dispatch is far slower on CPU)."""
  fn = lambda v, *a: model.apply(v, *a, method=method, **kwargs)  # noqa: E731
  return jax.jit(fn)(variables, *args)


def num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float32), np.asarray(y, np.float32), **tol), a, b)


# --------------------------------------------------------------------------------
# Parameter counts and outputs.

def test_default_config_matches_clip_vit_b16_parameter_counts():
  model = models.get_model(models.default_model_config())
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, 77), jnp.int32))
  params = nn.unbox(shapes)["params"]
  # Published CLIP ViT-B/16: 85,799,424 in the image trunk, 149,620,737 in total.
  assert num_params(params["img"]) == 85_799_424
  assert num_params(params["img"]) + num_params(params["img_proj"]) == 86_192_640
  assert num_params(params) == 149_620_737
  assert sorted(params) == ["img", "img_proj", "logit_scale", "txt", "txt_proj"]


def test_encode_outputs_shapes_and_norms():
  config = tiny_config()
  model, variables = build(config)
  images, tokens = make_inputs()
  grids = []

  def encode_image(m, images):  # records `grid`, which jit would turn into arrays
    out = m.encode_image(images)
    grids.append(out.pop("grid"))
    return out

  img = run(model, variables, images, method=encode_image)
  txt = run(model, variables, tokens, method="encode_text")
  assert grids == [(4, 4)] and all(isinstance(g, int) for g in grids[0])
  keys = {"embedding", "pooled", "tokens", "token_embeddings", "cls_layers", "levels"}
  assert set(img) == keys and set(txt) == keys
  assert img["embedding"].shape == (2, 16) and img["pooled"].shape == (2, 32)
  assert img["tokens"].shape == (2, 16, 32) and img["token_embeddings"].shape == (2, 16, 16)
  assert img["cls_layers"].shape == (2, 2, 32)
  assert txt["embedding"].shape == (2, 16) and txt["tokens"].shape == (2, 8, 32)
  assert txt["token_embeddings"].shape == (2, 8, 16) and txt["cls_layers"].shape == (2, 2, 32)
  # levels: every block's readout after the final norm, example-major; the last one is
  # the pooled feature (class token / end-of-text pooling).
  for out, norm in ((img, "image_norm"), (txt, "text_norm")):
    assert out["levels"].shape == (2, 2, 32)
    np.testing.assert_allclose(
        out["levels"], np.swapaxes(run(model, variables, out["cls_layers"], method=norm), 0, 1),
        rtol=1e-6)
    np.testing.assert_allclose(out["levels"][:, -1], out["pooled"], rtol=1e-5, atol=1e-6)
  for x in (img["embedding"], img["token_embeddings"], txt["embedding"]):
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, rtol=1e-5)
  # The joint embedding is the normalised projection of `pooled`.
  for out, proj in ((img, "img_proj"), (txt, "txt_proj")):
    ref = np.asarray(out["pooled"]) @ np.asarray(variables["params"][proj]["kernel"])
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(out["embedding"], ref, rtol=1e-5, atol=1e-6)
  assert "logit_bias" not in variables["params"]
  np.testing.assert_allclose(variables["params"]["logit_scale"], math.log(1 / 0.07), rtol=1e-6)


def test_logit_scale_is_exp_and_bounded_by_projection():
  model = models.get_model(tiny_config(logit_scale_range=(2.0, 50.0)))
  # Touching a projection runs `setup`, which creates just the scalar.
  variables = nn.unbox(model.init(jax.random.key(0), method=lambda m: m.img_proj))
  assert sorted(variables["params"]) == ["logit_scale"]
  np.testing.assert_allclose(models.logit_scale(variables["params"]), 1 / 0.07, rtol=1e-5)
  # No clamp in the forward pass (it would cut the gradient past the bound) ...
  np.testing.assert_allclose(models.logit_scale({"logit_scale": jnp.float32(9.0)}),
                             np.exp(9.0), rtol=1e-5)
  # ... the bounds are projected after the update (hvla.optim.project).
  np.testing.assert_allclose(models.param_bounds(model)["logit_scale"],
                             (math.log(2.0), math.log(50.0)))


@pytest.mark.parametrize("overrides, message", [
    (dict(logit_scale_range=(0.0, 100.0)), "model.logit_scale_range"),
    (dict(logit_scale_range=(10.0, 1.0)), "model.logit_scale_range"),
    (dict(logit_scale_range=(1.0, 10.0)), "model.logit_scale_init"),  # ln(1/0.07) > ln 10
])
def test_bad_logit_scale_range_is_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.get_model(tiny_config(**overrides))


def test_l2_normalize_matches_numpy():
  x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
  np.testing.assert_allclose(models.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


# --------------------------------------------------------------------------------
# Image tower pieces.

@pytest.mark.parametrize("scan", [False, True])
def test_image_tower_in_two_parts_equals_whole(scan):
  model, variables = build(tiny_config(scan=scan))
  images, _ = make_inputs()

  def f1_then_f2(m, images):
    x = m.image_stem(images)
    x, low = m.image_blocks(x, 0, 1)
    x, high = m.image_blocks(x, 1, 2)
    pooled, tokens = m.image_head(x)
    return pooled, tokens, jnp.concatenate([low, high]), m.image_norm(high[-1])

  pooled, tokens, cls_layers, normed_last = run(model, variables, images, method=f1_then_f2)
  whole = run(model, variables, images, method="encode_image")
  np.testing.assert_allclose(pooled, whole["pooled"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tokens, whole["tokens"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cls_layers, whole["cls_layers"], rtol=1e-5, atol=1e-5)
  # `cls` pooling: the pooled feature is the last class token after the final norm.
  np.testing.assert_allclose(normed_last, whole["pooled"], rtol=1e-5, atol=1e-5)
  if scan:  # gradients flow through the sliced parameter stack as through the whole
    grad = lambda method: jax.jit(jax.grad(  # noqa: E731
        lambda v: jnp.sum(model.apply(v, images, method=method)[0])))(variables)
    assert_trees_close(grad(f1_then_f2), grad(lambda m, x: (m.encode_image(x)["pooled"],)),
                       rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="Block range"):
    model.apply(variables, jnp.zeros((2, 17, 32)), 1, 1, method="image_blocks")


def numpy_layer_norm(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def test_image_stem_matches_numpy():
  model, variables = build(tiny_config())
  images, _ = make_inputs()
  p = jax.tree.map(np.asarray, variables["params"]["img"])
  patches = np.asarray(vit.patchify(images, PATCH)[0])
  cls = np.broadcast_to(p["cls"] + p["pos_embedding"][0], (2, 1, 32))
  raw = np.concatenate([cls, patches @ p["embedding"]["kernel"] + p["pos_embedding"][1:]], 1)
  stem = run(model, variables, images, method="image_stem")
  np.testing.assert_allclose(stem, numpy_layer_norm(raw, p["pre_norm"]), rtol=1e-4, atol=1e-4)
  pre_normed = run(model, variables, jnp.asarray(raw), method="image_pre_norm")
  np.testing.assert_allclose(pre_normed, stem, rtol=1e-5, atol=1e-5)


def test_patchify_matches_numpy():
  images = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
  patches, grid = vit.patchify(jnp.asarray(images), 4)
  assert grid == (2, 3)
  ref = [images[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1)
         for b in range(2) for i in range(2) for j in range(3)]
  np.testing.assert_array_equal(np.asarray(patches).reshape(12, 48), np.stack(ref))
  with pytest.raises(ValueError, match="not divisible"):
    vit.patchify(jnp.zeros((1, 10, 8, 3)), 4)


def naive_bilinear(grid, out_h, out_w):
  """Half-pixel-centre bilinear resize of [h, w, C], clamping at the border."""
  def coords(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo
  (y0, y1, fy), (x0, x1, fx) = coords(grid.shape[0], out_h), coords(grid.shape[1], out_w)
  out = np.zeros((out_h, out_w, grid.shape[2]))
  for i in range(out_h):
    for j in range(out_w):
      top = grid[y0[i], x0[j]] * (1 - fx[j]) + grid[y0[i], x1[j]] * fx[j]
      bottom = grid[y1[i], x0[j]] * (1 - fx[j]) + grid[y1[i], x1[j]] * fx[j]
      out[i, j] = top * (1 - fy[i]) + bottom * fy[i]
  return out


@pytest.mark.parametrize("grid_to", [(6, 6), (2, 3), (4, 4)])
def test_resize_pos_embedding_matches_numpy(grid_to):
  pos = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
  resized = vit.resize_pos_embedding(jnp.asarray(pos), (4, 4), grid_to)
  ref = naive_bilinear(pos.reshape(4, 4, 5), *grid_to).reshape(-1, 5)
  np.testing.assert_allclose(resized, ref, rtol=1e-5, atol=1e-5)


def test_other_resolution_runs_with_resized_positions():
  model, variables = build(tiny_config())
  images, _ = make_inputs(size=24)
  out = run(model, variables, images, method="encode_image")
  assert tuple(out["grid"]) == (6, 6) and out["tokens"].shape == (2, 36, 32)
  assert np.all(np.isfinite(out["embedding"]))


def test_patch_dropout_only_at_train():
  config = tiny_config(**{"image.patch_dropout": 0.5})
  model, variables = build(config)
  plain = models.get_model(tiny_config())
  images, _ = make_inputs()
  evaluated = run(model, variables, images, method="encode_image")
  reference = run(plain, variables, images, method="encode_image")
  assert_trees_close(evaluated["tokens"], reference["tokens"])

  def train(key):
    return run(model, variables, images, train=True, method="encode_image",
               rngs={"dropout": key})
  a, b = train(jax.random.key(1)), train(jax.random.key(2))
  assert a["tokens"].shape == (2, 8, 32) and tuple(a["grid"]) == (4, 4)
  assert not np.allclose(a["pooled"], b["pooled"])
  assert not np.allclose(a["pooled"], evaluated["pooled"])


def test_drop_patches_keeps_an_ordered_subset():
  x = jnp.broadcast_to(jnp.arange(10.0)[None, :, None], (3, 10, 2))
  tokens, indices = vit.drop_patches(x, 4, jax.random.key(0))
  kept = np.asarray(tokens)[..., 0]
  np.testing.assert_array_equal(indices, kept)
  assert kept.shape == (3, 4)
  assert np.all(np.diff(kept, axis=1) > 0) and np.all((kept >= 0) & (kept < 10))


# --------------------------------------------------------------------------------
# Text tower.

def test_valid_lengths_and_pool_match_numpy():
  tokens = np.array([[5, 6, 3, 0, 0], [4, 0, 7, 3, 0], [0, 0, 0, 0, 0], [4, 5, 6, 7, 3]])
  lengths = np.asarray(layers.valid_lengths(jnp.asarray(tokens)))
  np.testing.assert_array_equal(lengths, [3, 4, 0, 5])
  x = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
  lengths = np.array([3, 4, 1, 5])
  expected = {
      "cls": x[:, 0], "gap": x[:, 1:].mean(1),
      "eot": np.stack([x[b, n - 1] for b, n in enumerate(lengths)]),
      "max": np.stack([x[b, :n].max(0) for b, n in enumerate(lengths)]),
      "mean": np.stack([x[b, :n].mean(0) for b, n in enumerate(lengths)]),
  }
  for kind, ref in expected.items():
    got = layers.pool(jnp.asarray(x), jnp.asarray(lengths, jnp.int32), kind)
    np.testing.assert_allclose(got, ref, rtol=1e-6, err_msg=kind)
  with pytest.raises(ValueError, match="Unknown pooling"):
    layers.pool(jnp.asarray(x), None, "first")


@pytest.mark.parametrize("pooling,causal", [
    ("eot", True), ("max", True), ("mean", False), ("eot", False), ("max", False)])
def test_padding_never_changes_text_features(pooling, causal):
  model, variables = build(tiny_config(**{"text.pooling": pooling, "text.causal": causal}))
  short = jnp.array([[9, 17, 23, EOS, PAD]], jnp.int32)
  long = jnp.array([[9, 17, 23, EOS, PAD, PAD, PAD, PAD]], jnp.int32)
  a = run(model, variables, short, method="encode_text")
  b = run(model, variables, long, method="encode_text")
  for key in ("embedding", "pooled", "cls_layers"):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
  np.testing.assert_allclose(a["tokens"][:, :4], b["tokens"][:, :4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask(causal):
  model, variables = build(tiny_config(**{"text.causal": causal}))
  a = jnp.array([[9, 17, 23, 30, EOS, PAD, PAD, PAD]], jnp.int32)
  b = a.at[0, 2].set(41)
  ta = run(model, variables, a, method="encode_text")["tokens"]
  tb = run(model, variables, b, method="encode_text")["tokens"]
  assert not np.allclose(ta[:, 2:5], tb[:, 2:5])
  assert np.allclose(ta[:, :2], tb[:, :2], atol=1e-6) == causal


def test_text_norm_of_last_layer_is_eot_pooled():
  model, variables = build(tiny_config())
  _, tokens = make_inputs()
  out = run(model, variables, tokens, method="encode_text")
  normed = run(model, variables, out["cls_layers"][-1], method="text_norm")
  np.testing.assert_allclose(normed, out["pooled"], rtol=1e-5, atol=1e-5)


def test_too_long_tokens_raise():
  model, variables = build(tiny_config())
  with pytest.raises(ValueError, match="max_len=8"):
    model.apply(variables, jnp.ones((1, 9), jnp.int32), method="encode_text")


# --------------------------------------------------------------------------------
# One block against a NumPy transformer block.

def numpy_block(p, x, lengths, causal):
  norm = numpy_layer_norm
  erf = np.vectorize(math.erf)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  qkv = np.einsum("btw,wkhd->btkhd", norm(x, p["norm1"]), p["attn"]["qkv"]["kernel"])
  qkv += p["attn"]["qkv"]["bias"]
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  t = np.arange(x.shape[1])
  allowed = t[None, None, None, :] < lengths[:, None, None, None]
  if causal:
    allowed = allowed & (t[None, None, None, :] <= t[None, None, :, None])
  logits = np.where(allowed, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  att = np.einsum("bhqk,bkhd->bqhd", weights, v)
  x = x + np.einsum("bqhd,hdw->bqw", att, p["attn"]["out"]["kernel"]) + p["attn"]["out"]["bias"]
  h = norm(x, p["norm2"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  return x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


@pytest.mark.parametrize("causal", [True, False])
def test_block_matches_numpy(causal):
  block = layers.Block(mlp_dim=24, heads=2, readout="mean", causal=causal)
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  lengths = np.array([3, 5], np.int32)
  params = nn.unbox(jax.jit(block.init)(jax.random.key(0), x, lengths))
  y, readout = jax.jit(block.apply)(params, x, lengths)
  ref = numpy_block(params["params"], x.astype(np.float64), lengths, causal)
  np.testing.assert_allclose(y[0, :3], ref[0, :3], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(y[1], ref[1], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(readout, [ref[0, :3].mean(0), ref[1].mean(0)], rtol=1e-4,
                             atol=1e-5)


# --------------------------------------------------------------------------------
# Execution options: scan, remat, bfloat16.

def stack_blocks(tower_params, depth):
  """Per-block params `encoder/block_i` -> scanned `encoder/blocks` layout."""
  tower_params = dict(tower_params)
  blocks = [tower_params["encoder"][f"block_{i}"] for i in range(depth)]
  tower_params["encoder"] = {"blocks": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}
  return tower_params


def test_scan_equals_loop_with_relaid_params():
  model, variables = build(tiny_config())
  scanned = models.get_model(tiny_config(scan=True))
  params = dict(variables["params"])
  params["img"] = stack_blocks(params["img"], 2)
  params["txt"] = stack_blocks(params["txt"], 2)
  shapes = jax.eval_shape(scanned.init, jax.random.key(0), *make_inputs())
  assert jax.tree.structure(nn.unbox(shapes)["params"]) == jax.tree.structure(params)
  images, tokens = make_inputs()
  loop = run(model, variables, images, tokens)
  scan = run(scanned, {"params": params}, images, tokens)
  assert_trees_close(loop, scan, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots", True)])
def test_remat_gives_identical_outputs_and_grads(remat, scan):
  model, variables = build(tiny_config(scan=scan))
  rematted = models.get_model(tiny_config(scan=scan, remat=remat))
  images, tokens = make_inputs()

  def loss(params, m):  # the image tower only: the text tower runs the same Encoder
    img = m.apply(params, images, method="encode_image")
    return jnp.sum(img["embedding"] @ img["embedding"][::-1].T) + jnp.sum(
        img["cls_layers"] ** 2) * 1e-3

  value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables, model)
  value_r, grads_r = jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables, rematted)
  np.testing.assert_allclose(value, value_r, rtol=1e-6)
  assert_trees_close(grads, grads_r, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  model32, variables = build(tiny_config())
  model16, variables16 = build(tiny_config(dtype="bfloat16"))
  assert {x.dtype for x in jax.tree.leaves(variables16)} == {jnp.dtype(jnp.float32)}
  images, tokens = make_inputs()
  img16, txt16 = run(model16, variables, images, tokens)
  img32, txt32 = run(model32, variables, images, tokens)
  assert img16["embedding"].dtype == jnp.float32 and txt16["embedding"].dtype == jnp.float32
  assert img16["tokens"].dtype == jnp.bfloat16 and txt16["cls_layers"].dtype == jnp.bfloat16
  np.testing.assert_allclose(img16["embedding"], img32["embedding"], atol=0.05)
  np.testing.assert_allclose(txt16["embedding"], txt32["embedding"], atol=0.05)


@pytest.mark.parametrize("features,names,x_shape", [
    ((3, 4, 8), ("embed", None, "heads", "kv"), (2, 5, 32)),  # width -> q/k/v heads
    ((32,), ("heads", "kv", "embed"), (2, 5, 4, 8)),  # heads -> width
])
def test_dense_nd_matches_numpy(features, names, x_shape):
  n_in = len(names) - len(features)
  layer = layers.DenseNd(features, names, nn.initializers.normal(1.0))
  x = jax.random.normal(jax.random.key(0), x_shape)
  variables = layer.init(jax.random.key(1), x)
  kernel = np.asarray(nn.unbox(variables["params"]["kernel"]), np.float64)
  bias = np.asarray(nn.unbox(variables["params"]["bias"]), np.float64)
  assert kernel.shape == x_shape[-n_in:] + features and bias.shape == features
  assert variables["params"]["kernel"].names == names
  assert variables["params"]["bias"].names == names[n_in:]
  bias = bias + 1.0  # zero-initialised: give it a value the check can see
  params = {"kernel": kernel, "bias": bias}
  expected = np.tensordot(np.asarray(x, np.float64), kernel, axes=n_in) + bias
  np.testing.assert_allclose(layer.apply({"params": params}, x), expected, rtol=1e-5,
                             atol=1e-5)


def test_split_over_devices_follows_rules_and_mesh():
  assert not layers.split_over_devices("heads")  # no mesh
  mesh = jax.make_mesh((4, 2), ("data", "model"), (jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    assert layers.split_over_devices("heads")
    assert layers.split_over_devices(None, "mlp")
    assert not layers.split_over_devices("embed", "kv", None)
  flat = jax.make_mesh((8, 1), ("data", "model"), (jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(flat), nn.logical_axis_rules(RULES):
    assert not layers.split_over_devices("heads")


def test_dense_nd_keeps_sharded_heads_in_place():
  """With the heads split over devices the q/k/v kernel is not merged into a matrix,
  which would gather it: its gradient needs no all-gather, only the reduction over the
  batch shards."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), (jax.sharding.AxisType.Auto,) * 2)
  layer = layers.DenseNd((3, 4, 8), ("embed", None, "heads", "kv"),
                         nn.initializers.normal(1.0))
  x = jax.random.normal(jax.random.key(0), (8, 5, 32))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    abstract = jax.eval_shape(layer.init, jax.random.key(1), x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    variables = jax.jit(layer.init, out_shardings=shardings)(jax.random.key(1), x)
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))

    def loss(params, x):
      return jnp.sum(layer.apply({"params": params}, x) ** 2)
    params = nn.unbox(variables["params"])
    hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    grads = jax.jit(jax.grad(loss))(params, x)
  assert "all-gather" not in hlo and "all-reduce" in hlo
  expected = jax.grad(loss)(jax.device_get(params), jax.device_get(x))
  assert_trees_close(grads, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masking", ["none", "lengths", "mask"])
def test_xla_attention_equals_jax_dot_product_attention(dtype, causal, masking):
  """hvla's 'xla' attention computes jax.nn.dot_product_attention's function, values and
  gradients, with every kind of masking (a row with no valid key included)."""
  b, t, h, d = 3, 7, 2, 8
  q, k, v = (jax.random.normal(key, (b, t, h, d), dtype)
             for key in jax.random.split(jax.random.key(0), 3))
  options = {"none": {}, "lengths": {"key_value_seq_lengths": jnp.array([7, 3, 0])},
             "mask": {"mask": jax.random.bernoulli(jax.random.key(1), 0.6, (b, 1, t, t))}}
  ours = {"none": {}, "lengths": {"lengths": jnp.array([7, 3, 0])},
          "mask": {"mask": options["mask"]["mask"]}}

  def loss(attention, q, k, v):
    return jnp.sum(jnp.sin(attention(q, k, v).astype(jnp.float32)))

  def theirs_fn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla",
                                        **options[masking])

  def ours_fn(q, k, v):
    return layers.dot_product_attention(q, k, v, causal=causal, **ours[masking])

  tolerance = 1e-6 if dtype == "float32" else 2 ** -5  # a few bfloat16 steps near 1
  np.testing.assert_allclose(np.asarray(ours_fn(q, k, v), np.float32),
                             np.asarray(theirs_fn(q, k, v), np.float32), atol=tolerance)
  grads = [jax.grad(loss, argnums=(1, 2, 3))(f, q, k, v) for f in (ours_fn, theirs_fn)]
  for mine, reference in zip(*grads):
    np.testing.assert_allclose(np.asarray(mine, np.float32), np.asarray(reference, np.float32),
                               atol=tolerance * 4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_softmax_to_matches_numpy_and_differentiates_its_output(dtype):
  """Values: the float32 softmax rounded to `dtype`; gradient: the softmax Jacobian
  p * (g - <g, p>) at the returned probabilities p, by hand in float64. A masked
  logit (float32's minimum) gets probability 0 and gradient 0."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5)).astype(np.float32) * 3
  logits[1, 2] = np.finfo(np.float32).min
  g = rng.normal(size=(3, 5))
  probs = layers.softmax_to(jnp.asarray(logits), jnp.dtype(dtype))
  assert probs.dtype == jnp.dtype(dtype)
  e = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
  expected = np.asarray(jnp.asarray(e / e.sum(-1, keepdims=True), dtype), np.float64)
  rounding = 1e-6 if dtype == "float32" else 2 ** -8  # one step of `dtype` at most
  np.testing.assert_allclose(np.asarray(probs, np.float64), expected, rtol=rounding)
  grad = jax.grad(lambda x: jnp.sum(layers.softmax_to(x, jnp.dtype(dtype)).astype(
      jnp.float32) * g.astype(np.float32)))(jnp.asarray(logits))
  g = np.asarray(jnp.asarray(g, dtype), np.float64)  # the cotangent arrives in `dtype`
  p = np.asarray(probs, np.float64)
  by_hand = p * (g - np.sum(g * p, axis=-1, keepdims=True))
  np.testing.assert_allclose(grad, by_hand, rtol=1e-5, atol=1e-6)
  assert grad[1, 2] == 0


def test_bfloat16_attention_saves_no_float32_weights(monkeypatch):
  """For the backward pass, bfloat16 attention keeps its [B, H, T, S] weights in
  bfloat16 only: a stack's train-step memory is below the same stack on
  jax.nn.dot_product_attention's XLA path, which also keeps them in float32, by most
  of one float32 copy per block (0.84 of it here; 0.08 with autodiff's softmax
  gradient)."""
  b, t, heads, depth = 4, 128, 4, 4
  encoder = layers.Encoder(depth=depth, mlp_dim=64, heads=heads, readout="cls",
                           dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (b, t, 64))
  variables = encoder.init(jax.random.key(1), x)

  def temp_bytes():
    def loss(variables, x):
      return jnp.sum(encoder.apply(variables, x)[0].astype(jnp.float32) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(variables, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  ours = temp_bytes()
  monkeypatch.setattr(layers, "dot_product_attention", lambda q, k, v, **_: (
      jax.nn.dot_product_attention(q, k, v, implementation="xla")))
  float32_weights = depth * b * heads * t * t * 4
  assert temp_bytes() - ours > float32_weights / 2


def test_split_qkv_slices_and_concatenates_its_gradient():
  """q, k, v are the fused projection's three slices; the gradient is put back together
  by one concatenation, not by summing zero-padded slices."""
  qkv = jax.random.normal(jax.random.key(0), (2, 5, 3, 4, 8))
  for i, part in enumerate(layers.split_qkv(qkv)):
    np.testing.assert_array_equal(part, qkv[:, :, i])

  def loss(qkv):
    q, k, v = layers.split_qkv(qkv)
    return jnp.sum(q * k * jnp.sin(v))
  hlo = jax.jit(jax.grad(loss)).lower(qkv).as_text()
  assert "concatenate" in hlo and "pad" not in hlo
  q, k, v = (np.asarray(qkv[:, :, i], np.float64) for i in range(3))
  expected = np.stack([k * np.sin(v), q * np.sin(v), q * k * np.cos(v)], axis=2)
  np.testing.assert_allclose(jax.grad(loss)(qkv), expected, rtol=1e-5, atol=1e-6)


def test_attention_implementation_reaches_every_attention_call(monkeypatch):
  """`model.attention` is passed to every `dot_product_attention` of both towers."""
  monkeypatch.setattr(models.jax, "default_backend", lambda: "gpu")  # pass the check
  model = models.get_model(tiny_config(attention="cudnn", dtype="bfloat16"))
  seen, attention = [], jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    seen.append(implementation)
    return attention(*args, implementation="xla", **kwargs)  # cuDNN is GPU-only
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  images, tokens = make_inputs()
  jax.eval_shape(model.init, jax.random.key(0), images, tokens)
  assert seen == ["cudnn"] * 4  # 2 image blocks + 2 text blocks


def test_cudnn_attention_is_refused_where_it_cannot_run(monkeypatch):
  monkeypatch.setattr(models.jax, "default_backend", lambda: "cpu")
  with pytest.raises(ValueError, match="model.attention: 'cudnn' needs an NVIDIA GPU"):
    models.get_model(tiny_config(attention="cudnn", dtype="bfloat16"))
  monkeypatch.setattr(models.jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="model.dtype: .*needs bfloat16"):
    models.get_model(tiny_config(attention="cudnn"))


# --------------------------------------------------------------------------------
# Config validation and the registry.

@pytest.mark.parametrize("key,value", [
    ("image.width", 30),  # heads=4
    ("image.image_size", 18),
    ("image.pool", "avg"),
    ("image.patch_dropout", 1.0),
    ("image.depth", 0),
    ("text.width", 33),
    ("text.pooling", "first"),
    ("text.name", "lstm"),
    ("image.name", "resnet9"),
    ("remat", "some"),
    ("dtype", "float16"),
    ("embed_dim", 0),
    ("attention", "flash"),
])
def test_invalid_values_raise_naming_the_key(key, value):
  config = tiny_config(**{"image.heads": 4, key: value})
  with pytest.raises(ValueError, match=f"model.{key}"):
    models.get_model(config)


@pytest.mark.parametrize("key", ["image.patch", "text.pool", "depth"])
def test_unknown_keys_raise_naming_the_key(key):
  config = tiny_config()
  *parents, leaf = key.split(".")
  node = config[parents[0]] if parents else config
  node[leaf] = 1
  with pytest.raises(ValueError, match=f"model.{key}"):
    models.get_model(config)


def test_register_tower_selects_by_name():
  class WideGapViT(vit.ViT):
    pass
  models.register_tower("image", "wide_gap_vit")(WideGapViT)
  try:
    model = models.get_model(tiny_config(**{"image.name": "wide_gap_vit"}))
    assert isinstance(model.img, WideGapViT)
  finally:
    del models._TOWERS["image"]["wide_gap_vit"]
  with pytest.raises(ValueError, match="tower kind"):
    models.register_tower("audio", "x")


# --------------------------------------------------------------------------------
# Sharding annotations.

RULES = (
    ("act_batch", "data"), ("act_len", None), ("act_embed", None), ("act_mlp", "model"),
    ("act_heads", "model"), ("embed", None), ("mlp", "model"), ("heads", "model"),
    ("kv", None), ("vocab", "model"), ("joint", None), ("patch", None), ("layers", None),
)


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_axes_and_sharded_apply_matches(scan):
  config = tiny_config(scan=scan)
  model = models.get_model(config)
  images, tokens = make_inputs(batch=4)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
  specs = nn.get_partition_spec(abstract)
  names = {"embed", "mlp", "heads", "kv", "vocab", "joint", "patch", "layers", None}
  boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in boxed)
  for box in boxed:
    assert len(box.names) == box.value.ndim and set(box.names) <= names
  blocks = specs["params"]["img"]["encoder"]
  if scan:
    assert all(s[0] == "layers" for s in jax.tree.leaves(
        blocks, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))

  mesh = jax.make_mesh((4, 2), ("data", "model"), (jax.sharding.AxisType.Auto,) * 2)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), images, tokens)
    sharded = jax.jit(model.apply)(nn.unbox(variables), images, tokens)
  qkv = variables["params"]["txt"]["encoder"]["blocks" if scan else "block_0"]["attn"]["qkv"]
  assert qkv["kernel"].value.sharding.spec[-2] == "model"
  expected = run(model, nn.unbox(variables), images, tokens)
  assert_trees_close(sharded, expected, rtol=1e-5, atol=1e-5)


def test_vit_roi_embedding_is_the_official_proj_pre():
  """Official VisionTransformer.proj_pre: a bias-free [F + 4, W] matrix, normal with std
  W**-0.5 at init."""
  config = tiny_config(**{"image.width": 64, "pyramid.roi.source": "features",
                          "pyramid.roi.feature_dim": 252})
  _, variables = build(config)
  linear = variables["params"]["img"]["roi_embedding"]
  assert sorted(linear) == ["kernel"] and linear["kernel"].shape == (256, 64)
  np.testing.assert_allclose(np.std(linear["kernel"]), 64**-0.5, rtol=0.05)
