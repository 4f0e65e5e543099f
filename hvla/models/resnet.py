"""CLIP's modified ResNet image tower, runnable in pieces: stem, trunk, attnpool.

Layout [paper, CLIP]: a stem of three 3x3 convolutions (widths w/2, w/2, w; the first
with stride 2; each followed by a norm and ReLU) and a 2x2 average pool; four stages of
bottleneck blocks (inner widths w, 2w, 4w, 8w, expansion 4, `layers` blocks each);
then an attention pool: the final feature map is flattened, its mean is prepended as a
query token, a learned positional embedding is added, and one multi-head attention
maps the mean token to `output_dim`. Downsampling is anti-aliased: apart from the
stem's first convolution every convolution has stride 1, and a stage's stride is an
average pool placed after the block's 3x3 convolution (before its last 1x1) and before
the shortcut's 1x1 convolution. The trunk downsamples by 32 in all. Convolutions have
no bias; the last norm of every block starts with a zero scale, so each block starts
as its shortcut (CLIP's initialisation).

PyramidCLIP's RN50 split [paper, PyramidCLIP]: f1 = the convolutional trunk
(`trunk`), f2 = the attention pool (`attnpool`); `flatten` turns the trunk's feature map
into the tokens `attnpool` takes, and the three compose to `__call__` exactly. `f1`,
`f2` and `rois` are the same pieces behind the interface the ViT offers.

PyramidCLIP's ROI path (`rois`) [paper, official model code: ModifiedResNet and
AttentionPool2d with isROI]: region features -> a bias-free linear map to the trunk's
width -> their mean prepended -> a LayerNorm -> the attention pool without positional
embedding; the mean token's output is the region set's embedding.

Choices marked [ours]:
- GroupNorm (`norm_groups`, 32 by default) replaces BatchNorm. BatchNorm would need a
  mutable `batch_stats` collection (the train step is a pure `apply({'params': ...})`)
  and, normalising with batch statistics, would mix examples inside `objective.embed`,
  which must stay per-example so that contrastive gradient accumulation is exact and
  results do not depend on how the batch is split over devices. GroupNorm is
  per-example, stateless and identical at train and eval time; it has the same
  parameters as BatchNorm (a scale and a bias per channel), so parameter counts match
  CLIP's, but CLIP's pretrained BatchNorm statistics do not carry over.
- `tokens` are the attention pool applied with every position as a query as well (the
  keys and values are unchanged), so they share the pooled width and the image
  projection; the mean-token row is exactly CLIP's pooled output.
- The positional embedding is resized bilinearly for other resolutions (as in ViT).
- `mask` in `attnpool(tokens, grid=None, mask=None)` leaves padded members of a set
  out of the mean query and out of the keys, so padding never changes the result.
- Convolutions start He-normal; the attention pool's projections and positional
  embedding start normal with std width**-0.5 (CLIP's scale).
- CLIP's attention pool projects straight to the joint space; here its output is the
  tower's pooled width and the dual encoder adds its own image projection on top.

Sharding names: convolution kernels [kh, kw, in, out] carry `embed` on their output
channels only (no mesh axis then has to divide the 3 RGB input channels), norms `embed`,
the attention pool the same names as `layers.Attention`.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from hvla.models import layers
from hvla.models.vit import BOX_DIM, check_roi_fields, resize_pos_embedding

STRIDE = 32  # the trunk's total downsampling
EXPANSION = 4  # bottleneck output width / inner width
NORM_EPSILON = 1e-5


def default_rn50_config():
  """`model.image` for CLIP's RN50 (pair it with `model.embed_dim = 1024`)."""
  return ml_collections.ConfigDict(dict(
      name="resnet", image_size=224, layers=(3, 4, 6, 3), width=64, heads=32,
      output_dim=1024, norm_groups=32))


def flatten(feature_map):
  """[B, h, w, C] -> ([B, h * w, C] in raster order, (h, w))."""
  b, h, w, c = feature_map.shape
  return feature_map.reshape(b, h * w, c), (h, w)


