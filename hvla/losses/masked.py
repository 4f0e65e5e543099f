"""ViCHA's masked image modelling (METHODS.md §2): MAE on the image tower.

The pass (`TwoTowers.encode_image_masked`) masks 75% of the patches by a per-example
random draw [paper], runs the same image tower on the class token and the visible
patches, without concept tokens [paper], and returns the mask (the kept indices, as a
float mask that GradCache can differentiate like every pass output). The decoder is
the term's own [paper, official code]: a linear map to its width, a learnable mask
token in every masked place, fixed 2-D sin-cos positions (the class token's zero), 2
pre-norm blocks of width 768 with 16 heads and MLP ratio 4, a LayerNorm and a linear map
to each patch's pixels. The target is every patch's pixels standardised per patch
(mean 0, unbiased variance 1, eps 1e-6, as MAE's `norm_pix_loss`); the loss the mean
squared error over the masked patches only [paper]. Weight 1 [paper].

[ours] The pass's class token carries its positional embedding as in the plain stem (the
official MAE encoder drops it) and the tower's pre-norm (hvla's CLIP-layout ViT); the
mask token starts as N(0, 0.02) (MAE's init; ViCHA's code zeroes it again after); the
decoder's blocks are hvla's transformer blocks (LayerNorm eps 1e-5); the patch pixels
are the normalised view the other terms see.

Parameters: `params['objective'][name]['decoder']/...` (`Decoder`).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hvla.losses.objective import Pass, Term, register
from hvla.models import ViT, layers


def sincos_positions(width, grid):
  """Fixed 2-D sin-cos positions [1 + h * w, width] (the class token's row zero): the
  first half encodes the column, the second the row, each half as sin then cos of the
  coordinate times 1 / 10000^(k / (width / 4)) (MAE's `get_2d_sincos_pos_embed`)."""
  if width % 4:
    raise ValueError(f"sin-cos positions need a width divisible by 4, got {width}")
  h, w = grid
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                           indexing="ij")
  def encode(coord):
    angles = coord.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  table = np.concatenate([encode(cols), encode(rows)], axis=1)
  return np.concatenate([np.zeros((1, width)), table]).astype(np.float32)


class Decoder(nn.Module):
  """MAE's decoder: encoder tokens [B, 1 + K, W] and kept indices [B, K] -> predicted
  pixels [B, h * w, out_dim] for every patch of the `grid`."""
  width: int
  depth: int
  heads: int
  mlp_ratio: float
  out_dim: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, tokens, kept, grid):
    dense = lambda features, names, name: nn.Dense(  # noqa: E731
        features, dtype=self.dtype, name=name,
        kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), *names),
        bias_init=layers.partitioned(nn.initializers.zeros, names[-1]))
    x = dense(self.width, (None, "embed"), "embed")(tokens)
    mask_token = self.param("mask_token",
                            layers.partitioned(nn.initializers.normal(0.02), "embed"),
                            (self.width,))
    b, num = x.shape[0], grid[0] * grid[1]
    full = jnp.broadcast_to(mask_token.astype(x.dtype), (b, num, self.width))
    full = full.at[jnp.arange(b)[:, None], kept].set(x[:, 1:])  # visible ones in place
    x = jnp.concatenate([x[:, :1], full], axis=1)
    x = x + jnp.asarray(sincos_positions(self.width, grid), x.dtype)
    for i in range(self.depth):
      x, _ = layers.Block(int(self.width * self.mlp_ratio), self.heads, readout="cls",
                          dtype=self.dtype, name=f"block_{i}")(x)
    x = layers.layer_norm(self.dtype, "norm")(x)
    return dense(self.out_dim, ("embed", None), "pixels")(x[:, 1:]).astype(jnp.float32)


def kept_indices(mask, keep):
  """The `keep` visible patches' indices [B, keep] in raster order, from the mask [B, P]
  (1.0 masked), as the masked pass orders its tokens."""
  return jnp.argsort(mask, axis=1, stable=True)[:, :keep]


