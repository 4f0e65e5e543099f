"""Vision Transformer image tower, runnable in pieces: stem, blocks[start:stop], head.

CLIP's ViT layout [paper, CLIP]: bias-free patch embedding, class token, learned
positional embedding, a LayerNorm before the blocks (`pre_norm`, which PyramidCLIP's
ROI path reuses), pre-norm blocks, final LayerNorm (`norm`). Splitting the tower
into `stem`, `blocks(x, start, stop)` and `head` lets PyramidCLIP run f1 = blocks[:9]
and f2 = blocks[9:] and get exactly the whole tower, and lets objectives edit the
token sequence in between (ROIs, concept tokens, masking).

Choices marked [ours]: the patch embedding is a matmul on flattened patches (the
same function as CLIP's stride-p convolution); the positional embedding is resized
bilinearly for other resolutions; `gap` pooling keeps the class token in the
sequence and averages the patch tokens; patch dropout draws from the `dropout` rng
stream.
"""
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
  """Keeps a random `keep` of the tokens x [B, P, W] per example, in their order."""
  scores = jax.random.uniform(rng, x.shape[:2])
  kept = jnp.sort(jax.lax.top_k(scores, keep)[1], axis=1)
  return jnp.take_along_axis(x, kept[..., None], axis=1)


class ViT(nn.Module):
  """Image tower. `__call__(images, train)` = head(blocks(stem(images))).

  Outputs `pooled` [B, W], `tokens` [B, P, W] (patch tokens after the final norm),
  `cls_layers` [depth, B, W] (the pooling readout after every block, before the final
  norm: the class token for `cls`, the mean patch token for `gap`) and `grid`.
  """
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  pool: str = "cls"
  patch_dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False

  @classmethod
  def from_config(cls, config, **shared):
    path = "model.image"
    tower = cls(**layers.tower_kwargs(cls, config, path), **shared)
    layers.check_transformer(tower, path)
    layers.check_positive_ints(tower, path, "image_size", "patch_size")
    layers.check(tower.image_size % tower.patch_size == 0, f"{path}.image_size",
                 f"{tower.image_size} is not divisible by {path}.patch_size={tower.patch_size}")
    layers.check(tower.pool in ("cls", "gap"), f"{path}.pool",
                 f"unknown pooling {tower.pool!r}, expected 'cls' or 'gap'")
    layers.check(0 <= tower.patch_dropout < 1, f"{path}.patch_dropout",
                 f"must be in [0, 1), got {tower.patch_dropout!r}")
    return tower

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
        readout=self.pool, dtype=self.dtype, remat=self.remat, scan=self.scan)
    self.norm = layers.layer_norm(self.dtype)

  def stem(self, images, *, train=False):
    """Images [B, H, W, 3] -> tokens [B, 1 + P, W]: class token first, then patches.

    At train time with `patch_dropout` > 0 only a random subset of the patch tokens
    is kept (rng stream `dropout`).
    """
    patches, grid = patchify(images, self.patch_size)
    x = self.embedding(patches)
    pos = self.pos_embedding.astype(self.dtype)
    x = x + resize_pos_embedding(pos[1:], self.native_grid, grid)
    if train and self.patch_dropout > 0:
      keep = max(1, int(x.shape[1] * (1 - self.patch_dropout)))
      x = drop_patches(x, keep, self.make_rng("dropout"))
    cls = jnp.broadcast_to(self.cls.astype(self.dtype) + pos[0], (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    return layers.constrain(self.pre_norm(x), "act_batch", "act_len", "act_embed")

  def blocks(self, x, start=0, stop=None):
    """Runs blocks [start, stop); returns (x, cls_layers [stop - start, B, W])."""
    return self.encoder(x, None, start, stop)

  def head(self, x):
    """Final norm and pooling: x [B, 1 + P, W] -> (pooled [B, W], tokens [B, P, W])."""
    x = self.norm(x)
    return layers.pool(x, None, self.pool), x[:, 1:]

  def __call__(self, images, *, train=False):
    x = self.stem(images, train=train)
    x, cls_layers = self.blocks(x)
    pooled, tokens = self.head(x)
    grid = tuple(s // self.patch_size for s in images.shape[1:3])
    return dict(pooled=pooled, tokens=tokens, cls_layers=cls_layers, grid=grid)

