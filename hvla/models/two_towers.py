"""Dual encoder: an image tower and a text tower projected into one joint space.

Parameter tree (`params`, float32 whatever the compute dtype):

| path | shape | logical axes |
|---|---|---|
| `img/embedding/kernel` | [p*p*3, W] | patch, embed |
| `img/cls`, `img/pos_embedding` | [W], [1 + P, W] | embed; -, embed |
| `img/pre_norm`, `img/norm` | LayerNorm `scale`, `bias` [W] | embed |
| `img/encoder/block_{i}` | one block (below) per layer | |
| `img/encoder/blocks` | with `scan`: the blocks stacked on a leading axis | layers, ... |
| `txt/token_embedding/embedding` | [V, W] | vocab, embed |
| `txt/pos_embedding` | [max_len, W] | -, embed |
| `txt/encoder/...`, `txt/norm` | as for `img` | |
| `img_proj/kernel`, `txt_proj/kernel` | [W, D], no bias | embed, joint |
| `logit_scale` | [] (init ln(1/0.07)) | |
| `logit_bias` | [] (only if `logit_bias_init` is set) | |

A block: `norm1`, `attn/qkv` (kernel [W, 3, H, W/H]: embed, -, heads, kv), `attn/out`
(kernel [H, W/H, W]: heads, kv, embed), `norm2`, `mlp/fc1` (embed, mlp), `mlp/fc2`
(mlp, embed).

Every method is pure and reached through `model.apply(params, ..., method=...)`.
Joint embeddings are float32 and L2-normalised; `pooled`, `tokens` and `cls_layers`
keep the compute dtype.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hvla.models import layers

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 100.


def logit_scale(params):
  """The multiplier of cosine similarities: exp(min(s, ln 100))."""
  return jnp.exp(jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE))


def l2_normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class TwoTowers(nn.Module):
  """Image tower `img`, text tower `txt`, bias-free projections, logit scale (and bias).

  `encode_image` needs only the image tower's `__call__(images, train=)` and
  `encode_text` the text tower's `__call__(tokens)`; the piecewise methods below call
  the tower's `stem`, `blocks(x, start, stop)`, `head`, `pre_norm` and `norm`.
  """
  img: nn.Module
  txt: nn.Module
  embed_dim: int = 512
  dtype: Any = jnp.float32
  logit_scale_init: float = math.log(1 / 0.07)
  logit_bias_init: float | None = None

  def setup(self):
    def projection():
      return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                      kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                     "embed", "joint"))
    self.img_proj = projection()
    self.txt_proj = projection()
    self.param("logit_scale", layers.partitioned(
        nn.initializers.constant(self.logit_scale_init)), ())
    if self.logit_bias_init is not None:
      self.param("logit_bias", layers.partitioned(
          nn.initializers.constant(self.logit_bias_init)), ())

  def encode_image(self, images, *, train=False):
    """Images [B, H, W, 3] -> dict(embedding [B, D], pooled [B, W], tokens [B, P, W],
    token_embeddings [B, P, D], cls_layers [depth, B, W], grid (h, w)).

    With patch dropout at train time `tokens` holds only the kept patches; `grid`
    is always the full patch grid.
    """
    out = dict(self.img(images, train=train))
    out["embedding"] = self.image_project(out["pooled"])
    out["token_embeddings"] = self.image_project(out["tokens"])
    return out

  def encode_text(self, tokens, *, train=False):
    """Tokens [B, L] -> dict(embedding [B, D], pooled [B, W], tokens [B, L, W],
    token_embeddings [B, L, D], cls_layers [depth, B, W]).

    `train` is accepted for symmetry with `encode_image`; the text tower has no
    stochastic layer.
    """
    del train
    out = dict(self.txt(tokens))
    out["embedding"] = self.text_project(out["pooled"])
    out["token_embeddings"] = self.text_project(out["tokens"])
    return out

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)

  # Pieces of the image tower, for objectives that run it in parts.

  def image_stem(self, images, *, train=False):
    """Images -> the token sequence entering block 0: [B, 1 + P, W], class token first."""
    return self.img.stem(images, train=train)

  def image_blocks(self, x, start=0, stop=None):
    """Image blocks [start, stop) -> (x, cls_layers [stop - start, B, W])."""
    return self.img.blocks(x, start, stop)

  def image_head(self, x):
    """Final norm and pooling -> (pooled [B, W], patch tokens [B, P, W])."""
    return self.img.head(x)

  def image_pre_norm(self, x):
    """The LayerNorm `image_stem` ends with, for token sequences built elsewhere
    (e.g. the class token followed by ROI features)."""
    return self.img.pre_norm(x)

  def image_norm(self, x):
    """The image tower's final LayerNorm on any [..., W] (e.g. `cls_layers`)."""
    return self.img.norm(x)

  def text_norm(self, x):
    """The text tower's final LayerNorm on any [..., W] (e.g. `cls_layers`)."""
    return self.txt.norm(x)

  def image_project(self, x):
    """[..., W] image features -> L2-normalised float32 joint embeddings [..., D]."""
    return l2_normalize(self.img_proj(x))

  def text_project(self, x):
    """[..., W] text features -> L2-normalised float32 joint embeddings [..., D]."""
    return l2_normalize(self.txt_proj(x))
