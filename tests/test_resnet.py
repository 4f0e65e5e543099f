"""Tests of hvla.models.resnet: CLIP's modified ResNet tower, against a NumPy reference."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvla.config import DEFAULT_RULES
from hvla.models import resnet, vit
from hvla.models.text import TextTransformer
from hvla.models.two_towers import TwoTowers

SHARED = dict(dtype=jnp.float32, remat="none")
IMAGE = 64  # a 2x2 final grid


def tiny_config(**changes):
  c = resnet.default_rn50_config()
  c.update(image_size=IMAGE, layers=(1, 2, 1, 1), width=8, heads=4, output_dim=24,
           norm_groups=2)
  c.update(changes)
  return c


def tiny_tower(**shared):
  return resnet.ResNet.from_config(tiny_config(), **{**SHARED, **shared})


def images(size=IMAGE, batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)),
                     jnp.float32)


def random_params(model, *inputs, method=None):
  """Random float32 parameters of `model`'s shapes (no init compile); norm scales near 1."""
  init = functools.partial(model.init, method=method)
  shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0), *inputs))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map_with_path(
      lambda path, x: (float(path[-1].key == "scale")
                       + 0.1 * rng.normal(size=x.shape)).astype(np.float32), shapes)


@functools.cache
def tiny_params():
  return random_params(tiny_tower(), images())


ROI_FEATURES = 6  # stored region features; each region's input adds its 4 box numbers


def roi_tower():
  return resnet.ResNet.from_config(
      tiny_config(), pyramid=dict(roi="features", roi_feature_dim=ROI_FEATURES), **SHARED)


def with_rois(m, x, regions, mask):
  return m(x), m.rois(regions, mask)


def roi_inputs(batch=2, regions=4, seed=2):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(batch, regions, ROI_FEATURES + vit.BOX_DIM)),
                      jnp.float32), jnp.ones((batch, regions), bool))


@functools.cache
def roi_params():
  """The tower's parameters with those of its ROI path."""
  return random_params(roi_tower(), images(), *roi_inputs(), method=with_rois)


def num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------
# An independent NumPy forward pass (float64).

