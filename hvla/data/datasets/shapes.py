"""hvla_shapes: procedurally rendered scenes with every field of hvla's record schema.

Each scene holds 1 to 4 non-overlapping objects (shape, colour, size, position, optional
texture) on a dark background, with a caption that names attributes and spatial
relations, a summary, tags, region boxes and labels, noun-phrase spans with their boxes,
concept words and three class labels for zero-shot evaluation (shape and colour of the
largest object, number of objects). Example i of a split depends only on (seed, split,
i), so any build with the same options is byte-identical. The whole dataset is [ours].
"""
import dataclasses
import io
import itertools
import math

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross",
          "crescent")
COLORS = {
    "red": (220, 45, 45), "green": (50, 170, 70), "blue": (45, 95, 225),
    "yellow": (235, 215, 50), "purple": (145, 70, 190), "orange": (245, 145, 35),
    "cyan": (60, 205, 215), "white": (240, 240, 240),
}
SIZES = {"small": (0.16, 0.22), "medium": (0.26, 0.34), "large": (0.40, 0.48)}
TEXTURES = ("striped", "dotted", "checkered")
COUNTS = ("one", "two", "three", "four")
SPLITS = ("train", "validation", "test")
# The auto-trained tokenizer has at most this many pieces; text towers for this dataset
# need vocab_size >= it.
SHAPES_VOCAB_SIZE = 512
_SUPERSAMPLE = 2  # Objects are drawn at 2x and box-filtered down: smooth edges.
_MARGIN = 0.02  # Minimum gap between objects, as a fraction of the image side.


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  size: str
  side: float  # Side of the object's square footprint, fraction of the image side.
  cx: float
  cy: float
  texture: str | None
  angle: float  # Rotation in degrees (polygons only).

  def noun_phrase(self, with_size):
    words = ([self.size] if with_size else []) + (
        [self.texture] if self.texture else []) + [self.color, self.shape]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)

  def label(self):
    return " ".join([self.size] + ([self.texture] if self.texture else [])
                    + [self.color, self.shape])


