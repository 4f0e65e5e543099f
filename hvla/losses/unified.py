"""UniCLIP (METHODS.md §4): MP-NCE over the image-image and image-text pairs of one space.

Each example contributes its augmented views and its caption: with two views, 3N
embeddings of the global batch. The positives of an anchor are the other embeddings of
its example, its negatives every embedding of the other examples, in both domains
[recon]; the loss is MP-NCE (other positives stay out of each positive's denominator)
averaged over all 3N anchors [recon]. The similarity depends on the domains of the
pair [recon]:

    s_ij = (cos_ij - b_{d(i) d(j)}) / tau_{d(i) d(j)}

with a learnable temperature and offset per domain pair, image-image, image-text and
text-text (symmetric), tau initialised at 0.07 and b at 0 [recon]. The term owns them:
`params['objective'][name]['logit_scale']` (ln 1 / tau) and `['offset']`, each [3] in
that order. Clamps [ours]: 1 / tau within `scale_range` (CLIP's [1, 100]) and b within
`offset_range` ([-1, 1], the range of a cosine), projected after every update.

Image embeddings are augmentation-aware [ours in detail]: each view's recorded
augmentation vector (`batch['augs'][view]`, hvla.data.ops) goes through the towers' MLP
and is added to the pooled feature before the projection
(`TwoTowers.encode_image_with_augs`, `model.aug_mlp_width`). Evaluation uses the neutral
vector `NEUTRAL_AUGS` through the objective's inference path [ours]: the whole image,
no flip, colour jitter, grayscale or blur, which is the eval transform (resize and
centre crop) of a square image; a non-square image's centre crop is not told apart.

Layout [ours]: the 3N set is example-major, (view 1, view 2, caption) of example 0, then
of example 1, and so on. A device's examples are then a contiguous block of the set, so
under the 'sharded' strategy every device's rows stay where its towers produced them:
the set is built without moving the batch.
"""
import math

import jax.numpy as jnp
import numpy as np

from hvla.data import ops
from hvla.losses import contrastive
from hvla.losses.objective import Encoders, Pass, Term, register, towers

PAIRS = ("image_image", "image_text", "text_text")
IMAGE, TEXT = 0, 1  # domain indices
_PAIR_INDEX = np.array([[0, 1], [1, 2]])  # domain pair -> position in PAIRS
NEUTRAL_AUGS = ops.identity_augs()


