"""Phrase grounding from patch-level similarity maps: pointing game and box accuracy.

A phrase is embedded as the mean of the caption's token embeddings over its token span,
renormalised [ours]; its map is the cosine similarity of that embedding to every patch
token of the image, on the patch grid. Two metrics over all real phrases:

- pointing game [paper, standard]: the centre of the map's highest cell lies in the
  ground-truth box (ties go to the first cell in row-major order);
- box accuracy at IoU 0.5 [ours for the box rule]: the map is min-max scaled to [0, 1],
  the cells at or above `box_threshold` are kept, and the predicted box is the bounding
  box of all kept cells; a hit when its IoU with the ground-truth box is at least 0.5.

Boxes are (x0, y0, x1, y1) in [0, 1] of the image view, as in `phrases/boxes`.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hvla.evaluators import common


def default_config():
  return ml_collections.ConfigDict(dict(
      type="grounding",
      every_steps=1000,
      data={},  # Overrides of the training config.data (dataset name, views...).
      split=None,  # None: config.data.eval_split.
      view="image",  # Images are read from `images/<view>`.
      text="caption",  # The phrases' spans index `tokens/<text>`.
      batch_size=256,
      box_threshold=0.5,  # Fraction of the min-max scaled map kept for the predicted box.
      num_images=8,  # Heatmaps logged per run (the first phrases of the split).
  ))


def phrase_maps(image_tokens, grid, text_tokens, spans):
  """Similarity of every phrase to every patch: [B, P, h, w].

  image_tokens [B, h*w, D] and text_tokens [B, L, D] normalised; spans [B, P, 2] token
  ranges [start, end) into the text.
  """
  positions = jnp.arange(text_tokens.shape[1])
  in_span = (positions >= spans[..., :1]) & (positions < spans[..., 1:])
  phrases = common.normalize(jnp.einsum("bpl,bld->bpd", in_span.astype(text_tokens.dtype),
                                        text_tokens))
  sims = jnp.einsum("bpd,bnd->bpn", phrases, image_tokens, precision=jax.lax.Precision.HIGHEST)
  return sims.reshape(*sims.shape[:2], *grid)


def pointing_hits(maps, boxes):
  """Whether the centre of each map's highest cell lies in its box (edges included)."""
  h, w = maps.shape[-2:]
  flat = jnp.argmax(maps.reshape(*maps.shape[:-2], h * w), axis=-1)
  x, y = (flat % w + 0.5) / w, (flat // w + 0.5) / h
  return ((boxes[..., 0] <= x) & (x <= boxes[..., 2]) &
          (boxes[..., 1] <= y) & (y <= boxes[..., 3]))


def scale_maps(maps):
  """Min-max scaling of each map to [0, 1]; a constant map becomes all ones."""
  low = maps.min(axis=(-2, -1), keepdims=True)
  high = maps.max(axis=(-2, -1), keepdims=True)
  return jnp.where(high > low, (maps - low) / jnp.where(high > low, high - low, 1.0), 1.0)


def map_boxes(maps, threshold):
  """Bounding box (x0, y0, x1, y1) of the cells whose scaled value is >= `threshold`."""
  h, w = maps.shape[-2:]
  kept = scale_maps(maps) >= threshold
  rows, cols = kept.any(axis=-1), kept.any(axis=-2)
  y0, y1 = jnp.argmax(rows, axis=-1), h - jnp.argmax(rows[..., ::-1], axis=-1)
  x0, x1 = jnp.argmax(cols, axis=-1), w - jnp.argmax(cols[..., ::-1], axis=-1)
  return jnp.stack([x0 / w, y0 / h, x1 / w, y1 / h], axis=-1)


def box_iou(a, b):
  """IoU of boxes (x0, y0, x1, y1) along the last axis; 0 for two empty boxes."""
  width = jnp.clip(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
  height = jnp.clip(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
  inter = width * height
  area = lambda box: (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
  union = area(a) + area(b) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def render_heatmap(image, heat, true_box, pred_box):
  """uint8 [H, W, 3]: the image (min-max scaled) under the heat map in red, the
  ground-truth box in green and the predicted box in blue."""
  image = np.asarray(image, np.float32)
  image = (image - image.min()) / max(image.max() - image.min(), 1e-6)
  size_h, size_w = image.shape[:2]
  rows = np.arange(size_h) * heat.shape[0] // size_h
  cols = np.arange(size_w) * heat.shape[1] // size_w
  alpha = 0.6 * np.asarray(heat)[rows][:, cols, None]
  out = (1 - alpha) * image + alpha * np.array([1.0, 0.0, 0.0])
  for box, colour in ((true_box, (0.0, 1.0, 0.0)), (pred_box, (0.0, 0.0, 1.0))):
    x0, y0, x1, y1 = np.asarray(box, np.float64) * [size_w, size_h, size_w, size_h]
    x0, x1 = np.clip([np.floor(x0), np.ceil(x1) - 1], 0, size_w - 1).astype(int)
    y0, y1 = np.clip([np.floor(y0), np.ceil(y1) - 1], 0, size_h - 1).astype(int)
    out[y0:y1 + 1, [x0, x1]] = colour
    out[[y0, y1], x0:x1 + 1] = colour
  return np.round(out * 255).astype(np.uint8)


@common.register("grounding")
class Grounding(common.Evaluator):
  """Metrics: `pointing`, `box_acc` (IoU >= 0.5); images: `heatmaps`."""

  default_config = staticmethod(default_config)

  @staticmethod
  def reads(config):
    return {"split": config.split}, (f"images/{config.view}", f"tokens/{config.text}",
                                     "phrases/spans", "phrases/boxes", "phrases/mask")

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    self.keys = self.reads(config)[1]
    maps = functools.partial(_maps, self.encoders, *self.keys[:3])
    self._hits = common.per_example_step(
        functools.partial(_hits, maps, config.box_threshold), self.mesh)
    self._pictures = common.per_example_step(
        functools.partial(_pictures, maps, self.keys[0], config.box_threshold), self.mesh)

  def run(self, params):
    batches = iter(self.source.batches(self.config.split))
    first = next(batches, None)
    if first is None:
      raise ValueError(f"config.evals.{self.name}: the split yielded no batches.")
    out = common.collect(self._hits, itertools.chain([first], batches), self.mesh, self.keys,
                         params)
    mask = out["mask"]
    if not mask.any():
      raise ValueError(f"config.evals.{self.name}: the split has no phrases to ground.")
    scalars = {"pointing": out["pointing"][mask].mean(), "box_acc": out["box_hit"][mask].mean()}
    return self._scalars(scalars), self._heatmaps(params, first)

  def _heatmaps(self, params, batch):
    """Heatmaps of the first `num_images` phrases of the first batch."""
    pics = common.collect(self._pictures, [batch], self.mesh, self.keys, params)
    shown = list(zip(*np.nonzero(pics["mask"])))[:self.config.num_images]
    images = [render_heatmap(pics["image"][b], pics["heat"][b, p], pics["true_box"][b, p],
                             pics["pred_box"][b, p]) for b, p in shown]
    return {f"{self.name}/heatmaps": np.stack(images)} if images else {}


def _maps(encoders, image_key, text_key, spans_key, params, batch):
  image = encoders.image(params, batch[image_key])
  text = encoders.text(params, batch[text_key])
  return phrase_maps(image["token_embeddings"], image["grid"], text["token_embeddings"],
                     batch[spans_key])


def _hits(maps_fn, threshold, params, batch):
  maps = maps_fn(params, batch)
  boxes = batch["phrases/boxes"]
  return {"pointing": pointing_hits(maps, boxes),
          "box_hit": box_iou(map_boxes(maps, threshold), boxes) >= 0.5,
          "mask": batch["phrases/mask"]}


def _pictures(maps_fn, image_key, threshold, params, batch):
  maps = maps_fn(params, batch)
  return {"image": batch[image_key], "heat": scale_maps(maps),
          "true_box": batch["phrases/boxes"], "pred_box": map_boxes(maps, threshold),
          "mask": batch["phrases/mask"]}
