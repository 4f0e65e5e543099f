"""Zero-shot image-text retrieval, Recall@1/5/10 in both directions.

Follows the COCO 5k / Flickr30k 1k convention [paper]: an image counts as retrieved at K
when any of its captions is among the K captions most similar to it; a caption counts
when its own image is among the K most similar images. A batch holds either one caption
per image (`tokens/<text>` [B, L]) or several (`[B, C, L]`, all-pad rows for absent
captions).
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


def recalls(image_ranks, text_ranks, ks=KS):
  return {**{f"i2t_r{k}": np.mean(image_ranks < k) for k in ks},
          **{f"t2i_r{k}": np.mean(text_ranks < k) for k in ks}}


@common.register("retrieval")
class Retrieval(common.Evaluator):
  """Metrics: `i2t_r1`, `i2t_r5`, `i2t_r10`, `t2i_r1`, `t2i_r5`, `t2i_r10`."""

  default_config = staticmethod(default_config)

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    self.image_key, self.text_key = f"images/{config.view}", f"tokens/{config.text}"
    self._embed = common.per_example_step(
        functools.partial(_embed_pairs, self.encoders, self.image_key, self.text_key), self.mesh)

  def run(self, params):
    out = common.collect(self._embed, self.source.batches(self.config.split), self.mesh,
                         (self.image_key, self.text_key), params)
    present = out["text_mask"].reshape(-1)
    texts = out["text"].reshape(-1, out["text"].shape[-1])[present]
    owner = np.repeat(np.arange(len(out["image"])), out["text_mask"].shape[1])[present]
    image_ranks, text_ranks = jax.device_get(retrieval_ranks(out["image"], texts, owner))
    return self._scalars(recalls(image_ranks, text_ranks)), {}


def _embed_pairs(encoders, image_key, text_key, params, batch):
  """Image embeddings [B, D], caption embeddings [B, C, D] and which captions exist."""
  image = encoders.image(params, batch[image_key])["embedding"]
  tokens = batch[text_key]
  tokens = tokens[:, None] if tokens.ndim == 2 else tokens
  b, c, length = tokens.shape
  text = encoders.text(params, tokens.reshape(b * c, length))["embedding"]
  return {"image": image, "text": text.reshape(b, c, -1),
          "text_mask": jnp.any(tokens != 0, axis=-1)}
