"""Image ops: robust decoding and views whose augmentation is a recorded vector.

A view is fully described by an augmentation vector `augs` (float32 [11], fields in
`AUG_FIELDS`): sampling draws the vector, `apply_augs` renders it. What UniCLIP embeds is
therefore exactly what was applied, by construction.

- crop box (x0, y0, x1, y1) in [0, 1] coordinates of the decoded image;
- flip: 1 when mirrored left-right (after the crop);
- brightness, contrast, saturation: multiplicative factors, 1 = unchanged;
- hue: rotation of the colours about the gray axis, in turns, 0 = unchanged;
- grayscale: 1 when converted to gray;
- blur_sigma: Gaussian blur standard deviation in output pixels, 0 = no blur.

Sampling follows the SimCLR / torchvision recipes [paper]. Ours: the fixed order of the
colour ops (brightness, contrast, saturation, hue; torchvision shuffles it) and the hue
shift as a rotation in RGB about the gray axis (torchvision shifts HSV hue; the rotation
turns red towards green alike, keeps gray gray, and costs a tenth).
"""
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

AUG_FIELDS = ("crop_x0", "crop_y0", "crop_x1", "crop_y1", "flip", "brightness",
              "contrast", "saturation", "hue", "grayscale", "blur_sigma")
_F = {name: i for i, name in enumerate(AUG_FIELDS)}

# Why a record was not used; the order fixes the layout of the per-batch counters.
BAD_REASONS = ("unreadable", "malformed", "undecodable", "too_small", "too_large",
               "bad_aspect", "empty_caption")

# CLIP's pixel statistics [paper].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BadRecord(ValueError):
  """A record that cannot be used; `reason` is one of BAD_REASONS."""

  def __init__(self, reason, detail=""):
    assert reason in BAD_REASONS, reason
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


# -------------------------------------------------------------------------------------
# Decoding.
# -------------------------------------------------------------------------------------
def decode_image(data, *, min_side=8, max_aspect=20.0, max_pixels=50_000_000,
                 draft_side=None):
  """Decodes bytes to a loaded RGB PIL image, or raises BadRecord.

  Grayscale, palette, CMYK, 16-bit and alpha images are converted (alpha composited on
  white). `draft_side` lets JPEG decoding skip resolution the views do not need: the
  decoded image keeps at least that many pixels on its shorter side.
  """
  try:
    img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise BadRecord("too_large", str(e)) from None
  except Exception as e:  # PIL raises many types on garbage input.
    raise BadRecord("undecodable", repr(e)) from None
  w, h = img.size
  if min(w, h) < min_side:
    raise BadRecord("too_small", f"{w}x{h}")
  if max(w, h) / min(w, h) > max_aspect:
    raise BadRecord("bad_aspect", f"{w}x{h}")
  if w * h > max_pixels:
    raise BadRecord("too_large", f"{w}x{h}")
  if draft_side and img.format == "JPEG" and min(w, h) > draft_side:
    scale = draft_side / min(w, h)
    img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # EXIF / palette chatter is not an error.
      img.load()
      return to_rgb(img)
  except Exception as e:
    raise BadRecord("undecodable", repr(e)) from None


