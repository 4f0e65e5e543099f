"""Vision Transformer image tower, runnable in pieces: stem, blocks[start:stop], head.

CLIP's ViT layout [paper, CLIP]: bias-free patch embedding, class token, learned
positional embedding, a LayerNorm before the blocks (`pre_norm`, which PyramidCLIP's
ROI path reuses), pre-norm blocks, final LayerNorm (`norm`). Splitting the tower
into `stem`, `blocks(x, start, stop)` and `head` lets PyramidCLIP run f1 = blocks[:9]
and f2 = blocks[9:] and get exactly the whole tower, and lets objectives edit the
token sequence in between (ROIs, concept tokens, masking).

PyramidCLIP's pieces [paper, official model code]: `f1` (stem and the first
`f1_blocks` blocks) and `f2` (the remaining blocks and the head) compose to the whole
tower; with `leff` the f1 blocks replace their MLP by a LeFF (`layers.Leff`); with a
`roi` source the tower owns the ROI path `rois`: region features -> a bias-free
linear map to the width -> the class embedding prepended (no positional embedding) ->
pre-LN -> only the f2 blocks -> the final LN on the class token.

Choices marked [ours]: the patch embedding is a matmul on flattened patches (the
same function as CLIP's stride-p convolution); the positional embedding is resized
bilinearly for other resolutions; `gap` pooling keeps the class token in the
sequence and averages the patch tokens; patch dropout draws from the `dropout` rng
stream; for depths other than 12, f2 is the last quarter of the blocks (at least one).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hvla.models import layers


def patchify(images, patch_size):
  """[B, H, W, C] -> ([B, h * w, p * p * C], (h, w)) in raster order."""
  b, height, width, channels = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f"Image size {height}x{width} is not divisible by the patch size "
                     f"{patch_size}.")
  h, w = height // patch_size, width // patch_size
  x = images.reshape(b, h, patch_size, w, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * w, patch_size * patch_size * channels), (h, w)


def resize_pos_embedding(pos, grid_from, grid_to):
  """Bilinear resize (half-pixel centres, no antialiasing) of [h*w, W] patch positions."""
  if tuple(grid_from) == tuple(grid_to):
    return pos
  grid = pos.reshape(*grid_from, pos.shape[-1])
  resized = jax.image.resize(grid, (*grid_to, pos.shape[-1]), "bilinear", antialias=False)
  return resized.reshape(grid_to[0] * grid_to[1], pos.shape[-1])


def drop_patches(x, keep, rng):
  """Keeps a random `keep` of the tokens x [B, P, W] per example, in their order:
  (kept tokens [B, keep, W], their indices [B, keep]). Patch dropout, and MAE's random
  masking (which draws the same uniform subset by a per-example shuffle)."""
  scores = jax.random.uniform(rng, x.shape[:2])
  kept = jnp.sort(jax.lax.top_k(scores, keep)[1], axis=1)
  return jnp.take_along_axis(x, kept[..., None], axis=1), kept


def real_first(x, mask):
  """Moves the real (mask True) items of x [B, M, ...] before the padded ones, keeping
  their order; returns (x, number of real items [B])."""
  mask = jnp.asarray(mask, bool)
  order = jnp.argsort(~mask, axis=1, stable=True)
  return jnp.take_along_axis(x, order[..., None], axis=1), jnp.sum(mask, axis=1)


ROI_SOURCES = (None, "boxes", "features")
BOX_DIM = 4  # (x0, y0, x1, y1), appended to every region feature [paper]


def check_roi_fields(tower, path="model.pyramid"):
  """Checks the PyramidCLIP fields an image tower shares (`roi`, `roi_feature_dim`)."""
  layers.check(tower.roi in ROI_SOURCES, f"{path}.roi.source",
               f"unknown source {tower.roi!r}, expected one of {ROI_SOURCES}")
  layers.check(isinstance(tower.roi_feature_dim, int) and tower.roi_feature_dim > 0,
               f"{path}.roi.feature_dim",
               f"must be a positive integer, got {tower.roi_feature_dim!r}")


def _check_split(tower, path="model.pyramid"):
  """Checks f1_depth and the LeFF against the rest of the tower."""
  if tower.f1_depth is not None or tower.leff or tower.roi:
    layers.check(isinstance(tower.f1_blocks, int) and 0 < tower.f1_blocks < tower.depth,
                 f"{path}.f1_depth", f"f1 must hold 1 to depth-1={tower.depth - 1} blocks, "
                 f"got {tower.f1_blocks!r}")
  layers.check(isinstance(tower.leff, bool), f"{path}.leff",
               f"must be a bool, got {tower.leff!r}")
  if tower.leff:
    layers.check(not tower.scan, "model.scan", "LeFF blocks cannot be scanned; set it False")
    layers.check(tower.patch_dropout == 0, "model.image.patch_dropout",
                 "the LeFF convolves the full patch grid; set it to 0")
    hidden = int(tower.width * tower.mlp_ratio)
    groups = layers.LEFF_NORM_GROUPS
    layers.check(tower.width % groups == 0 and hidden % groups == 0, "model.image.width",
                 f"the LeFF's GroupNorms need width ({tower.width}) and width * mlp_ratio "
                 f"({hidden}) divisible by {groups}")
  if tower.roi == "boxes":
    layers.check(tower.patch_dropout == 0, "model.image.patch_dropout",
                 "roi.source='boxes' pools the full f1 patch grid; set it to 0")


class ViT(nn.Module):
  """Image tower. `__call__(images, train)` = head(blocks(stem(images))).

  Outputs `pooled` [B, W], `tokens` [B, P, W] (patch tokens after the final norm),
  `cls_layers` [depth, B, W] (the pooling readout after every block, before the final
  norm: the class token for `cls`, the mean patch token for `gap`), `levels` [B, depth,
  W] (the same readouts after the final norm, per example: ViCHA's layer features) and
  `grid`.
  """
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  pool: str = "cls"
  patch_dropout: float = 0.0
  f1_depth: int | None = None  # None: `depth - max(1, depth // 4)` (9 of 12 [paper])
  leff: bool = False
  roi: str | None = None  # ROI path input: None, 'boxes' or 'features'
  roi_feature_dim: int = 2048  # width of stored region features (roi='features')
  dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  attention: str = "xla"

  PYRAMID_FIELDS = ("f1_depth", "leff", "roi", "roi_feature_dim")

  @classmethod
  def from_config(cls, config, *, pyramid=None, **shared):
    """`config` is `model.image`; `pyramid` the flat PyramidCLIP fields from
    `model.pyramid` (f1_depth, leff, roi, roi_feature_dim)."""
    path = "model.image"
    kwargs = layers.tower_kwargs(cls, config, path, exclude=cls.PYRAMID_FIELDS)
    tower = cls(**kwargs, **(pyramid or {}), **shared)
    layers.check_transformer(tower, path)
    layers.check_positive_ints(tower, path, "image_size", "patch_size")
    layers.check(tower.image_size % tower.patch_size == 0, f"{path}.image_size",
                 f"{tower.image_size} is not divisible by {path}.patch_size={tower.patch_size}")
    layers.check(tower.pool in ("cls", "gap"), f"{path}.pool",
                 f"unknown pooling {tower.pool!r}, expected 'cls' or 'gap'")
    layers.check(0 <= tower.patch_dropout < 1, f"{path}.patch_dropout",
                 f"must be in [0, 1), got {tower.patch_dropout!r}")
    check_roi_fields(tower)
    _check_split(tower)
    return tower

  @property
  def f1_blocks(self):
    """Blocks in f1: `f1_depth`, else all but the last quarter (at least one) [ours]."""
    if self.f1_depth is not None:
      return self.f1_depth
    return self.depth - max(1, self.depth // 4)

  @property
  def roi_input_dim(self):
    """Width of a region's input to the ROI path: its feature and its box."""
    return (self.width if self.roi == "boxes" else self.roi_feature_dim) + BOX_DIM

  @property
  def native_grid(self):
    """The patch grid at `image_size`, where the positional embedding is learned."""
    side = self.image_size // self.patch_size
    return side, side

  def setup(self):
    h, w = self.native_grid
    self.embedding = nn.Dense(
        self.width, use_bias=False, dtype=self.dtype,
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(), "patch", "embed"))
    self.cls = self.param(
        "cls", layers.partitioned(nn.initializers.normal(self.width**-0.5), "embed"),
        (self.width,))
    self.pos_embedding = self.param(
        "pos_embedding",
        layers.partitioned(nn.initializers.normal(self.width**-0.5), None, "embed"),
        (1 + h * w, self.width))
    self.pre_norm = layers.layer_norm(self.dtype)
    self.encoder = layers.Encoder(
        depth=self.depth, mlp_dim=int(self.width * self.mlp_ratio), heads=self.heads,
        readout=self.pool, dtype=self.dtype, remat=self.remat, scan=self.scan,
        attention=self.attention,
        leff_depth=self.f1_blocks if self.leff else 0)
    self.norm = layers.layer_norm(self.dtype)
    if self.roi:  # the official proj_pre: bias-free, std width**-0.5
      self.roi_embedding = nn.Dense(
          self.width, use_bias=False, dtype=self.dtype,
          kernel_init=layers.partitioned(nn.initializers.normal(self.width**-0.5),
                                         None, "embed"))

  def stem(self, images, *, train=False, extra=None):
    """Images [B, H, W, 3] -> tokens [B, 1 + P (+ E), W]: class token first, then patches,
    then `extra` [B, E, W] if given (ViCHA's concept tokens: after the positional
    embedding, so they get none [paper]; before the pre-norm, which normalises every
    token entering block 0 of this CLIP-layout tower [ours]).

    At train time with `patch_dropout` > 0 only a random subset of the patch tokens
    is kept (rng stream `dropout`).
    """
    x = self._embedded_patches(images)
    if train and self.patch_dropout > 0:
      keep = max(1, int(x.shape[1] * (1 - self.patch_dropout)))
      x, _ = drop_patches(x, keep, self.make_rng("dropout"))
    return self._with_class_token(x, extra)

  def _embedded_patches(self, images):
    """Images -> patch embeddings plus their positional embeddings [B, P, W]."""
    patches, grid = patchify(images, self.patch_size)
    pos = self.pos_embedding[1:].astype(self.dtype)
    return self.embedding(patches) + resize_pos_embedding(pos, self.native_grid, grid)

  def _with_class_token(self, x, extra=None):
    """[class token, x (, extra)] through the pre-norm."""
    cls = self.cls.astype(self.dtype) + self.pos_embedding[0].astype(self.dtype)
    cls = jnp.broadcast_to(cls, (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls, x] + ([] if extra is None else [extra.astype(self.dtype)]),
                        axis=1)
    return layers.constrain(self.pre_norm(x), "act_batch", "act_len", "act_embed")

  def masked(self, images, keep, rng):
    """MAE's encoder [paper]: the class token and a random `keep` of the patch tokens
    (positions added before the draw), through every block and the final norm ->
    (tokens [B, 1 + keep, W], the kept patches' indices [B, keep]). No concept tokens
    [paper]; not with LeFF blocks, which convolve the full grid."""
    if self.leff:
      raise ValueError("Masked image modelling drops patches; the LeFF blocks need the "
                       "full grid: set model.pyramid.leff=False.")
    x, kept = drop_patches(self._embedded_patches(images), keep, rng)
    x, _ = self.blocks(self._with_class_token(x))
    return self.norm(x), kept

  def blocks(self, x, start=0, stop=None, *, grid=None, lengths=None, extra=0):
    """Runs blocks [start, stop); returns (x, cls_layers [stop - start, B, W]).

    `grid`: the patch grid of x[:, 1:], for LeFF blocks (None: a square grid).
    `lengths` [B]: only the first lengths[b] tokens are real (keys past them are masked).
    `extra`: the last `extra` tokens follow the patch grid (concept tokens).
    """
    if self.leff and start < self.f1_blocks and grid is None:
      patches = x.shape[1] - 1 - extra
      side = math.isqrt(patches)
      if side * side != patches:
        raise ValueError(f"{patches} patch tokens are not a square grid; pass `grid` "
                         "to the LeFF blocks.")
      grid = (side, side)
    return self.encoder(x, lengths, start, stop, grid, extra)

  def head(self, x, extra=0):
    """Final norm and pooling: x [B, 1 + P (+ extra), W] -> (pooled [B, W], patch
    tokens [B, P, W]); the last `extra` tokens are neither pooled nor returned."""
    x = self.norm(x)[:, :x.shape[1] - extra]
    return layers.pool(x, None, self.pool), x[:, 1:]

  def _tokens(self, images, train, extra):
    """The stem's tokens with `extra` = (tokens [B, E, W], real count [B]) or None
    appended -> (x, lengths [B] or None (all real), E)."""
    if extra is None:
      return self.stem(images, train=train), None, 0
    tokens, count = extra
    x = self.stem(images, train=train, extra=tokens)
    return x, x.shape[1] - tokens.shape[1] + count, tokens.shape[1]

  def __call__(self, images, *, train=False, extra=None):
    """`extra`: (tokens [B, E, W], real count [B]) appended after the patches, their
    padding masked as keys, e.g. ViCHA's concept tokens; None: none."""
    x, lengths, n_extra = self._tokens(images, train, extra)
    grid = self.patch_grid(images)
    x, cls_layers = self.blocks(x, grid=grid, lengths=lengths, extra=n_extra)
    pooled, tokens = self.head(x, n_extra)
    return dict(pooled=pooled, tokens=tokens, cls_layers=cls_layers,
                levels=self.levels(cls_layers), grid=grid)

  def levels(self, cls_layers):
    """[depth, B, W] block readouts -> [B, depth, W] after the final norm: ViCHA passes
    every intermediate state through the tower's final LayerNorm [paper]."""
    return jnp.swapaxes(self.norm(cls_layers), 0, 1)

  def patch_grid(self, images):
    """(h, w) patches of `images` [B, H, W, 3]."""
    return tuple(s // self.patch_size for s in images.shape[1:3])

  # PyramidCLIP: f1, f2 and the ROI path.

  def f1(self, images, *, train=False, extra=None):
    """Stem and the f1 blocks -> dict(tokens [B, 1 + P (+ E), W] (f2's input), patches
    [B, P, W] (their patch grid, for box pooling), grid (h, w), cls_layers [f1 blocks,
    B, W], and f2's other inputs: lengths, extra (the count E); `extra` as for
    `__call__`."""
    grid = self.patch_grid(images)
    x, lengths, n_extra = self._tokens(images, train, extra)
    x, cls_layers = self.blocks(x, 0, self.f1_blocks, grid=grid, lengths=lengths,
                                extra=n_extra)
    return dict(tokens=x, patches=x[:, 1:x.shape[1] - n_extra], grid=grid,
                cls_layers=cls_layers, lengths=lengths, extra=n_extra)

  def f2(self, tokens, grid, *, lengths=None, extra=0):
    """The f2 blocks and the head on f1's `tokens` -> dict(pooled [B, W], cls_layers
    [f2 blocks, B, W])."""
    x, cls_layers = self.blocks(tokens, self.f1_blocks, grid=grid, lengths=lengths,
                                extra=extra)
    return dict(pooled=self.head(x, extra)[0], cls_layers=cls_layers)

  def rois(self, regions, mask):
    """ROI path: regions [B, M, roi_input_dim] with mask [B, M] (True: real) -> [B, W].

    Padded regions never change the result [ours; the official code has no padding]:
    they are moved behind the real ones and masked out as keys (without positional
    embeddings the order has no meaning).
    """
    x, count = real_first(self.roi_embedding(regions), mask)
    cls = jnp.broadcast_to(self.cls.astype(self.dtype), (x.shape[0], 1, self.width))
    x = self.pre_norm(jnp.concatenate([cls, x], axis=1))
    x, _ = self.blocks(x, self.f1_blocks, lengths=1 + count)
    return self.norm(x[:, 0])

