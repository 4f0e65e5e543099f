"""The data config (`config.data`): its defaults and its validation."""
import ml_collections
from ml_collections import config_dict

from hvla.data import ops
from hvla.data.datasets import shapes

# Options of one view; a view in the config may give any subset.
VIEW_DEFAULTS = dict(
    size=64,                 # Output side in pixels.
    crop_scale=(0.9, 1.0),   # Random resized crop: area fraction (open_clip's default).
    crop_ratio=(3 / 4, 4 / 3),  # ... and aspect-ratio range.
    flip=False,              # Mirror with p=0.5. Off: captions say "left of".
    color_jitter=0.0,        # SimCLR strength s; 0 disables.
    color_jitter_p=0.8,      # Probability of jittering when s > 0 (SimCLR).
    grayscale_p=0.0,
    blur_p=0.0,
    blur_sigma=(0.1, 2.0),   # Blur standard deviation range, output pixels.
)
TEXT_FIELDS = ("caption", "summary", "tags", "concepts")


def default_data_config():
  """Every key of `config.data`, with defaults that train on hvla_shapes."""
  c = ml_collections.ConfigDict()
  c.dataset = "hvla_shapes"  # 'hvla_shapes', a prepared tfds name, or a dataset dir.
  c.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.shapes = dict(image_size=64, num_train=10_000, num_validation=1_000, num_test=1_000,
                  seed=0, textures=True)
  c.train_split = "train"
  c.eval_split = "validation"
  c.views = dict(image=dict(VIEW_DEFAULTS))  # name -> options; eval: resize + centre crop.
  c.box_view = config_dict.placeholder(str)  # View of rois/phrases boxes; None: first.
  c.text = dict(
      fields=("caption",),  # Any of TEXT_FIELDS, emitted as tokens/<field>.
      max_len=40,  # hvla_shapes captions take at most ~33 tokens.
      tokenizer=config_dict.placeholder(str),  # .model path; None: the dataset's own.
      num_concepts=4,  # ViCHA draws 4 concept words [paper].
      # Evaluation: tokens/caption holds an image's first C captions, [C, max_len] per
      # example (retrieval, COCO 5 / Flickr30k 5 [paper]); 1: the first, [max_len].
      # Training always reads one caption, drawn among the image's [ours].
      captions_per_image=1,
  )
  c.rois = dict(max_regions=10, min_visible=0.25)  # PyramidCLIP: up to 10 [paper].
  c.phrases = dict(max_phrases=8)  # LOUPE: up to 8 [ours].
  c.labels = ()  # Label features emitted as labels/<name>, e.g. ('shape', 'color').
  c.normalization = dict(mean=ops.CLIP_MEAN, std=ops.CLIP_STD)
  c.image_limits = dict(min_side=8, max_aspect=20.0, max_pixels=50_000_000)
  c.shuffle_seed = 0
  c.worker_count = 0  # grain worker processes; 0 = in the main process.
  c.prefetch = 2  # Batches each worker prepares ahead.
  return c


def _fail(key, problem):
  raise ValueError(f"config.data.{key}: {problem}")


def _check_range(key, value, lo, hi, closed_lo=True):
  if not (isinstance(value, (tuple, list)) and len(value) == 2):
    _fail(key, f"expected a (low, high) pair, got {value!r}")
  a, b = value
  if not ((a >= lo if closed_lo else a > lo) and a <= b <= hi):
    _fail(key, f"{tuple(value)} must satisfy {lo} {'<=' if closed_lo else '<'} low "
               f"<= high <= {hi}")


def view_options(name, view):
  """A view's options with defaults filled in; ValueError names a bad key."""
  view = dict(view)
  for key in view:
    if key not in VIEW_DEFAULTS:
      _fail(f"views.{name}.{key}", f"unknown view option (known: {sorted(VIEW_DEFAULTS)})")
  opts = {**VIEW_DEFAULTS, **view}
  k = f"views.{name}."
  if not (isinstance(opts["size"], int) and 1 <= opts["size"] <= 4096):
    _fail(k + "size", f"must be an int in [1, 4096], got {opts['size']!r}")
  _check_range(k + "crop_scale", opts["crop_scale"], 0, 1, closed_lo=False)
  _check_range(k + "crop_ratio", opts["crop_ratio"], 0, float("inf"), closed_lo=False)
  _check_range(k + "blur_sigma", opts["blur_sigma"], 0, float("inf"), closed_lo=False)
  for p in ("color_jitter_p", "grayscale_p", "blur_p"):
    if not 0 <= opts[p] <= 1:
      _fail(k + p, f"a probability must be in [0, 1], got {opts[p]}")
  if opts["color_jitter"] < 0:
    _fail(k + "color_jitter", f"strength must be >= 0, got {opts['color_jitter']}")
  if not isinstance(opts["flip"], bool):
    _fail(k + "flip", f"must be a bool, got {opts['flip']!r}")
  return opts


def validate_data_config(config):
  """Checks every key of `config.data` and returns the views' filled-in options."""
  known = default_data_config()
  for key in config.keys():
    if key not in known:
      _fail(key, f"unknown key (known: {sorted(known.keys())})")
  for group in ("shapes", "text", "rois", "phrases", "normalization", "image_limits"):
    for key in config[group].keys():
      if key not in known[group]:
        _fail(f"{group}.{key}", f"unknown key (known: {sorted(known[group].keys())})")
  if config.dataset == "hvla_shapes":
    try:
      shapes.shapes_config(**config.shapes)
    except ValueError as e:
      _fail("shapes", str(e))
  if not config.views:
    _fail("views", "at least one view is needed")
  views = {name: view_options(name, view) for name, view in config.views.items()}
  if config.box_view is not None and config.box_view not in views:
    _fail("box_view", f"{config.box_view!r} is not a view (views: {sorted(views)})")
  for field in config.text.fields:
    if field not in TEXT_FIELDS:
      _fail("text.fields", f"unknown field {field!r} (known: {TEXT_FIELDS})")
  if config.text.max_len < 2:
    _fail("text.max_len", f"must be >= 2 (a token and EOS), got {config.text.max_len}")
  per_image = config.text.captions_per_image
  if isinstance(per_image, bool) or not (isinstance(per_image, int) and per_image >= 1):
    _fail("text.captions_per_image", f"must be an int >= 1, got {per_image!r}")
  if per_image > 1 and "caption" not in config.text.fields:
    _fail("text.captions_per_image", f"{per_image} captions per image are emitted as "
          f"tokens/caption, but text.fields={tuple(config.text.fields)} has no caption")
  for key in ("rois.max_regions", "phrases.max_phrases", "text.num_concepts",
              "worker_count", "prefetch"):
    group, _, name = key.rpartition(".")
    value = config[group][name] if group else config[name]
    if not (isinstance(value, int) and value >= 0):
      _fail(key, f"must be an int >= 0, got {value!r}")
  if not 0 <= config.rois.min_visible <= 1:
    _fail("rois.min_visible", f"must be in [0, 1], got {config.rois.min_visible}")
  for key in ("mean", "std"):
    if len(config.normalization[key]) != 3:
      _fail(f"normalization.{key}", "needs one value per RGB channel")
  if min(config.normalization.std) <= 0:
    _fail("normalization.std", "must be positive")
  if not 0 <= config.shuffle_seed < 2**31:
    _fail("shuffle_seed", f"must be in [0, 2**31), got {config.shuffle_seed}")
  return views
