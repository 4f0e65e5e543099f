"""Text transformer tower (CLIP's text encoder [paper, CLIP] with selectable pooling).

Token + learned positional embedding, pre-norm blocks (causal by default), final
LayerNorm, then pooling over the valid positions: `eot` the last non-pad token
(CLIP), `max` (PyramidCLIP), `cls` position 0, `mean`. Pad id is 0; a row's valid
positions run up to its last non-pad token, and keys past them are masked in every
block, so padding never changes a real position or a pooled feature.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from hvla.models import layers

TEXT_POOLINGS = ("eot", "max", "cls", "mean")


class TextTransformer(nn.Module):
  """Text tower: tokens [B, L] int32 -> dict(pooled, tokens, cls_layers).

  `cls_layers` [depth, B, W] is the pooled feature after every block, before the
  final norm; `levels` [B, depth, W] the same after the final norm, per example (the
  layer features of ViCHA's alignment, whose post-LN text layers are normalised [paper]).
  """
  vocab_size: int = 49408
  max_len: int = 77
  width: int = 512
  depth: int = 12
  heads: int = 8
  mlp_ratio: float = 4.0
  pooling: str = "eot"
  causal: bool = True
  dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  attention: str = "xla"

  @classmethod
  def from_config(cls, config, **shared):
    path = "model.text"
    tower = cls(**layers.tower_kwargs(cls, config, path), **shared)
    layers.check_transformer(tower, path)
    layers.check_positive_ints(tower, path, "vocab_size", "max_len")
    layers.check(tower.pooling in TEXT_POOLINGS, f"{path}.pooling",
                 f"unknown pooling {tower.pooling!r}, expected one of {TEXT_POOLINGS}")
    layers.check(isinstance(tower.causal, bool), f"{path}.causal",
                 f"must be a bool, got {tower.causal!r}")
    return tower

  def setup(self):
    self.token_embedding = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype,
        embedding_init=layers.partitioned(nn.initializers.normal(0.02), "vocab", "embed"))
    self.pos_embedding = self.param(
        "pos_embedding", layers.partitioned(nn.initializers.normal(0.01), None, "embed"),
        (self.max_len, self.width))
    self.encoder = layers.Encoder(
        depth=self.depth, mlp_dim=int(self.width * self.mlp_ratio), heads=self.heads,
        readout=self.pooling, causal=self.causal, dtype=self.dtype, remat=self.remat,
        scan=self.scan, attention=self.attention)
    self.norm = layers.layer_norm(self.dtype)

  def __call__(self, tokens):
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(f"Expected int tokens [batch, length <= max_len={self.max_len}], "
                       f"got shape {tokens.shape}.")
    lengths = layers.valid_lengths(tokens)
    x = self.token_embedding(tokens) + self.pos_embedding[:tokens.shape[1]].astype(self.dtype)
    x = layers.constrain(x, "act_batch", "act_len", "act_embed")
    x, cls_layers = self.encoder(x, lengths)
    x = self.norm(x)
    return dict(pooled=layers.pool(x, lengths, self.pooling), tokens=x,
                cls_layers=cls_layers, levels=jnp.swapaxes(self.norm(cls_layers), 0, 1))
