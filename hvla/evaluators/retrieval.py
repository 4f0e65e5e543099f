"""Zero-shot image-text retrieval, Recall@1/5/10 in both directions.

Follows the COCO 5k / Flickr30k 1k convention [paper]: an image counts as retrieved at K
when any of its captions is among the K captions most similar to it; a caption counts
when its own image is among the K most similar images. A batch holds either one caption
per image (`tokens/<text>` [B, L]) or several (`[B, C, L]`, all-pad rows for absent
captions).

Identical captions (the same token rows: duplicates, templated captions) embed
identically, so no model tells their images apart: the `*_r1_ceiling` metrics are the
best R@1 any model can reach on the split, 1.0 when every caption is distinct.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hvla.evaluators import common

KS = (1, 5, 10)


def default_config():
  return ml_collections.ConfigDict(dict(
      type="retrieval",
      every_steps=1000,
      data={},  # Overrides of the training config.data (dataset, text.captions_per_image...).
      split=None,  # None: config.data.eval_split.
      view="image",  # Images are read from `images/<view>`.
      text="caption",  # Captions are read from `tokens/<text>`.
      batch_size=256,
  ))


@jax.jit
def retrieval_ranks(images, texts, owner):
  """Ranks of the first correct caption per image and of the own image per caption.

  images [N, D], texts [M, D], owner [M] (the image index of each caption). The [N, M]
  similarity matrix is materialised once (5k x 25k floats for COCO: 0.5 GB).
  """
  sim = common.similarity(images, texts)
  positives = owner[None, :] == jnp.arange(images.shape[0])[:, None]
  return (common.first_positive_rank(sim, positives),
          common.first_positive_rank(sim.T, positives.T))


def r1_ceilings(tokens, owner, num_images):
  """The highest image->text and text->image R@1 that any model reaches when equal token
  rows get equal embeddings (ties going to the lower index, as in the ranks).

  tokens [M, L] of the captions, owner [M] their images. A group of equal captions ranks
  the images one way: at most the captions of one image in it are hits. An image is a
  hit only if it owns the first caption of a group, which wins every tie in the group.
  """
  _, group = np.unique(tokens, axis=0, return_inverse=True)
  group = group.reshape(-1)
  pairs, counts = np.unique(np.stack([group, owner], axis=1), axis=0, return_counts=True)
  best = np.zeros(group.max() + 1, np.int64)
  np.maximum.at(best, pairs[:, 0], counts)
  first = np.full(len(best), len(owner))
  np.minimum.at(first, group, np.arange(len(owner)))
  return {"i2t_r1_ceiling": len(np.unique(owner[first])) / num_images,
          "t2i_r1_ceiling": best.sum() / len(owner)}


def recalls(image_ranks, text_ranks, ks=KS):
  return {**{f"i2t_r{k}": np.mean(image_ranks < k) for k in ks},
          **{f"t2i_r{k}": np.mean(text_ranks < k) for k in ks}}


@common.register("retrieval")
class Retrieval(common.Evaluator):
  """Metrics: `i2t_r1`, `i2t_r5`, `i2t_r10`, `t2i_r1`, `t2i_r5`, `t2i_r10`, and the R@1
  ceilings `i2t_r1_ceiling`, `t2i_r1_ceiling`."""

  default_config = staticmethod(default_config)

  @staticmethod
  def reads(config):
    return {"split": config.split}, (f"images/{config.view}", f"tokens/{config.text}")

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    self.keys = self.reads(config)[1]
    self._embed = common.per_example_step(
        functools.partial(_embed_pairs, self.encoders, *self.keys), self.mesh)

  def run(self, params):
    out = common.collect(self._embed, self.source.batches(self.config.split), self.mesh,
                         self.keys, params)
    present = out["text_mask"].reshape(-1)
    texts = out["text"].reshape(-1, out["text"].shape[-1])[present]
    owner = np.repeat(np.arange(len(out["image"])), out["text_mask"].shape[1])[present]
    image_ranks, text_ranks = jax.device_get(retrieval_ranks(out["image"], texts, owner))
    tokens = out["tokens"].reshape(-1, out["tokens"].shape[-1])[present]
    return self._scalars({**recalls(image_ranks, text_ranks),
                          **r1_ceilings(tokens, owner, len(out["image"]))}), {}


def _embed_pairs(encoders, image_key, text_key, params, batch):
  """Image embeddings [B, D], caption embeddings [B, C, D], their tokens [B, C, L] and
  which captions exist."""
  image = encoders.image(params, batch[image_key])["embedding"]
  tokens = batch[text_key]
  tokens = tokens[:, None] if tokens.ndim == 2 else tokens
  b, c, length = tokens.shape
  text = encoders.text(params, tokens.reshape(b * c, length))["embedding"]
  return {"image": image, "text": text.reshape(b, c, -1), "tokens": tokens,
          "text_mask": jnp.any(tokens != 0, axis=-1)}