def np_conv(x, kernel, stride=1):
  """Zero padding k // 2 on both sides, then every stride-th output (torch's conv)."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = x.shape[1:3]
  out = sum(np.einsum("bhwc,cd->bhwd", xp[:, i:i + h, j:j + w], kernel[i, j])
            for i in range(k) for j in range(k))
  return out[:, ::stride, ::stride]


def np_group_norm(x, norm, groups):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
      g.var(axis=(1, 2, 4), keepdims=True) + 1e-5)
  return g.reshape(x.shape) * norm["scale"] + norm["bias"]


def np_avg_pool(x, s):
  b, h, w, c = x.shape
  h, w = h // s, w // s
  return x[:, :h * s, :w * s].reshape(b, h, s, w, s, c).mean(axis=(2, 4))


def np_attention_pool(p, x, native_grid, grid):
  """x [B, P, C] -> outputs [B, 1 + P, output_dim], the mean query first."""
  x = np.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
  pos = np.asarray(p["pos_embedding"], np.float64)
  if grid is None:  # a set: no positions, a LayerNorm instead (PyramidCLIP's ROI path)
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    x = x * p["set_norm"]["scale"] + p["set_norm"]["bias"]
  else:
    spatial = np.asarray(vit.resize_pos_embedding(
        jnp.asarray(pos[1:], jnp.float32), native_grid, grid), np.float64)
    x = x + np.concatenate([pos[:1], spatial])
  q, k, v = (np.einsum("blc,chd->blhd", x, p["qkv"]["kernel"][:, i]) + p["qkv"]["bias"][i]
             for i in range(3))
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  y = np.einsum("bhqk,bkhd->bqhd", weights, v)
  return np.einsum("bqhd,hdo->bqo", y, p["out"]["kernel"]) + p["out"]["bias"]


def np_tower(params, x, config):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  groups = config.norm_groups

  def conv_norm(x, block, i, stride=1):
    return np_group_norm(np_conv(x, block[f"conv{i}"]["kernel"], stride), block[f"norm{i}"],
                         groups)

  relu = lambda a: np.maximum(a, 0)  # noqa: E731
  x = np.asarray(x, np.float64)
  stem = p["conv_stem"]
  x = relu(conv_norm(x, stem, 1, stride=2))
  x = np_avg_pool(relu(conv_norm(relu(conv_norm(x, stem, 2)), stem, 3)), 2)
  for i, blocks in enumerate(config.layers):
    for j in range(blocks):
      block = p[f"stages_{i}"][f"block_{j}"]
      stride = 2 if i > 0 and j == 0 else 1
      y = relu(conv_norm(relu(conv_norm(x, block, 1)), block, 2))
      y = conv_norm(np_avg_pool(y, stride), block, 3)
      assert ("shortcut_conv" in block) == (j == 0)
      if j == 0:
        x = np_group_norm(np_conv(np_avg_pool(x, stride), block["shortcut_conv"]["kernel"]),
                          block["shortcut_norm"], groups)
      x = relu(x + y)
  b, h, w, c = x.shape
  side = config.image_size // 32
  out = np_attention_pool(p["attn_pool"], x.reshape(b, h * w, c), (side, side), (h, w))
  return out[:, 0], out[:, 1:], (h, w)


# --------------------------------------------------------------------------------

def clip_rn50_parameter_count(width=64, stages=(3, 4, 6, 3), output_dim=1024, grid=7):
  """CLIP's RN50 visual encoder counted by hand (norms: a scale and a bias per channel)."""
  def conv_norm(k, cin, cout):
    return k * k * cin * cout + 2 * cout
  total = (conv_norm(3, 3, width // 2) + conv_norm(3, width // 2, width // 2)
           + conv_norm(3, width // 2, width))
  cin = width
  for i, blocks in enumerate(stages):
    planes = width * 2**i
    for j in range(blocks):
      total += (conv_norm(1, cin, planes) + conv_norm(3, planes, planes)
                + conv_norm(1, planes, 4 * planes))
      total += conv_norm(1, cin, 4 * planes) if j == 0 else 0
      cin = 4 * planes
  # Attention pool: positions, q/k/v with biases, output projection with bias.
  return total + (1 + grid * grid) * cin + 3 * (cin * cin + cin) + cin * output_dim + output_dim


def test_rn50_parameter_count_matches_clip():
  model = resnet.ResNet.from_config(resnet.default_rn50_config(), **SHARED, scan=False)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  params = nn.unbox(shapes)["params"]
  count = num_params(params)
  assert count == clip_rn50_parameter_count()
  # CLIP's RN50 visual encoder has 38.3M parameters, 14.8M of them in the attention pool.
  assert 38_300_000 <= count <= 38_330_000
  assert num_params(params["attn_pool"]) == 14_789_632
  assert sorted(params) == ["attn_pool", "conv_stem", "stages_0", "stages_1", "stages_2",
                            "stages_3"]
  assert [len(params[f"stages_{i}"]) for i in range(4)] == [3, 4, 6, 3]


@pytest.mark.parametrize("size", [IMAGE, 96])  # native 2x2 grid, then a resized 3x3 one
def test_tower_matches_numpy_reference(size):
  model = tiny_tower()
  params = tiny_params()
  x = images(size)
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  pooled, tokens, grid = np_tower(params, x, tiny_config())
  side = size // 32
  assert out["grid"] == grid == (side, side)
  assert out["pooled"].shape == (2, 24) and out["tokens"].shape == (2, side * side, 24)
  np.testing.assert_allclose(out["pooled"], pooled, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(out["tokens"], tokens, rtol=2e-4, atol=2e-4)
  np.testing.assert_array_equal(out["cls_layers"], out["pooled"][None])


def test_trunk_then_attnpool_is_the_whole_tower():
  model = tiny_tower()
  params = tiny_params()
  x = images(96)

  def pieces(m, x):
    assert m.stem(x).shape == (2, 24, 24, 8)
    feature_map = m.trunk(x)
    assert feature_map.shape == (2, 3, 3, 256)
    tokens, grid = resnet.flatten(feature_map)
    return m.attnpool(tokens, grid)

  pooled, tokens = jax.jit(lambda p, x: model.apply({"params": p}, x, method=pieces))(params, x)
  whole = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  np.testing.assert_allclose(pooled, whole["pooled"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(tokens, whole["tokens"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size, sides", [(64, (16, 16, 8, 4, 2)), (72, (18, 18, 9, 4, 2))])
def test_stage_strides_and_widths(size, sides):
  model = tiny_tower()
  _, state = jax.eval_shape(lambda p, x: model.apply(
      {"params": p}, x, capture_intermediates=True, mutable=["intermediates"]),
      tiny_params(), images(size))
  inter = state["intermediates"]
  shapes = [inter["conv_stem"]["__call__"][0].shape] + [
      inter[f"stages_{i}"]["__call__"][0].shape for i in range(4)]
  assert shapes == [(2, s, s, c) for s, c in zip(sides, (8, 32, 64, 128, 256))]


def test_downsampling_is_anti_aliased():
  """Only the stem's first convolution has a stride; stages downsample by average pools."""
  model = tiny_tower()
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(tiny_params(), images())
  strides = [tuple(e.params["window_strides"]) for e in jaxpr.eqns
             if e.primitive.name == "conv_general_dilated"]
  # 3 stem convolutions, 3 per block (5 blocks) and one shortcut per stage.
  assert len(strides) == 3 + 3 * 5 + 4
  assert strides[0] == (2, 2) and set(strides[1:]) == {(1, 1)}


def test_flatten_is_raster_order():
  fmap = jnp.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
  tokens, grid = resnet.flatten(fmap)
  assert grid == (3, 4) and tokens.shape == (2, 12, 5)
  np.testing.assert_array_equal(tokens[1, 2 * 4 + 3], fmap[1, 2, 3])


def test_attention_implementation_reaches_the_attention_pool(monkeypatch):
  seen, attention = [], jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    seen.append(implementation)
    return attention(*args, implementation="xla", **kwargs)  # cuDNN is GPU-only
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  jax.eval_shape(tiny_tower(attention="cudnn").init, jax.random.key(0), images())
  assert seen == ["cudnn"]


def test_attnpool_of_a_set_matches_reference_and_ignores_order():
  model = roi_tower()
  params = roi_params()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 256)), jnp.float32)
  perm = np.array([3, 0, 4, 1, 2])

  @functools.partial(jax.jit, static_argnums=2)
  def pool(p, x, grid=None):
    return model.apply({"params": p}, x, method=lambda m, x: m.attnpool(x, grid))

  pooled, tokens = pool(params, x)
  expected = np_attention_pool(jax.tree.map(np.asarray, params["attn_pool"]),
                               np.asarray(x, np.float64), (2, 2), None)
  np.testing.assert_allclose(pooled, expected[:, 0], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(tokens, expected[:, 1:], rtol=2e-4, atol=2e-4)
  pooled_p, tokens_p = pool(params, x[:, perm])
  np.testing.assert_allclose(pooled_p, pooled, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tokens_p, tokens[:, perm], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="do not fill the grid"):
    pool(params, x, (2, 2))


def test_images_smaller_than_the_stride_are_rejected():
  with pytest.raises(ValueError, match="at least 32x32"):
    jax.eval_shape(tiny_tower().init, jax.random.key(0), images(16))


@pytest.mark.parametrize("key, value, shared, match", [
    ("layers", (3, 4, 6), {}, "model.image.layers"),
    ("layers", (1, 0, 1, 1), {}, "model.image.layers"),
    ("width", 10, {}, r"model.image.width: 10 is not divisible by 2 \* model.image.norm_groups"),
    ("width", 0, {}, "model.image.width"),
    ("heads", 5, {}, "model.image.heads: 5 does not divide"),
    ("output_dim", -1, {}, "model.image.output_dim"),
    ("image_size", 100, {}, "model.image.image_size: 100 is not a multiple"),
    ("norm_groups", 0, {}, "model.image.norm_groups"),
    ("depth", 12, {}, "model.image.depth"),
    ("width", 8, dict(scan=True), "model.scan"),
])
def test_config_errors_name_the_key(key, value, shared, match):
  config = tiny_config()
  config[key] = value
  with pytest.raises(ValueError, match=match):
    resnet.ResNet.from_config(config, **SHARED, **shared)


def test_config_lists_become_tuples():
  tower = resnet.ResNet.from_config(tiny_config(layers=[1, 1, 1, 1]), **SHARED)
  assert tower.layers == (1, 1, 1, 1) and tower.native_grid == (2, 2)
  assert tower.feature_width == 256


def test_every_parameter_has_logical_axis_names():
  boxed = jax.eval_shape(tiny_tower().init, jax.random.key(0), images())["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  assert all(len(x.names) == len(x.value.shape) for x in leaves)
  kernel = boxed["stages_1"]["block_0"]["conv2"]["kernel"]
  assert kernel.names == (None, None, None, "embed")
  assert boxed["attn_pool"]["qkv"]["kernel"].names == ("embed", None, "heads", "kv")


def test_sharded_apply_matches_unsharded():
  model = tiny_tower()
  x = images(batch=4)
  unsharded = tiny_params()
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    # Tracing init under the rules applies every parameter's constraint to its shape.
    specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
    params = jax.device_put(
        unsharded, nn.logical_to_mesh_sharding(specs, mesh, DEFAULT_RULES))
    sharded = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  assert params["attn_pool"]["qkv"]["kernel"].sharding.spec == jax.P("fsdp", None, "model", None)
  expected = jax.jit(lambda p, x: model.apply({"params": p}, x))(unsharded, x)
  for key in ("pooled", "tokens"):
    np.testing.assert_allclose(sharded[key], expected[key], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  model = tiny_tower(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images())
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(shapes))} == {jnp.dtype(jnp.float32)}
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(tiny_params(), images(96))
  assert out["pooled"].dtype == out["tokens"].dtype == jnp.bfloat16
  assert out["tokens"].shape == (2, 9, 24) and out["grid"] == (3, 3)
  assert np.all(np.isfinite(np.asarray(out["pooled"], np.float32)))


def test_remat_checkpoints_every_block():
  model = tiny_tower(remat="full")
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(tiny_params(), images())
  # jax.checkpoint's primitive is named `remat2` (`checkpoint` in some versions).
  assert sum(e.primitive.name in ("remat2", "checkpoint") for e in jaxpr.eqns) == 5


def test_tokens_share_the_image_projection_in_the_dual_encoder():
  model = TwoTowers(img=tiny_tower(), txt=TextTransformer(
      vocab_size=16, max_len=4, width=8, depth=1, heads=2), embed_dim=6)
  tokens = jnp.array([[5, 6, 3, 0], [7, 3, 0, 0]], jnp.int32)
  params = random_params(model, images(), tokens)
  out = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))(
      params, images(96))
  assert out["embedding"].shape == (2, 6) and out["token_embeddings"].shape == (2, 9, 6)
  np.testing.assert_allclose(np.linalg.norm(out["token_embeddings"], axis=-1), 1, rtol=1e-5)


def test_roi_path_matches_a_hand_computation():
  """Official AttentionPool2d with isROI: a bias-free linear map, the mean region
  prepended, a LayerNorm, attention without positions; padded regions are left out."""
  model, params = roi_tower(), roi_params()
  regions, _ = roi_inputs()
  mask = np.array([[True, True, True, True], [True, False, True, False]])
  got = jax.jit(lambda p, r, m: model.apply({"params": p}, r, m, method="rois"))(
      params, regions, mask)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  assert sorted(p["roi_embedding"]) == ["kernel"]
  assert sorted(p["attn_pool"]["set_norm"]) == ["bias", "scale"]
  for b in range(2):
    x = np.asarray(regions[b], np.float64)[mask[b]] @ p["roi_embedding"]["kernel"]
    x = np.concatenate([x.mean(axis=0, keepdims=True), x])
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    x = x * p["attn_pool"]["set_norm"]["scale"] + p["attn_pool"]["set_norm"]["bias"]
    qkv, out = p["attn_pool"]["qkv"], p["attn_pool"]["out"]
    width, _, heads, head_dim = qkv["kernel"].shape
    q, k, v = (x @ qkv["kernel"][:, i].reshape(width, -1) + qkv["bias"][i].reshape(-1)
               for i in range(3))
    mixed = []
    for h in range(heads):  # the mean token's query, head by head
      s = slice(h * head_dim, (h + 1) * head_dim)
      scores = q[0, s] @ k[:, s].T / np.sqrt(head_dim)
      weights = np.exp(scores - scores.max())
      mixed.append(weights / weights.sum() @ v[:, s])
    want = np.concatenate(mixed) @ out["kernel"].reshape(width, -1) + out["bias"]
    np.testing.assert_allclose(got[b], want, rtol=2e-4, atol=2e-4)


def test_roi_embedding_starts_as_the_official_proj_pre():
  """Official init of proj_pre: normal with std feature_width**-0.5."""
  model = roi_tower()
  params = nn.unbox(jax.jit(functools.partial(model.init, method=with_rois))(
      jax.random.key(0), images(), *roi_inputs()))["params"]
  kernel = np.asarray(params["roi_embedding"]["kernel"])
  assert kernel.shape == (ROI_FEATURES + vit.BOX_DIM, 256)
  np.testing.assert_allclose(kernel.std(), 256**-0.5, rtol=0.05)
  assert abs(kernel.mean()) < 0.01
