"""Dual encoder: an image tower and a text tower projected into one joint space.

Parameter tree (`params`, float32 whatever the compute dtype):

| path | shape | logical axes |
|---|---|---|
| `img/embedding/kernel` | [p*p*3, W] | patch, embed |
| `img/cls`, `img/pos_embedding` | [W], [1 + P, W] | embed; -, embed |
| `img/pre_norm`, `img/norm` | LayerNorm `scale`, `bias` [W] | embed |
| `img/encoder/block_{i}` | one block (below) per layer | |
| `img/encoder/blocks` | with `scan`: the blocks stacked on a leading axis | layers, ... |
| `img/roi_embedding/kernel` | [F + 4, W], no bias (with `pyramid.roi.source`) | -, embed |
| `txt/token_embedding/embedding` | [V, W] | vocab, embed |
| `txt/pos_embedding` | [max_len, W] | -, embed |
| `txt/encoder/...`, `txt/norm` | as for `img` | |
| `img_proj/kernel`, `txt_proj/kernel` | [W, D], no bias | embed, joint |
| `logit_scale` | [] (init ln(1/0.07), kept within ln `logit_scale_range`) | |
| `aug_embed/hidden/kernel`, `bias` | [A, H], [H] (with `aug_mlp_width` H > 0) | -, mlp; mlp |
| `aug_embed/out/kernel`, `bias` | [H, W], [W] (zero at init) | mlp, embed; embed |
| `objective/<term>/...` | a term's own parameters (docs/design.md) | as the term declares |

A block: `norm1`, `attn/qkv` (kernel [W, 3, H, W/H]: embed, -, heads, kv), `attn/out`
(kernel [H, W/H, W]: heads, kv, embed), `norm2`, `mlp/fc1` (embed, mlp), `mlp/fc2`
(mlp, embed).

An f1 block of a ViT with `model.pyramid.leff` has `leff/...` (fc1, norm1, conv_kernel
[3, 3, 4W], norm2, fc2, norm3) in place of `mlp`.

The ResNet tower (`hvla/models/resnet.py`) has its own `img/...` tree; with
`pyramid.roi.source` it adds `img/roi_embedding/kernel` [F + 4, C] (no bias) and the ROI
path's LayerNorm `img/attn_pool/set_norm` [C], C the trunk width (2048 for RN50).

Every method is pure and reached through `model.apply(params, ..., method=...)`.
Joint embeddings are float32 and L2-normalised; `pooled`, `tokens` and `cls_layers`
keep the compute dtype.

UniCLIP's augmentation-aware embedding (`encode_image_with_augs`, with `aug_mlp_width`
> 0): a view's augmentation vector (A = len(`hvla.data.ops.AUG_FIELDS`) numbers: crop
box, flip, colour jitter, grayscale, blur) through a GELU MLP, added to the pooled
feature before the projection [ours in detail, METHODS.md §4]. Its output layer starts
at zero, so training starts from the towers' own embedding [ours].

PyramidCLIP [paper] runs the image tower as f1 then f2 (`image_f1`, `image_f2`) and
embeds a region sequence through f2 only (`image_rois`); `encode_image_with_rois` does
both for one view. Region inputs are a feature per region followed by its box: stored
detector features (`roi.source='features'`) or the f1 patch tokens pooled over the box
(`roi.source='boxes'`, `pool_boxes`) [ours].
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hvla.data.ops import AUG_FIELDS
from hvla.models import layers
from hvla.models.vit import BOX_DIM, patchify

AUG_DIM = len(AUG_FIELDS)

WHOLE_VIEW = (0.0, 0.0, 1.0, 1.0)


def logit_scale(params):
  """The multiplier of cosine similarities, exp(s). Its range is kept by projecting s
  after every update (`param_bounds`), not by clamping here, which would cut the
  gradient of a scale past its bound for good."""
  return jnp.exp(params["logit_scale"])


def param_bounds(model):
  """{'/'-path: (low, high)} of the model's bounded parameters: the log logit scale
  within log(model.logit_scale_range), as open_clip clamps its scale after each step."""
  low, high = model.logit_scale_range
  return {"logit_scale": (math.log(low), math.log(high))}


def whole_view_if_empty(rois):
  """[ours] Rows without a real region get region 0 = the whole view (box (0, 0, 1, 1)),
  so that PyramidCLIP's region level stays informative."""
  mask, boxes = jnp.asarray(rois["mask"], bool), jnp.asarray(rois["boxes"])
  empty = ~jnp.any(mask, axis=1)
  boxes = boxes.at[:, 0].set(
      jnp.where(empty[:, None], jnp.asarray(WHOLE_VIEW, boxes.dtype), boxes[:, 0]))
  return dict(rois, boxes=boxes, mask=mask.at[:, 0].set(mask[:, 0] | empty))