@register("unified")
class Unified(Term):
  """Options (the keys of `config.objective.terms.<name>` besides type and weight):

  views: the names in `config.data.views` of the image views (1 or more).
  text_field: batch['tokens'][text_field] is the caption.
  pairs: the domain pairs that are scored; a pair left out is neither positive nor
    negative (without 'image_image' and 'text_text', one view is CLIP's loss).
  augmentation_aware: embed each view with its augmentation vector (needs
    model.aug_mlp_width > 0); False: the towers' plain image embedding.
  tau_init, offset_init: the initial temperature and offset of every domain pair.
  scale_range, offset_range: the clamps of 1 / tau and of b.
  strategy, block_size: how MP-NCE is computed (`contrastive_loss`); by default those
    of `config.objective`.
  """

  def __init__(self, *, views=("view1", "view2"), text_field="caption", pairs=PAIRS,
               augmentation_aware=True, tau_init=0.07, offset_init=0.0,
               scale_range=(1.0, 100.0), offset_range=(-1.0, 1.0), strategy="dense",
               block_size=None):
    views, pairs = tuple(views), tuple(pairs)
    if not views or len(set(views)) != len(views):
      raise ValueError(f"views must name one or more distinct views, got {views}")
    unknown = sorted(set(pairs) - set(PAIRS))
    if unknown or not pairs:
      raise ValueError(f"pairs must be a non-empty subset of {PAIRS}, got {pairs}")
    if "image_text" not in pairs and ("image_image" not in pairs or len(views) < 2):
      raise ValueError(f"pairs={pairs} with {len(views)} view(s) leave no positive pair")
    low, high = scale_range
    if not 0 < low <= 1 / tau_init <= high:
      raise ValueError(f"1 / tau_init = {1 / tau_init:.4g} must lie in scale_range "
                       f"{tuple(scale_range)}, whose low end must be > 0")
    if not offset_range[0] <= offset_init <= offset_range[1]:
      raise ValueError(f"offset_init {offset_init} must lie in offset_range "
                       f"{tuple(offset_range)}")
    contrastive.check_options("mpnce", 0.0, strategy, block_size)
    self.views, self.text_field, self.pairs = views, text_field, pairs
    self.augmentation_aware = bool(augmentation_aware)
    self.tau_init, self.offset_init = float(tau_init), float(offset_init)
    self.scale_range = (float(low), float(high))
    self.offset_range = tuple(float(v) for v in offset_range)
    self.strategy, self.block_size = strategy, block_size

  def passes(self):
    def image(view):
      if self.augmentation_aware:
        return Pass("encode_image_with_augs", (f"images/{view}", f"augs/{view}"))
      return Pass("encode_image", (f"images/{view}",))
    return {**{f"image_{i}": image(v) for i, v in enumerate(self.views)},
            "text": Pass("encode_text", (f"tokens/{self.text_field}",))}

  def attach(self, model):
    if self.augmentation_aware and not model.aug_mlp_width:
      raise ValueError(f"config.objective.terms.{self.name}: augmentation_aware=True needs "
                       "the augmentation embedding: set model.aug_mlp_width > 0")

  def init_params(self, rng):
    del rng
    return {"logit_scale": jnp.full((len(PAIRS),), math.log(1 / self.tau_init), jnp.float32),
            "offset": jnp.full((len(PAIRS),), self.offset_init, jnp.float32)}

  def param_bounds(self):
    return {"logit_scale": tuple(math.log(v) for v in self.scale_range),
            "offset": self.offset_range}

  def loss(self, params, state, features, ctx):
    del state, ctx
    own = self.own(params)
    scale, offset = jnp.exp(own["logit_scale"]), own["offset"]
    parts = [features[f"image_{i}"]["embedding"] for i in range(len(self.views))]
    parts.append(features["text"]["embedding"])
    n, k = parts[0].shape[0], len(parts)
    ids = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
    domains = jnp.tile(jnp.asarray([IMAGE] * (k - 1) + [TEXT], jnp.int32), n)
    z = jnp.stack(parts, axis=1).reshape(n * k, -1)  # example-major (module docstring)
    value = contrastive.contrastive_loss(
        z, z, scale=scale[_PAIR_INDEX], bias=offset[_PAIR_INDEX], kind="mpnce",
        row_ids=ids, col_ids=ids, row_domains=domains, col_domains=domains,
        exclude_self=True, symmetric=False, domain_mask=self.domain_mask(),
        strategy=self.strategy, block_size=self.block_size)
    metrics = {}
    for index, pair in enumerate(PAIRS):
      metrics[f"tau_{pair}"] = 1.0 / scale[index]
      metrics[f"offset_{pair}"] = offset[index]
    return value, metrics

  def domain_mask(self):
    """[2, 2] bools: which domain pairs are scored; None when all are."""
    if set(self.pairs) == set(PAIRS):
      return None
    return np.isin(np.asarray(PAIRS)[_PAIR_INDEX], self.pairs)

  def encoders(self, model):
    """The image embedding the method defines: the views' with the neutral vector."""
    if not self.augmentation_aware:
      return None
    neutral = jnp.asarray(NEUTRAL_AUGS)

    def image(params, images):
      augs = jnp.broadcast_to(neutral, (images.shape[0], neutral.shape[0]))
      return model.apply({"params": towers(params)}, images, augs,
                         method="encode_image_with_augs")
    return Encoders(image=image, text=Encoders.of_towers(model).text)
