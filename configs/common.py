"""Pieces shared by hvla's config files.

A config file defines `get_config(arg=None)`; `arg` is the text after the colon in
`--config=configs/clip_vitb16.py:runlocal,batch=64`, parsed by `parse_arg`.
"""
from absl import logging
import ml_collections

YFCC = "yfcc15m_v2"  # The full configs' dataset (PyramidCLIP's), built with build_dataset.


def parse_arg(arg, **spec):
  """Parses 'flag,key=value' into a ConfigDict typed like the defaults in `spec`.

  `parse_arg('runlocal,batch=64', runlocal=False, batch=256)` gives
  `runlocal=True, batch=64`. A bare name sets a boolean; values are converted to the
  type of their default. Unknown names fail with the name and the known ones.
  """
  result = ml_collections.ConfigDict(spec)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = (s.strip() for s in item.partition("="))
    if key not in spec:
      raise ValueError(f"Unknown config argument {key!r}; known: {sorted(spec)}.")
    default = spec[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key!r} is boolean, got {value!r}.")
      result[key] = value.lower() in ("true", "1")
    elif default is None:
      result[key] = value
    else:
      try:
        result[key] = type(default)(value)
      except ValueError:
        raise ValueError(
            f"Config argument {key!r} expects {type(default).__name__}, got {value!r}."
        ) from None
  return result


def runlocal(config):
  """Shrinks a config to tiny towers on the built-in dataset: minutes on a laptop CPU."""
  config.batch_size = 64
  config.total_steps = 600
  config.total_epochs = None
  config.total_examples = None
  config.schedule.warmup_steps = 50
  config.schedule.warmup_epochs = None
  config.schedule.warmup_examples = None
  config.optimizer.lr = 1e-3
  config.optimizer.weight_decay = 0.05

  config.model.embed_dim = 128
  config.model.dtype = "float32"
  image = config.model.image
  image.image_size, image.patch_size = 64, 8
  image.width, image.depth, image.heads = 128, 4, 4
  text = config.model.text
  text.vocab_size, text.max_len = 512, 32
  text.width, text.depth, text.heads = 128, 4, 4

  config.data.dataset = "hvla_shapes"
  config.data.text.tokenizer = None  # The dataset's own, trained on its captions.
  config.data.text.max_len = text.max_len
  for view in config.data.views.values():
    view.size = image.image_size

  config.log_every = 25
  config.checkpoint_every = 200
  config.evals = shapes_evals(every_steps=200)
  return config


def shapes_evals(every_steps):
  """Zero-shot (shape and colour of the largest object) and retrieval on hvla_shapes."""
  from hvla import evaluators  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({
      "zeroshot_shape": evaluators.default_eval_config(
          "zeroshot", every_steps=every_steps, label="shape", split="validation"),
      "zeroshot_color": evaluators.default_eval_config(
          "zeroshot", every_steps=every_steps, label="color", split="validation"),
      "retrieval": evaluators.default_eval_config(
          "retrieval", every_steps=every_steps, split="validation"),
  })


def yfcc_recipe():
  """The schedule that PyramidCLIP and its CLIP baselines share: 32 epochs at batch
  4096, 1 warm-up epoch, AdamW lr 5e-4, eps 1e-8, weight decay 0.1, bfloat16."""
  from hvla import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.batch_size = 4096
  config.total_epochs = 32.0
  config.schedule.warmup_epochs = 1.0
  config.optimizer.update(lr=5e-4, eps=1e-8, weight_decay=0.1)
  config.model.dtype = "bfloat16"
  config.log_every = 100
  config.checkpoint_every = 2000
  return config


def dataset_evals(data, *, every_steps, view):
  """Evaluations of the dataset `data.dataset` names, from its description: zero-shot on
  each class label, retrieval of its captions, and a linear probe per class label where
  it has `data.train_split` too, all on its evaluation split (`validation`, else `test`).

  Returns (evals, that split); no split, no evals.
  """
  from hvla import evaluators  # pylint: disable=g-import-not-at-top
  from hvla.data import pipeline  # pylint: disable=g-import-not-at-top
  splits = pipeline.dataset_splits(data)
  split = next((s for s in ("validation", "test") if s in splits), None)
  if split is None:
    logging.warning("Dataset %s has no validation or test split (splits: %s): no evals.",
                    data.dataset, splits)
    return ml_collections.ConfigDict(), data.eval_split
  features = pipeline.dataset_features(data)
  labels = pipeline.label_features(features)
  shared = dict(every_steps=every_steps, view=view)
  evals = {f"zeroshot_{label}": evaluators.default_eval_config(
      "zeroshot", label=label, **shared) for label in labels}
  if "caption" in features:
    evals["retrieval"] = evaluators.default_eval_config("retrieval", **shared)
  if data.train_split in splits:
    evals.update({f"linear_probe_{label}": evaluators.default_eval_config(
        "linear_probe", label=label, train_split=data.train_split, **shared)
        for label in labels})
  return ml_collections.ConfigDict(evals), split


def apply_run_args(config, arg, *, eval_view, eval_every=None):
  """The arguments every config takes: data=NAME_OR_DIR, evals=false, batch=N, steps=N.

  `data` (other than hvla_shapes) replaces the dataset and the evals by the dataset's
  own (`dataset_evals` on `eval_view`, every `eval_every` steps; default: at every
  checkpoint), after runlocal, so `runlocal,data=DIR` trains and evaluates on DIR.
  """
  if arg.data:
    config.data.dataset = arg.data
    if arg.data != "hvla_shapes":
      config.evals, config.data.eval_split = dataset_evals(
          config.data, every_steps=eval_every or config.checkpoint_every, view=eval_view)
  if not arg.evals:
    config.evals = {}
  if arg.batch:
    config.batch_size = arg.batch
  if arg.steps:
    config.total_steps, config.total_epochs = arg.steps, None
  return config