def l2_normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def pool_boxes(patches, grid, boxes):
  """Mean patch token in each box: patches [B, h*w, C] (raster order), boxes [B, M, 4]
  (x0, y0, x1, y1) in [0, 1] -> [B, M, C].

  [ours] Each patch cell weighs by the fraction of its area the box covers, so a box
  smaller than a cell still reads the cells it touches; a box of zero area gets zeros.
  """
  h, w = grid
  boxes = boxes.astype(jnp.float32)

  def coverage(lo, hi, n):  # [B, M] -> [B, M, n]: overlap of [lo, hi] with each cell
    edges = jnp.arange(n + 1, dtype=jnp.float32) / n
    return jnp.clip(jnp.minimum(hi[..., None], edges[1:]) -
                    jnp.maximum(lo[..., None], edges[:-1]), 0.0)

  rows = coverage(boxes[..., 1], boxes[..., 3], h)
  cols = coverage(boxes[..., 0], boxes[..., 2], w)
  weights = (rows[..., :, None] * cols[..., None, :]).reshape(*boxes.shape[:2], h * w)
  weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-12)
  return jnp.einsum("bmp,bpc->bmc", weights.astype(patches.dtype), patches)


class AugmentationEmbedding(nn.Module):
  """Augmentation vectors [B, A] -> [B, width] offsets of the pooled image feature."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, augs, width):
    h = nn.Dense(self.hidden, dtype=self.dtype, name="hidden",
                 kernel_init=layers.partitioned(nn.initializers.lecun_normal(), None, "mlp"),
                 bias_init=layers.partitioned(nn.initializers.zeros, "mlp"))(
                     augs.astype(self.dtype))
    return nn.Dense(width, dtype=self.dtype, name="out",
                    kernel_init=layers.partitioned(nn.initializers.zeros, "mlp", "embed"),
                    bias_init=layers.partitioned(nn.initializers.zeros, "embed"))(
                        nn.gelu(h, approximate=False))


class TwoTowers(nn.Module):
  """Image tower `img`, text tower `txt`, bias-free projections, logit scale.

  `encode_image` needs only the image tower's `__call__(images, train=)` and
  `encode_text` the text tower's `__call__(tokens)`; the piecewise methods below call
  the tower's `stem`, `blocks(x, start, stop)`, `head`, `pre_norm` and `norm`.
  """
  img: nn.Module
  txt: nn.Module
  concept_encoder: nn.Module | None = None  # ViCHA's concept text encoder, or None
  embed_dim: int = 512
  dtype: Any = jnp.float32
  logit_scale_init: float = math.log(1 / 0.07)
  logit_scale_range: tuple[float, float] = (1.0, 100.0)  # CLIP's clamp at 100 [paper]
  aug_mlp_width: int = 0  # hidden width of the augmentation embedding; 0: none

  def setup(self):
    def projection():
      return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                      kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                     "embed", "joint"))
    self.img_proj = projection()
    self.txt_proj = projection()
    self.param("logit_scale", layers.partitioned(
        nn.initializers.constant(self.logit_scale_init)), ())
    if self.aug_mlp_width:
      self.aug_embed = AugmentationEmbedding(self.aug_mlp_width, self.dtype)
    if self.concept_encoder is not None:  # the official kw_proj: text width -> image width
      self.concept_proj = nn.Dense(
          self.img.width, dtype=self.dtype,
          kernel_init=layers.partitioned(nn.initializers.lecun_normal(), None, "embed"),
          bias_init=layers.partitioned(nn.initializers.zeros, "embed"))

  def concept_tokens(self, tokens):
    """ViCHA's concept text tokens [B, L] -> (image-width tokens [B, L, W], real count
    [B]): the concept encoder's final tokens through a linear map [paper]."""
    if self.concept_encoder is None:
      raise ValueError("Concept tokens need the concept encoder: set model.concept_depth > 0.")
    x = self.concept_proj(self.concept_encoder(tokens)["tokens"])
    return x, layers.valid_lengths(tokens)

  def _concepts(self, concepts):
    return None if concepts is None else self.concept_tokens(concepts)

  def encode_image(self, images, concepts=None, *, train=False):
    """Images [B, H, W, 3] -> dict(embedding [B, D], pooled [B, W], tokens [B, P, W],
    token_embeddings [B, P, D], cls_layers [depth, B, W], grid (h, w)), and for a ViT
    levels [B, depth, W] (the block readouts after the final norm).

    With patch dropout at train time `tokens` holds only the kept patches; `grid`
    is always the full patch grid. `concepts` [B, L]: ViCHA's concept text, encoded and
    appended to the ViT's input after the patches (`concept_tokens`); None: none.
    """
    extra = self._concepts(concepts)
    out = dict(self.img(images, train=train, **({} if extra is None else {"extra": extra})))
    out["embedding"] = self.image_project(out["pooled"])
    out["token_embeddings"] = self.image_project(out["tokens"])
    return out

  def encode_image_masked(self, images, *, train=False, mask_ratio=0.75):
    """MAE's pass [paper]: images [B, H, W, 3] -> dict(tokens [B, 1 + K, W] (the class
    token and the K = int(P * (1 - mask_ratio)) kept patches in raster order, after the
    final norm), mask [B, P] (1.0 where a patch is masked, 0.0 where kept; a float so
    that GradCache can differentiate every output), pixels [B, P, p*p*3] (every patch's
    pixels, the reconstruction target)). The mask is drawn per example from the
    `dropout` rng stream, at train and eval time alike (`train` is accepted for
    symmetry)."""
    del train
    pixels, _ = patchify(images, self.img.patch_size)
    keep = max(1, int(pixels.shape[1] * (1 - mask_ratio)))
    tokens, kept = self.img.masked(images, keep, self.make_rng("dropout"))
    b = pixels.shape[0]
    mask = jnp.ones(pixels.shape[:2], jnp.float32).at[jnp.arange(b)[:, None], kept].set(0.0)
    return dict(tokens=tokens, mask=mask, pixels=pixels.astype(jnp.float32))

  def encode_image_with_augs(self, images, augs, *, train=False):
    """Images [B, H, W, 3] and their augmentation vectors [B, A] -> `encode_image`'s
    dict, with the augmentation embedding added to `pooled` before its projection (the
    patch tokens are the tower's own)."""
    if not self.aug_mlp_width:
      raise ValueError("The augmentation-aware embedding needs model.aug_mlp_width > 0.")
    out = self.encode_image(images, train=train)
    pooled = out["pooled"]
    pooled = pooled + self.aug_embed(augs, pooled.shape[-1]).astype(pooled.dtype)
    return dict(out, pooled=pooled, embedding=self.image_project(pooled))

  def encode_text(self, tokens, *, train=False):
    """Tokens [B, L] -> dict(embedding [B, D], pooled [B, W], tokens [B, L, W],
    token_embeddings [B, L, D], cls_layers [depth, B, W], levels [B, depth, W]).

    `train` is accepted for symmetry with `encode_image`; the text tower has no
    stochastic layer.
    """
    del train
    out = dict(self.txt(tokens))
    out["embedding"] = self.text_project(out["pooled"])
    out["token_embeddings"] = self.text_project(out["tokens"])
    return out

  def __call__(self, images, tokens):
    image = self.encode_image(images)
    if self.is_initializing():  # `init` also creates the optional parts.
      if self.roi_source:
        self.img.rois(jnp.zeros((1, 1, self.img.roi_input_dim), self.dtype),
                      jnp.ones((1, 1), bool))
      if self.aug_mlp_width:
        self.aug_embed(jnp.zeros((1, AUG_DIM), self.dtype), image["pooled"].shape[-1])
      if self.concept_encoder is not None:
        self.concept_tokens(tokens)
    return image, self.encode_text(tokens)

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

  # PyramidCLIP: the image tower as f1 then f2, and the ROI path through f2 only.

  @property
  def roi_source(self):
    """Where region features come from: 'boxes', 'features', or None (no ROI path)."""
    return getattr(self.img, "roi", None)

  def _check_roi_path(self):
    if self.roi_source is None:
      raise ValueError("The ROI path needs model.pyramid.roi.source ('boxes' or 'features').")

  def image_f1(self, images, concepts=None, *, train=False):
    """f1 -> dict(tokens (f2's input), patches [B, P, W'] (the patch grid), grid, ...);
    a ViT also returns cls_layers and the rest of f2's input (lengths, extra).
    `concepts` as for `encode_image` (ViT)."""
    extra = self._concepts(concepts)
    return self.img.f1(images, train=train, **({} if extra is None else {"extra": extra}))

  def image_f2(self, tokens, grid, **f1_rest):
    """f2 on `image_f1`'s tokens -> dict(embedding [B, D], pooled [B, W], cls_layers);
    `f1_rest`: image_f1's lengths and extra, when it has them."""
    out = dict(self.img.f2(tokens, grid, **f1_rest))
    return dict(out, embedding=self.image_project(out["pooled"]))

  def image_rois(self, regions, boxes, mask):
    """Regions through f2 only -> dict(embedding [B, D], pooled [B, W]).

    regions [B, M, F]: one feature per region (stored, or `pool_boxes` of f1 patches);
    boxes [B, M, 4]; mask [B, M] (True: a real region). Padded regions change nothing.
    """
    self._check_roi_path()
    inputs = jnp.concatenate([regions, boxes.astype(regions.dtype)], axis=-1)
    if inputs.shape[-1] != self.img.roi_input_dim:
      raise ValueError(f"Region features have width {regions.shape[-1]}; the ROI path takes "
                       f"{self.img.roi_input_dim - BOX_DIM} (model.pyramid.roi.feature_dim "
                       "with roi.source='features', the f1 width with 'boxes').")
    pooled = self.img.rois(inputs, mask)
    return dict(embedding=self.image_project(pooled), pooled=pooled)

  def encode_image_with_rois(self, images, rois, concepts=None, *, train=False):
    """One view and its regions, f1 run once -> dict(embedding, pooled, roi_embedding,
    roi_pooled), and for a ViT levels [B, depth, W] (every block's readout after the
    final norm).

    `rois`: dict(boxes [B, M, 4] in the view's coordinates, mask [B, M], and features
    [B, M, F] when `roi_source` is 'features'). A view without a real region gets the
    whole view as its one region (`whole_view_if_empty`). `concepts` as for
    `encode_image`: they join the view's tokens in f1 and f2, not the regions' path.
    """
    self._check_roi_path()
    rois = whole_view_if_empty(rois)
    f1 = self.image_f1(images, concepts, train=train)
    rest = {k: f1[k] for k in ("lengths", "extra") if k in f1}
    out = self.image_f2(f1["tokens"], f1["grid"], **rest)
    if "cls_layers" in f1:
      out["levels"] = self.img.levels(jnp.concatenate([f1["cls_layers"], out["cls_layers"]]))
    del out["cls_layers"]
    if self.roi_source == "boxes":
      regions = pool_boxes(f1["patches"], f1["grid"], rois["boxes"])
    elif "features" in rois:
      regions = rois["features"]
    else:
      raise ValueError("roi.source='features' needs rois/features in the batch; the "
                       "dataset has no stored region features (use roi.source='boxes').")
    roi = self.image_rois(regions, rois["boxes"], rois["mask"])
    return dict(out, roi_embedding=roi["embedding"], roi_pooled=roi["pooled"])

  def image_project(self, x):
    """[..., W] image features -> L2-normalised float32 joint embeddings [..., D]."""
    return l2_normalize(self.img_proj(x))

  def text_project(self, x):
    """[..., W] text features -> L2-normalised float32 joint embeddings [..., D]."""
    return l2_normalize(self.txt_proj(x))
