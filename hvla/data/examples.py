"""One record -> one example of the batch layout in docs/design.md (without batch axis).

Records that cannot be used become placeholder rows with `valid=False` and a one-hot
`_bad` count of the reason (see ops.BAD_REASONS); the pipeline drops them in training
and keeps them, masked, in evaluation.
"""
import math

import grain
import numpy as np

from hvla.data import ops
from hvla.data import text as text_lib
from hvla.data.text import as_str

_MALFORMED = (ValueError, TypeError, IndexError, KeyError, UnicodeDecodeError)


def layout(config, views, features, train=True):
  """(shape, dtype) of every field of one example, as the nested batch dict."""
  spec = {"images": {v: ((o["size"], o["size"], 3), np.float32) for v, o in views.items()},
          "augs": {v: ((len(ops.AUG_FIELDS),), np.float32) for v in views},
          "valid": ((), np.bool_)}
  fields, length = config.text.fields, config.text.max_len
  if fields:
    spec["tokens"] = {f: ((length,), np.int32) for f in fields}
    per_image = captions_per_image(config, train)
    if per_image > 1:
      spec["tokens"]["caption"] = ((per_image, length), np.int32)
  m = config.rois.max_regions
  if m:
    spec["rois"] = {"boxes": ((m, 4), np.float32), "mask": ((m,), np.bool_)}
    roi_dim = roi_feature_dim(features)
    if roi_dim:
      spec["rois"]["features"] = ((m, roi_dim), np.float32)
  p = config.phrases.max_phrases
  if p and "caption" in fields:
    spec["phrases"] = {"spans": ((p, 2), np.int32), "mask": ((p,), np.bool_)}
    if "phrase_boxes" in features:
      spec["phrases"]["boxes"] = ((p, 4), np.float32)
  if config.labels:
    spec["labels"] = {n: ((), np.int32) for n in config.labels}
  return spec


def captions_per_image(config, train):
  """Caption rows of `tokens/caption`: C in evaluation, 1 (a drawn caption) in training."""
  return 1 if train else config.text.captions_per_image


def roi_feature_dim(features):
  rois = features["rois"] if "rois" in features else {}
  return rois["features"].shape[-1] if "features" in rois else 0


def check_features(config, features, name):
  """Config/dataset mismatches fail up front, naming the key."""
  if "image" not in features:
    raise ValueError(f"dataset {name!r} has no image feature (features: "
                     f"{sorted(features.keys())})")
  if config.text.fields and "caption" not in features:
    raise ValueError(f"config.data.text.fields={tuple(config.text.fields)} but dataset "
                     f"{name!r} has no caption; set config.data.text.fields=()")
  per_image = config.text.captions_per_image
  if per_image > 1 and "captions" not in features:
    raise ValueError(f"config.data.text.captions_per_image={per_image} but dataset {name!r} "
                     "has no captions feature (several captions per image); build it with "
                     "python -m hvla.tools.build_dataset or set captions_per_image=1")
  for label in config.labels:
    if label not in features:
      raise ValueError(f"config.data.labels: dataset {name!r} has no feature {label!r} "
                       f"(features: {sorted(features.keys())})")


def _zeros(spec):
  if isinstance(spec, dict):
    return {k: _zeros(v) for k, v in spec.items()}
  return np.zeros(*spec)


def _padded(values, length, fill_shape, dtype):
  out = np.zeros((length,) + fill_shape, dtype)
  values = np.asarray(values, dtype)[:length]
  out[:len(values)] = values
  return out