def conv(features, kernel, dtype, name, stride=1):
  """Bias-free convolution with symmetric zero padding kernel // 2 (torch's layout)."""
  return nn.Conv(
      features, (kernel, kernel), strides=stride, padding=kernel // 2, use_bias=False,
      dtype=dtype, name=name, kernel_init=layers.partitioned(
          nn.initializers.he_normal(), None, None, None, "embed"))


def group_norm(groups, dtype, name, scale_init=nn.initializers.ones):
  return nn.GroupNorm(
      num_groups=groups, epsilon=NORM_EPSILON, dtype=dtype, name=name,
      scale_init=layers.partitioned(scale_init, "embed"),
      bias_init=layers.partitioned(nn.initializers.zeros, "embed"))


def avg_pool(x, stride):
  """Non-overlapping stride x stride mean over [B, H, W, C] (floors odd sizes)."""
  return x if stride == 1 else nn.avg_pool(x, (stride, stride), (stride, stride))


def constrain_map(x):
  return layers.constrain(x, "act_batch", None, None, "act_embed")


class Stem(nn.Module):
  """Three 3x3 conv-norm-ReLU layers (the first with stride 2), then a 2x2 average pool."""
  width: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = images
    for i, (features, stride) in enumerate(
        ((self.width // 2, 2), (self.width // 2, 1), (self.width, 1)), start=1):
      x = conv(features, 3, self.dtype, f"conv{i}", stride)(x)
      x = nn.relu(group_norm(self.groups, self.dtype, f"norm{i}")(x))
    return constrain_map(avg_pool(x, 2))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> [avg pool] -> 1x1 residual block, output width EXPANSION * planes."""
  planes: int
  stride: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = self.planes * EXPANSION
    y = conv(self.planes, 1, self.dtype, "conv1")(x)
    y = nn.relu(group_norm(self.groups, self.dtype, "norm1")(y))
    y = conv(self.planes, 3, self.dtype, "conv2")(y)
    y = nn.relu(group_norm(self.groups, self.dtype, "norm2")(y))
    y = conv(width, 1, self.dtype, "conv3")(avg_pool(y, self.stride))
    y = group_norm(self.groups, self.dtype, "norm3", nn.initializers.zeros)(y)
    if self.stride > 1 or x.shape[-1] != width:
      x = conv(width, 1, self.dtype, "shortcut_conv")(avg_pool(x, self.stride))
      x = group_norm(self.groups, self.dtype, "shortcut_norm")(x)
    return constrain_map(nn.relu(y + x))


class Stage(nn.Module):
  """`blocks` bottlenecks; the first one downsamples by `stride` and changes the width."""
  planes: int
  blocks: int
  stride: int
  groups: int
  dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, x):
    block = Bottleneck
    if self.remat != "none":
      block = nn.remat(Bottleneck, policy=layers.REMAT_POLICIES[self.remat])
    for i in range(self.blocks):
      x = block(self.planes, self.stride if i == 0 else 1, self.groups, self.dtype,
                name=f"block_{i}")(x)
    return x


class AttentionPool(nn.Module):
  """Multi-head attention of [mean token; tokens] -> (pooled, tokens).

  `grid` (h, w) says the tokens are a raster-order feature map and adds the positional
  embedding, resized from `native_grid`. None pools an unordered set (PyramidCLIP's
  regions): no positional embedding, but a LayerNorm (`set_norm`) on [mean; tokens]
  [paper, official model code: AttentionPool2d with isROI, its `ln_pre`]. `mask` [B, P]
  (True: real) leaves padded tokens out of the mean query and out of the keys [ours].
  """
  heads: int
  output_dim: int
  native_grid: tuple[int, int]
  dtype: Any = jnp.float32
  attention: str = "xla"  # layers.dot_product_attention's implementation

  @nn.compact
  def __call__(self, x, grid=None, mask=None):
    width = x.shape[-1]
    init = nn.initializers.normal(width**-0.5)
    if mask is None:
      query, keys = jnp.mean(x, axis=1, keepdims=True), None
    else:
      real = jnp.asarray(mask, bool)[..., None]
      count = jnp.maximum(jnp.sum(real, axis=1, keepdims=True), 1).astype(x.dtype)
      query = jnp.sum(jnp.where(real, x, 0), axis=1, keepdims=True) / count
      keys = jnp.pad(real[..., 0], ((0, 0), (1, 0)), constant_values=True)[:, None, None]
    x = jnp.concatenate([query, x], axis=1)
    if grid is None:
      x = layers.layer_norm(self.dtype, "set_norm")(x)
    else:
      if x.shape[1] - 1 != grid[0] * grid[1]:
        raise ValueError(f"{x.shape[1] - 1} tokens do not fill the grid {tuple(grid)}.")
      pos = self.param(
          "pos_embedding", layers.partitioned(init, None, "embed"),
          (1 + self.native_grid[0] * self.native_grid[1], width)).astype(self.dtype)
      x = x + jnp.concatenate([pos[:1], resize_pos_embedding(pos[1:], self.native_grid, grid)])
    x = layers.constrain(x, "act_batch", "act_len", "act_embed")
    head_dim = width // self.heads
    qkv = layers.DenseNd((3, self.heads, head_dim), ("embed", None, "heads", "kv"), init,
                         self.dtype, name="qkv")(x)
    q, k, v = layers.split_qkv(qkv)
    y = layers.DenseNd((self.output_dim,), ("heads", "kv", "embed"), init, self.dtype,
                       name="out")(
        layers.dot_product_attention(q, k, v, mask=keys, implementation=self.attention))
    y = layers.constrain(y, "act_batch", "act_len", "act_embed")
    return y[:, 0], y[:, 1:]


class ResNet(nn.Module):
  """Image tower. `__call__(images, train)` = attnpool(*flatten(trunk(images))).

  Outputs `pooled` [B, output_dim] (the mean query's attention output), `tokens`
  [B, h * w, output_dim] (every feature-map position's attention output, raster
  order), `cls_layers` [1, B, output_dim] (the attention pool is the tower's only
  token-mixing layer and it has no final norm, so its query output is the one layer
  readout: `pooled[None]`) and `grid` (h, w), the final feature map's size.
  """
  image_size: int = 224
  layers: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  heads: int = 32
  output_dim: int = 1024
  norm_groups: int = 32
  roi: str | None = None  # ROI path input: None, 'boxes' or 'features'
  roi_feature_dim: int = 2048  # width of stored region features (roi='features')
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: str = "xla"

  PYRAMID_FIELDS = ("roi", "roi_feature_dim")

  @classmethod
  def from_config(cls, config, *, scan=False, pyramid=None, **shared):
    """`config` is `model.image`; `pyramid` the flat PyramidCLIP fields from
    `model.pyramid` (this tower takes `roi` and `roi_feature_dim`; its f1/f2 split is
    fixed and it has no LeFF)."""
    path = "model.image"
    layers.check(not scan, "model.scan",
                 "the ResNet tower has no stack of identical blocks to scan; set it False")
    pyramid = dict(pyramid or {})
    layers.check(pyramid.pop("f1_depth", None) is None, "model.pyramid.f1_depth",
                 "the ResNet's f1 is its trunk and f2 its attention pool; leave it None")
    layers.check(not pyramid.pop("leff", False), "model.pyramid.leff",
                 "the ResNet tower has no transformer feed-forward to replace")
    kwargs = layers.tower_kwargs(cls, config, path, exclude=cls.PYRAMID_FIELDS)
    tower = cls(**kwargs, **pyramid, **shared)
    check_roi_fields(tower)
    stages = tower.layers
    layers.check(isinstance(stages, (tuple, list)) and len(stages) == 4
                 and all(isinstance(n, int) and n > 0 for n in stages), f"{path}.layers",
                 f"must be 4 positive integers (blocks per stage), got {stages!r}")
    for key in ("image_size", "width", "heads", "output_dim", "norm_groups"):
      value = getattr(tower, key)
      layers.check(isinstance(value, int) and value > 0, f"{path}.{key}",
                   f"must be a positive integer, got {value!r}")
    layers.check(tower.image_size % STRIDE == 0, f"{path}.image_size",
                 f"{tower.image_size} is not a multiple of the trunk's stride {STRIDE}")
    layers.check(tower.width % (2 * tower.norm_groups) == 0, f"{path}.width",
                 f"{tower.width} is not divisible by 2 * {path}.norm_groups="
                 f"{tower.norm_groups} (the stem's first convolutions have width/2 channels)")
    layers.check(tower.feature_width % tower.heads == 0, f"{path}.heads",
                 f"{tower.heads} does not divide the feature width 32 * {path}.width="
                 f"{tower.feature_width}")
    return tower.clone(layers=tuple(stages))

  @property
  def native_grid(self):
    side = self.image_size // STRIDE
    return side, side

  @property
  def feature_width(self):
    """Channels of the trunk's final feature map (2048 for RN50)."""
    return self.width * 2 ** (len(self.layers) - 1) * EXPANSION

  def setup(self):
    self.conv_stem = Stem(self.width, self.norm_groups, self.dtype)
    self.stages = [
        Stage(self.width * 2**i, blocks, 1 if i == 0 else 2, self.norm_groups, self.dtype,
              self.remat)
        for i, blocks in enumerate(self.layers)]
    self.attn_pool = AttentionPool(self.heads, self.output_dim, self.native_grid, self.dtype,
                                   self.attention)
    if self.roi:  # the official proj_pre: bias-free, std feature_width**-0.5
      self.roi_embedding = nn.Dense(
          self.feature_width, use_bias=False, dtype=self.dtype,
          kernel_init=layers.partitioned(
              nn.initializers.normal(self.feature_width**-0.5), None, "embed"))

  @property
  def roi_input_dim(self):
    """Width of a region's input to the ROI path: its feature and its box."""
    return (self.feature_width if self.roi == "boxes" else self.roi_feature_dim) + BOX_DIM

  def stem(self, images):
    """Images [B, H, W, 3] -> [B, H/4, W/4, width] (sizes floored)."""
    if images.ndim != 4 or min(images.shape[1:3]) < STRIDE:
      raise ValueError(f"Expected images [batch, height, width, channels] of at least "
                       f"{STRIDE}x{STRIDE} pixels, got shape {images.shape}.")
    return self.conv_stem(images)

  def trunk(self, images):
    """f1: images [B, H, W, 3] -> feature map [B, H/32, W/32, feature_width]."""
    x = self.stem(images)
    for stage in self.stages:
      x = stage(x)
    return x

  def attnpool(self, tokens, grid=None, mask=None):
    """f2: tokens [B, P, C] -> (pooled [B, output_dim], tokens [B, P, output_dim]).

    `grid` (h, w) with h * w = P for a flattened feature map; None for a set, whose
    padded members `mask` [B, P] marks False.
    """
    return self.attn_pool(tokens, grid, mask)

  # PyramidCLIP: f1, f2 and the ROI path, with the ViT's interface.

  def f1(self, images, *, train=False):
    """The trunk -> dict(tokens = patches [B, h * w, C] (the flattened feature map),
    grid (h, w))."""
    del train
    tokens, grid = flatten(self.trunk(images))
    return dict(tokens=tokens, patches=tokens, grid=grid)

  def f2(self, tokens, grid):
    """The attention pool on f1's `tokens` -> dict(pooled [B, output_dim], cls_layers
    [1, B, output_dim])."""
    pooled = self.attnpool(tokens, grid)[0]
    return dict(pooled=pooled, cls_layers=pooled[None])

  def rois(self, regions, mask):
    """ROI path: regions [B, M, roi_input_dim] with mask [B, M] (True: real) ->
    [B, output_dim]."""
    return self.attnpool(self.roi_embedding(regions), None, mask)[0]

  def __call__(self, images, *, train=False):
    del train  # no stochastic layer; GroupNorm is the same at train and eval time
    tokens, grid = flatten(self.trunk(images))
    pooled, tokens = self.attnpool(tokens, grid)
    return dict(pooled=pooled, tokens=tokens, cls_layers=pooled[None], grid=grid)