def reconstruction_loss(prediction, pixels, mask, norm_pix=True):
  """Mean over the masked patches (mask [B, P] 1.0) of the per-patch mean squared error
  between prediction and pixels [B, P, D]; with `norm_pix` each target patch is
  standardised first (unbiased variance, eps 1e-6)."""
  target = pixels.astype(jnp.float32)
  if norm_pix:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) * jax.lax.rsqrt(var + 1e-6)
  error = jnp.mean((prediction.astype(jnp.float32) - target) ** 2, axis=-1)
  mask = jax.lax.stop_gradient(mask.astype(jnp.float32))
  return jnp.sum(error * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@register("mae")
class MaskedImageModelling(Term):
  """Options (the keys of `config.objective.terms.<name>` besides type and weight):

  image_view: batch['images'][image_view] is the image input.
  mask_ratio: the fraction of patches masked (MAE, ViCHA: 0.75).
  decoder_width, decoder_depth, decoder_heads, decoder_mlp_ratio: the decoder (768, 2,
    16, 4 [paper]).
  norm_pix: standardise each target patch (MAE's norm_pix_loss, on in ViCHA).
  """

  def __init__(self, *, image_view="image", mask_ratio=0.75, decoder_width=768,
               decoder_depth=2, decoder_heads=16, decoder_mlp_ratio=4.0, norm_pix=True):
    if not 0.0 < mask_ratio < 1.0:
      raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio!r}")
    for key, value in (("decoder_width", decoder_width), ("decoder_depth", decoder_depth),
                       ("decoder_heads", decoder_heads)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive int, got {value!r}")
    if decoder_width % 4 or decoder_width % decoder_heads:
      raise ValueError(f"decoder_width {decoder_width} must be divisible by 4 (sin-cos "
                       f"positions) and by decoder_heads={decoder_heads}")
    if decoder_mlp_ratio <= 0:
      raise ValueError(f"decoder_mlp_ratio must be positive, got {decoder_mlp_ratio!r}")
    self.image_view, self.mask_ratio, self.norm_pix = image_view, float(mask_ratio), norm_pix
    self.decoder_options = dict(width=decoder_width, depth=decoder_depth,
                                heads=decoder_heads, mlp_ratio=float(decoder_mlp_ratio))
    self.decoder = self.grid = self.width = None  # from the image tower, in attach

  def passes(self):
    return {"masked": Pass("encode_image_masked", (f"images/{self.image_view}",),
                           outputs=("tokens", "mask", "pixels"),
                           options=(("mask_ratio", self.mask_ratio),))}

  def attach(self, model):
    where = f"config.objective.terms.{self.name}"
    if not isinstance(model.img, ViT):
      raise ValueError(f"{where}: masked image modelling needs a ViT image tower, got "
                       f"{type(model.img).__name__}")
    if model.img.leff:
      raise ValueError(f"{where}: the masked pass drops patches, and the LeFF blocks "
                       "convolve the full patch grid: set model.pyramid.leff=False")
    self.grid = model.img.native_grid
    self.width = model.img.width
    self.decoder = Decoder(**self.decoder_options, out_dim=model.img.patch_size ** 2 * 3,
                           dtype=model.dtype)

  def init_params(self, rng):
    keep = max(1, int(self.grid[0] * self.grid[1] * (1 - self.mask_ratio)))
    tokens = jnp.zeros((1, 1 + keep, self.width), jnp.float32)
    kept = jnp.arange(keep, dtype=jnp.int32)[None]
    return {"decoder": self.decoder.init(rng, tokens, kept, self.grid)["params"]}

  def loss(self, params, state, features, ctx):
    del state, ctx
    masked = features["masked"]
    num = masked["pixels"].shape[1]
    side = int(np.sqrt(num))
    if side * side != num:
      raise ValueError(f"config.objective.terms.{self.name}: the decoder's sin-cos "
                       f"positions need a square patch grid, got {num} patches")
    kept = kept_indices(masked["mask"], masked["tokens"].shape[1] - 1)
    prediction = self.decoder.apply({"params": self.own(params)["decoder"]},
                                    masked["tokens"], kept, (side, side))
    return reconstruction_loss(prediction, masked["pixels"], masked["mask"],
                               self.norm_pix), {}