class ExampleBuilder(grain.transforms.RandomMap):
  """Decodes, augments and tokenises one record (random ops only when training)."""

  def __init__(self, config, views, tokenizer, features, train):
    self._views = views
    self._box_view = config.box_view or sorted(views)[0]
    self._tokenizer = tokenizer
    self._train = train
    self._text = config.text.to_dict()
    self._captions_per_image = captions_per_image(config, train)
    self._max_regions = config.rois.max_regions
    self._min_visible = config.rois.min_visible
    self._max_phrases = config.phrases.max_phrases
    self._labels = tuple(config.labels)
    self._mean, self._std = tuple(config.normalization.mean), tuple(config.normalization.std)
    self._limits = config.image_limits.to_dict()
    self._spec = layout(config, views, features, train)
    # Decode JPEGs at the lowest resolution that still feeds every view fully.
    self._draft_side = math.ceil(max(
        o["size"] / (math.sqrt(o["crop_scale"][0]) if train else 1.0)
        for o in views.values()))

  @property
  def spec(self):
    return self._spec

  def random_map(self, element, rng):
    bad = np.zeros(len(ops.BAD_REASONS), np.int32)
    if element.get("pad"):
      example = _zeros(self._spec)
    else:
      try:
        if "error" in element:
          raise ops.BadRecord("unreadable", element["error"])
        example = self._example(element["record"], rng if self._train else None)
      except ops.BadRecord as e:
        bad[ops.BAD_REASONS.index(e.reason)] = 1
      except _MALFORMED:
        bad[ops.BAD_REASONS.index("malformed")] = 1
      if bad.any():
        example = _zeros(self._spec)
    example["_bad"] = bad
    return example

  # -----------------------------------------------------------------------------------
  def _example(self, record, rng):
    img = ops.decode_image(record["image"], draft_side=self._draft_side, **self._limits)
    w, h = img.size
    example = {"images": {}, "augs": {}, "valid": np.True_}
    for name, opts in self._views.items():
      augs = (ops.sample_augs(rng, opts, w, h) if rng is not None
              else ops.identity_augs(ops.center_crop_box(w, h)))
      pixels = ops.apply_augs(img, augs, opts["size"])
      example["images"][name] = ops.normalize(pixels, self._mean, self._std)
      example["augs"][name] = augs
    box_augs = example["augs"][self._box_view]
    rois = record.get("rois", {})
    roi_labels = [as_str(x) for x in rois.get("labels", [])]
    if "tokens" in self._spec:
      example.update(self._texts(record, roi_labels, box_augs, rng))
    if "rois" in self._spec:
      example["rois"] = self._rois(rois, box_augs)
    if "labels" in self._spec:
      example["labels"] = {n: np.int32(record[n]) for n in self._labels}
    return example

  def _texts(self, record, roi_labels, box_augs, rng):
    captions = text_lib.record_captions(record)
    if not captions:
      raise ops.BadRecord("empty_caption")
    caption = captions[0]
    if rng is not None and len(captions) > 1:
      # Training reads one of the image's captions, drawn uniformly [ours]; the derived
      # summary, tags, concepts and phrases follow it.
      caption = captions[rng.integers(len(captions))]
    cfg, out = self._text, {"tokens": {}}
    for field in cfg["fields"]:
      if field == "caption":
        if "phrases" in self._spec:
          tokens, out["phrases"] = self._caption_with_phrases(record, caption, box_augs)
        else:
          tokens = self._tokenizer.encode([caption], cfg["max_len"])[0]
        out["tokens"]["caption"] = self._first_captions(tokens, captions)
        continue
      if field == "summary":
        text = as_str(record.get("summary", b"")).strip() or text_lib.summary(caption)
      elif field == "tags":
        text = as_str(record.get("tags", b"")).strip() or text_lib.tags(caption, roi_labels)
      else:  # concepts
        words = [as_str(c) for c in record.get("concepts", [])]
        text = text_lib.sample_concepts(
            words or text_lib.concepts(caption, roi_labels), cfg["num_concepts"], rng)
      out["tokens"][field] = self._tokenizer.encode([text], cfg["max_len"])[0]
    return out

  def _first_captions(self, tokens, captions):
    """The caption's `tokens` [L], or in evaluation with C > 1 captions per image [C, L]:
    `tokens` (the first caption's), the next C - 1 captions, zero rows for absent ones."""
    c, length = self._captions_per_image, self._text["max_len"]
    if c == 1:
      return tokens
    rows = [tokens, *self._tokenizer.encode(captions[1:c], length)]
    return _padded(rows, c, (length,), np.int32)

  def _caption_with_phrases(self, record, caption, box_augs):
    spec, p = self._spec["phrases"], self._max_phrases
    own = caption == as_str(record["caption"]).strip()  # Stored phrases index `caption`.
    char_spans = np.asarray(record.get("phrases", ()) if own else (), np.int64).reshape(-1, 2)
    boxes = np.asarray(record.get("phrase_boxes", ()) if own else (), np.float32)
    if not len(char_spans):  # No phrases stored: chunk the caption [ours].
      char_spans, boxes = text_lib.chunk_phrases(caption), np.zeros((0, 4), np.float32)
    tokens, spans, mask = self._tokenizer.encode_with_spans(
        caption, char_spans[:p], self._text["max_len"])
    phrases = {"spans": _padded(spans, p, (2,), np.int32),
               "mask": _padded(mask, p, (), np.bool_)}
    if "boxes" in spec:
      known = np.zeros((p, 4), np.float32)
      known[:min(p, len(boxes))] = boxes.reshape(-1, 4)[:p]
      view_boxes, visible = ops.boxes_to_view(known, box_augs, self._min_visible)
      phrases["boxes"] = np.where(visible[:, None] & phrases["mask"][:, None],
                                  view_boxes, 0.0).astype(np.float32)
    return tokens, phrases

  def _rois(self, rois, box_augs):
    m = self._max_regions
    boxes = np.asarray(rois.get("boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    view_boxes, visible = ops.boxes_to_view(boxes, box_augs, self._min_visible)
    keep = np.flatnonzero(visible)[:m]  # The first M regions visible in the view.
    out = {"boxes": _padded(view_boxes[keep], m, (4,), np.float32),
           "mask": _padded(np.ones(len(keep), bool), m, (), np.bool_)}
    if "features" in self._spec["rois"]:
      dim = self._spec["rois"]["features"][0][1]
      feats = np.asarray(rois["features"], np.float32).reshape(-1, dim)
      out["features"] = _padded(feats[keep], m, (dim,), np.float32)
    return out