def to_rgb(img):
  """Converts any PIL mode to RGB; transparent pixels become white."""
  if img.mode == "RGB":
    return img
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    out = Image.new("RGB", img.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out
  if img.mode.startswith(("I", "F")):  # 16/32-bit grayscale.
    arr = np.asarray(img, dtype=np.float64)
    if arr.max(initial=0) > 255:
      arr = arr * (255 / 65535)
    img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
  return img.convert("RGB")


# -------------------------------------------------------------------------------------
# Sampling augmentation vectors.
# -------------------------------------------------------------------------------------
def identity_augs(box=(0.0, 0.0, 1.0, 1.0)):
  """The vector of a view that only crops `box` (the eval transform)."""
  augs = np.zeros(len(AUG_FIELDS), np.float32)
  augs[:4] = box
  augs[[_F["brightness"], _F["contrast"], _F["saturation"]]] = 1.0
  return augs


def center_crop_box(width, height):
  """The central square: resize-shorter-side then centre-crop, as a [0, 1] box."""
  side = min(width, height)
  x0, y0 = (width - side) / 2 / width, (height - side) / 2 / height
  return (x0, y0, 1.0 - x0, 1.0 - y0)


def random_resized_crop_box(rng, width, height, scale, ratio, attempts=10):
  """A box covering a `scale` fraction of the area with aspect ratio in `ratio`.

  torchvision's algorithm [paper, Inception]: ratio drawn log-uniformly, ten attempts,
  then the largest centred box with a ratio clipped into `ratio`.
  """
  area = width * height
  log_ratio = np.log(ratio)
  for _ in range(attempts):
    target = area * rng.uniform(*scale)
    r = math.exp(rng.uniform(*log_ratio))
    w, h = math.sqrt(target * r), math.sqrt(target / r)
    if w <= width and h <= height:
      x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
      return (x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height)
  r = min(max(width / height, ratio[0]), ratio[1])
  w, h = (width, width / r) if width / height < r else (height * r, height)
  x0, y0 = (width - w) / 2, (height - h) / 2
  return (x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height)


def sample_augs(rng, opts, width, height):
  """Draws the augmentation vector of one view; `opts` are the view's options."""
  augs = identity_augs(random_resized_crop_box(
      rng, width, height, opts["crop_scale"], opts["crop_ratio"]))
  if opts["flip"] and rng.random() < 0.5:
    augs[_F["flip"]] = 1.0
  s = opts["color_jitter"]
  if s > 0 and rng.random() < opts["color_jitter_p"]:
    lo, hi = max(0.0, 1 - 0.8 * s), 1 + 0.8 * s  # SimCLR's strengths [paper].
    augs[[_F["brightness"], _F["contrast"], _F["saturation"]]] = rng.uniform(lo, hi, 3)
    augs[_F["hue"]] = rng.uniform(-min(0.2 * s, 0.5), min(0.2 * s, 0.5))
  if rng.random() < opts["grayscale_p"]:
    augs[_F["grayscale"]] = 1.0
  if rng.random() < opts["blur_p"]:
    augs[_F["blur_sigma"]] = rng.uniform(*opts["blur_sigma"])
  return augs


# -------------------------------------------------------------------------------------
# Rendering a view.
# -------------------------------------------------------------------------------------
def apply_augs(img, augs, size):
  """Renders the view described by `augs` as uint8 [size, size, 3]."""
  w, h = img.size
  box = (augs[0] * w, augs[1] * h, augs[2] * w, augs[3] * h)
  out = img.resize((size, size), Image.BILINEAR, box=box, reducing_gap=3.0)
  if augs[_F["flip"]]:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  out = adjust_color(out, *augs[[_F["brightness"], _F["contrast"], _F["saturation"],
                                 _F["hue"]]])
  if augs[_F["grayscale"]]:
    out = out.convert("L").convert("RGB")
  if augs[_F["blur_sigma"]] > 0:
    out = out.filter(ImageFilter.GaussianBlur(float(augs[_F["blur_sigma"]])))
  return np.asarray(out, dtype=np.uint8)


def adjust_color(img, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0):
  """Colour jitter on an RGB PIL image (PIL's enhancers, as torchvision does)."""
  if brightness != 1:
    img = ImageEnhance.Brightness(img).enhance(float(brightness))
  if contrast != 1:
    img = ImageEnhance.Contrast(img).enhance(float(contrast))
  if saturation != 1:
    img = ImageEnhance.Color(img).enhance(float(saturation))
  if hue != 0:
    matrix = np.concatenate([hue_rotation(hue), np.zeros((3, 1))], axis=1)
    img = img.convert("RGB", tuple(matrix.reshape(-1)))
  return img


def hue_rotation(turns):
  """The 3x3 rotation of RGB about the gray axis (1, 1, 1) by `turns` (Rodrigues)."""
  theta = 2 * math.pi * float(turns)
  cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / math.sqrt(3)
  return (math.cos(theta) * np.eye(3) + (1 - math.cos(theta)) / 3 * np.ones((3, 3))
          + math.sin(theta) * cross)


def normalize(pixels, mean=CLIP_MEAN, std=CLIP_STD):
  """uint8 [..., 3] -> float32 standardised per channel (in place: 4x faster at 224)."""
  x = pixels.astype(np.float32)
  x -= np.asarray(mean, np.float32) * 255
  x *= 1 / (np.asarray(std, np.float32) * 255)
  return x


# -------------------------------------------------------------------------------------
# Boxes.
# -------------------------------------------------------------------------------------
def boxes_to_view(boxes, augs, min_visible=0.25):
  """Maps image boxes [N, 4] into a view's crop coordinates.

  Returns the clipped boxes and a mask of those that keep at least `min_visible` of
  their area inside the crop ([ours]: a sliver of an object is not a region).
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  x0, y0, x1, y1 = augs[:4]
  scale = np.array([x1 - x0, y1 - y0] * 2, np.float32)
  rel = (boxes - np.array([x0, y0, x0, y0], np.float32)) / scale
  clipped = np.clip(rel, 0.0, 1.0)
  area = lambda b: np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
  full = area(rel)
  visible = (full > 0) & (area(clipped) >= min_visible * full)
  if augs[_F["flip"]]:
    clipped = np.stack([1 - clipped[:, 2], clipped[:, 1], 1 - clipped[:, 0],
                        clipped[:, 3]], axis=1)
  return np.where(visible[:, None], clipped, 0.0).astype(np.float32), visible