# -------------------------------------------------------------------------------------
# Scenes.
# -------------------------------------------------------------------------------------
def sample_scene(rng, textures=True):
  """1-4 non-overlapping objects; sizes shrink when a scene does not fit."""
  count = int(rng.integers(1, len(COUNTS) + 1))
  for attempt in itertools.count():
    sizes = list(SIZES)[:max(1, 3 - attempt // 50)]  # Drop 'large', then 'medium'.
    objs = []
    for _ in range(count):
      size = sizes[rng.integers(len(sizes))]
      side = rng.uniform(*SIZES[size])
      cx, cy = rng.uniform(side / 2, 1 - side / 2, 2)
      if any(abs(cx - o.cx) < (side + o.side) / 2 + _MARGIN and
             abs(cy - o.cy) < (side + o.side) / 2 + _MARGIN for o in objs):
        break
      objs.append(Obj(
          shape=SHAPES[rng.integers(len(SHAPES))],
          color=list(COLORS)[rng.integers(len(COLORS))], size=size, side=side,
          cx=cx, cy=cy,
          texture=TEXTURES[rng.integers(3)] if textures and rng.random() < 0.3 else None,
          angle=rng.uniform(-12, 12)))
    if len(objs) == count:
      return objs


def _unit_polygon(shape):
  """Vertices in [-1, 1]^2 (y down) of the polygonal shapes."""
  if shape == "square":
    return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
  if shape == "diamond":
    return [(0, -1), (1, 0), (0, 1), (-1, 0)]
  if shape == "triangle":
    return [(0, -1), (1, 1), (-1, 1)]
  if shape == "hexagon":
    return [(math.cos(a), math.sin(a)) for a in np.arange(6) * math.pi / 3]
  if shape == "star":
    return [((1 if k % 2 == 0 else 0.45) * math.cos(a), (1 if k % 2 == 0 else 0.45) *
             math.sin(a)) for k, a in enumerate(-math.pi / 2 + np.arange(10) * math.pi / 5)]
  if shape == "cross":
    t = 0.33
    return [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1),
            (-t, t), (-1, t), (-1, -t), (-t, -t)]
  raise ValueError(shape)


def _object_mask(obj, canvas):
  """The object's silhouette as an 'L' image of the full canvas."""
  mask = Image.new("L", (canvas, canvas), 0)
  draw = ImageDraw.Draw(mask)
  r, cx, cy = obj.side * canvas / 2, obj.cx * canvas, obj.cy * canvas
  if obj.shape in ("circle", "crescent"):
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    if obj.shape == "crescent":
      draw.ellipse((cx - 0.45 * r, cy - 1.05 * r, cx + 1.25 * r, cy + 0.65 * r), fill=0)
  else:
    a = math.radians(obj.angle)
    draw.polygon([(cx + r * (x * math.cos(a) - y * math.sin(a)),
                   cy + r * (x * math.sin(a) + y * math.cos(a)))
                  for x, y in _unit_polygon(obj.shape)], fill=255)
  return mask


def _texture(texture, color, width, height, period):
  """An RGB fill of the given size: plain, or the colour patterned with a dark shade."""
  fill = np.empty((height, width, 3), np.uint8)
  fill[:] = color
  if texture:
    yy, xx = np.mgrid[:height, :width]
    pattern = {
        "striped": (xx + yy) // period % 2 == 0,
        "checkered": (xx // period + yy // period) % 2 == 0,
        "dotted": (((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2
                   < (period / 3) ** 2),
    }[texture]
    fill[pattern] = (np.asarray(color) * 0.4).astype(np.uint8)
  return Image.fromarray(fill)


def render(objs, image_size, rng):
  """Draws the scene; returns (uint8 [S, S, 3], tight boxes [N, 4] in [0, 1])."""
  canvas = image_size * _SUPERSAMPLE
  background = tuple(int(v) for v in rng.integers(15, 60) + rng.integers(-8, 9, 3))
  img = Image.new("RGB", (canvas, canvas), background)
  boxes = []
  for obj in objs:
    mask = _object_mask(obj, canvas)
    x0, y0, x1, y1 = mask.getbbox()
    color = np.clip(np.asarray(COLORS[obj.color]) + rng.integers(-12, 13, 3), 0, 255)
    period = max(2, round(canvas * obj.side / 6))
    img.paste(_texture(obj.texture, color, x1 - x0, y1 - y0, period), (x0, y0),
              mask.crop((x0, y0, x1, y1)))
    boxes.append((x0 / canvas, y0 / canvas, x1 / canvas, y1 / canvas))
  return np.asarray(img.reduce(_SUPERSAMPLE)), np.asarray(boxes, np.float32)


# -------------------------------------------------------------------------------------
# Language.
# -------------------------------------------------------------------------------------
def _location(obj):
  col = "left" if obj.cx < 0.36 else "right" if obj.cx > 0.64 else None
  row = "top" if obj.cy < 0.36 else "bottom" if obj.cy > 0.64 else None
  if row and col:
    return f"in the {row} {col} corner"
  if row:
    return f"at the {row}"
  return f"on the {col}" if col else "in the centre"


def _relation(a, b):
  """Where a is with respect to b."""
  dx, dy = b.cx - a.cx, b.cy - a.cy
  if abs(dx) >= abs(dy):
    return "to the left of" if dx > 0 else "to the right of"
  return "above" if dy > 0 else "below"


def describe(objs, rng):
  """Caption, summary, tags, concepts, phrase spans and the caption order of objects.

  Objects are described in a random order: pairs by their relation ("a large red
  circle to the left of a small blue star"), a lone last object by its location.
  """
  order = [int(i) for i in rng.permutation(len(objs))]
  objs = [objs[i] for i in order]
  prefix = ("", "", "an image of ", "a picture of ", "a drawing of ")[rng.integers(5)]
  caption, spans = prefix, []

  def say(obj):
    nonlocal caption
    np_text = obj.noun_phrase(with_size=rng.random() < 0.75)
    spans.append((len(caption), len(caption) + len(np_text)))
    caption += np_text

  for k in range(0, len(objs), 2):
    if k:
      caption += ", and " if k + 2 >= len(objs) else ", "
    say(objs[k])
    if k + 1 < len(objs):
      caption += f" {_relation(objs[k], objs[k + 1])} "
      say(objs[k + 1])
    else:
      caption += " " + _location(objs[k])
  names = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape}" for o in objs]
  summary = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
  concepts = list(dict.fromkeys(w for o in objs for w in (o.shape, o.color, o.texture)
                                if w))
  return dict(caption=caption, summary=summary, concepts=concepts,
              phrases=np.asarray(spans, np.int32), order=order)


def make_example(rng, image_size, textures=True):
  """One complete record (the tfds feature dict) from a generator."""
  objs = sample_scene(rng, textures)
  pixels, boxes = render(objs, image_size, rng)
  text = describe(objs, rng)
  order = text.pop("order")
  labels = [objs[i].label() for i in order]
  largest = max(objs, key=lambda o: o.side)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return dict(
      image=buf.getvalue(), caption=text["caption"], summary=text["summary"],
      tags=", ".join(labels), concepts=text["concepts"],
      rois=dict(boxes=boxes[order], labels=labels),
      phrases=text["phrases"], phrase_boxes=boxes[order],
      shape=SHAPES.index(largest.shape), color=list(COLORS).index(largest.color),
      count=len(objs) - 1)


# -------------------------------------------------------------------------------------
# The tfds builder.
# -------------------------------------------------------------------------------------
@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 64
  num_train: int = 10_000
  num_validation: int = 1_000
  num_test: int = 1_000
  seed: int = 0
  textures: bool = True


def shapes_config(image_size=64, num_train=10_000, num_validation=1_000, num_test=1_000,
                  seed=0, textures=True):
  """A builder config named after its options, so different builds never collide."""
  if not 16 <= image_size <= 1024:
    raise ValueError(f"shapes.image_size must be in [16, 1024], got {image_size}")
  for key, n in dict(num_train=num_train, num_validation=num_validation,
                     num_test=num_test).items():
    if n < 1:
      raise ValueError(f"shapes.{key} must be >= 1, got {n}")
  name = (f"{image_size}px_{num_train}_{num_validation}_{num_test}_seed{seed}"
          + ("" if textures else "_plain"))
  return ShapesConfig(name=name, image_size=image_size, num_train=num_train,
                      num_validation=num_validation, num_test=num_test, seed=seed,
                      textures=textures)


class HvlaShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes scenes with captions, regions, phrases and class labels."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [shapes_config()]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds derives this from the installed package's resources, which fails for a
    # builder outside tfds' own packages; the module file is all it needs.
    return epath.Path(__file__)

  def _info(self):
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "summary": tfds.features.Text(),
            "tags": tfds.features.Text(),
            "concepts": tfds.features.Sequence(tfds.features.Text()),
            "rois": {
                "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                "labels": tfds.features.Sequence(tfds.features.Text()),
            },
            "phrases": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
            "phrase_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "shape": tfds.features.ClassLabel(names=SHAPES),
            "color": tfds.features.ClassLabel(names=list(COLORS)),
            "count": tfds.features.ClassLabel(names=COUNTS),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    cfg = self.builder_config
    n = getattr(cfg, f"num_{split}")
    for i in range(n):
      rng = np.random.default_rng([cfg.seed, SPLITS.index(split), i])
      yield i, make_example(rng, cfg.image_size, cfg.textures)


def make_builder(data_dir=None, **options):
  """The builder for the given options (see shapes_config); data_dir None: tfds'."""
  config = shapes_config(**options)
  if config.name in {c.name for c in HvlaShapes.BUILDER_CONFIGS}:
    config = config.name  # tfds refuses a custom config named like a predefined one.
  return HvlaShapes(data_dir=data_dir, config=config)
