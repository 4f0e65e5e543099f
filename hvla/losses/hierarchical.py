"""ViCHA's layer-wise alignment (METHODS.md §2): intermediate layers aligned level to level.

Besides the main image-text term (a 'clip' or 'momentum' term on the last layers), the
class tokens of intermediate layers are aligned top-down, one level per (image layer,
text layer) pair [paper, official code: image blocks 7..11 with text layers 1..5 of its
6-layer text tower]. Each level's features are the towers' `levels` (every block's
readout after the tower's final LayerNorm [paper]), through the level's **own** linear
head per tower (width -> `embed_dim`, with bias [paper]) and L2-normalised; the level's
loss is the symmetric InfoNCE with hard targets over the global batch [paper], with the
towers' shared logit scale (ViCHA shares one temperature, init 0.07 and clamped to
[0.001, 0.5] [paper]: `model.logit_scale_range` (2, 1000) in configs/vicha.py). The
term's value is the weighted sum over levels (weights 1 each, the term weight 0.1
[paper]).

Stop-gradient columns [paper]: the official code scores each device's rows against the
all-gathered columns, which carry no gradient, the device's own included; so every
embedding gets its gradient only as an anchor (`stop_grad_cols`, default on). Its
targets, though, mark column i of the [B, world x B] matrix, i.e. device 0's sample:
on every other device the positive is wrong. Here the targets are the global diagonal
(the correct variant); ViCHA's published numbers come from the buggy one.

Defaults [ours]: with `pairs` empty, the last min(6, depths) layers of each tower
top-aligned, the final pair left to the main term: image 7..11 with text 1..5 for
12- and 6-layer towers (the official pairs), 7..11 with 7..11 for equal depths 12.
`embed_dim` 0 is the model's joint width. Heads start as hvla's projections do
(LeCun-normal kernels, zero bias).

Parameters: `params['objective'][name]['image' | 'text']['kernel']` [levels, W, D] and
`['bias']` [levels, D].
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from hvla.losses import contrastive
from hvla.losses.clip import check_concepts, image_pass
from hvla.losses.objective import Pass, Term, register
from hvla.models import TextTransformer, ViT, l2_normalize

TOP_LEVELS = 6  # ViCHA aligns the top 6 layers of each tower, the last in the main loss


def default_pairs(image_depth, text_depth):
  """(image layer, text layer) pairs, 1-indexed: the top min(6, depths) layers of each
  tower top-aligned, without the final pair (the main term's)."""
  n = min(TOP_LEVELS, image_depth, text_depth)
  return tuple((image_depth - k, text_depth - k) for k in range(n - 1, 0, -1))


@register("hierarchical")
class Hierarchical(Term):
  """Options (the keys of `config.objective.terms.<name>` besides type and weight):

  pairs: ((image layer, text layer), ...), 1-indexed blocks; () the default above.
  level_weights: one weight per pair; () all 1.
  embed_dim: the heads' output width; 0 the model's `embed_dim`.
  stop_grad_cols: the columns of each direction carry no gradient (ViCHA [paper]).
  image_view, rois, concepts: the image pass, as for a 'clip' term (share it with the
    main term so the tower runs once).
  text_field: batch['tokens'][text_field] is the text.
  strategy, block_size: how each level's loss is computed (`contrastive_loss`).
  """

  def __init__(self, *, pairs=(), level_weights=(), embed_dim=0, stop_grad_cols=True,
               image_view="image", rois=False, concepts="", text_field="caption",
               strategy="dense", block_size=None):
    pairs = tuple(tuple(p) for p in pairs)
    if any(len(p) != 2 or not all(isinstance(v, int) and v >= 1 for v in p) for p in pairs):
      raise ValueError(f"pairs must be (image layer, text layer) pairs of 1-indexed "
                       f"layers, got {pairs}")
    if len(set(pairs)) != len(pairs):
      raise ValueError(f"pairs has a pair twice: {pairs}")
    level_weights = tuple(float(w) for w in level_weights)
    if any(w < 0 for w in level_weights):
      raise ValueError(f"level_weights must be >= 0, got {level_weights}")
    if level_weights and pairs and len(level_weights) != len(pairs):
      raise ValueError(f"level_weights has {len(level_weights)} weights for "
                       f"{len(pairs)} pairs")
    if not isinstance(embed_dim, int) or embed_dim < 0:
      raise ValueError(f"embed_dim must be an int >= 0, got {embed_dim!r}")
    contrastive.check_options("softmax", 0.0, strategy, block_size)
    self.pairs, self.level_weights, self.embed_dim = pairs, level_weights, embed_dim
    self.stop_grad_cols = bool(stop_grad_cols)
    self.image_view, self.rois, self.concepts = image_view, bool(rois), concepts
    self.text_field = text_field
    self.strategy, self.block_size = strategy, block_size
    self.widths = None  # (image width, text width, joint width), from the model

  def passes(self):
    return {"image": image_pass(self.image_view, self.rois, self.concepts, ("levels",)),
            "text": Pass("encode_text", (f"tokens/{self.text_field}",), outputs=("levels",))}

  def attach(self, model):
    where = f"config.objective.terms.{self.name}"
    if not (isinstance(model.img, ViT) and isinstance(model.txt, TextTransformer)):
      raise ValueError(f"{where}: layer-wise alignment needs transformer towers (ViT and "
                       f"text transformer), got {type(model.img).__name__} and "
                       f"{type(model.txt).__name__}")
    depths = (model.img.depth, model.txt.depth)
    if not self.pairs:
      self.pairs = default_pairs(*depths)
      if not self.pairs:
        raise ValueError(f"{where}: towers of depths {depths} have no intermediate layers "
                         "to align; set pairs")
    for image, text in self.pairs:
      if image > depths[0] or text > depths[1]:
        raise ValueError(f"{where}.pairs: ({image}, {text}) lies outside the towers' "
                         f"depths {depths}")
    if self.level_weights and len(self.level_weights) != len(self.pairs):
      raise ValueError(f"{where}.level_weights: {len(self.level_weights)} weights for "
                       f"{len(self.pairs)} pairs {self.pairs}")
    if self.rois and model.roi_source is None:
      raise ValueError(f"{where}: rois=True needs the ROI path (model.pyramid.roi.source)")
    check_concepts(self, model)
    self.widths = (model.img.width, model.txt.width, self.embed_dim or model.embed_dim)

  def init_params(self, rng):
    """One linear head per level and tower, stacked on a leading level axis."""
    image_width, text_width, joint = self.widths
    n = len(self.pairs)
    kernel = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=0)

    def heads(key, width):
      return {"kernel": nn.LogicallyPartitioned(kernel(key, (n, width, joint)),
                                                names=(None, "embed", "joint")),
              "bias": nn.LogicallyPartitioned(jnp.zeros((n, joint)), names=(None, "joint"))}
    image_key, text_key = jax.random.split(rng)
    return {"image": heads(image_key, image_width), "text": heads(text_key, text_width)}

  def level_embeddings(self, own, image_levels, text_levels):
    """[(image [B, D], text [B, D]) per level]: the levels' features through their
    heads, L2-normalised (float32)."""
    out = []
    for index, (image, text) in enumerate(self.pairs):
      def head(side, x):
        return l2_normalize(x.astype(jnp.float32) @ own[side]["kernel"][index] +
                            own[side]["bias"][index])
      out.append((head("image", image_levels[:, image - 1]),
                  head("text", text_levels[:, text - 1])))
    return out

  def loss(self, params, state, features, ctx):
    del state, ctx
    scale = jnp.exp(params["logit_scale"])
    weights = self.level_weights or (1.0,) * len(self.pairs)
    levels = self.level_embeddings(self.own(params), features["image"]["levels"],
                                   features["text"]["levels"])
    total, metrics = 0.0, {}
    for (image, text), weight, (x, y) in zip(self.pairs, weights, levels):
      value = contrastive.contrastive_loss(
          x, y, scale=scale, symmetric=True, stop_grad_cols=self.stop_grad_cols,
          strategy=self.strategy, block_size=self.block_size)
      metrics[f"image{image}_text{text}"] = value
      total = total + weight * value
    return total, metrics
