"""The trainer's config schema: defaults for every key, and validation.

Config files start from `base_config()`, so every key exists and an override of a key
that does not (`--config.optimiser.lr=...`) fails in ml_collections with its name.
`validate` then rejects what a config file itself got wrong, before anything compiles.
"""
import ast
import re

import ml_collections

from hvla import evaluators
from hvla import losses
from hvla import models
from hvla.data import pipeline

# Logical axis -> mesh axes. Parameters are FSDP-sharded on their embedding dimension and
# tensor-parallel on MLP / heads / vocabulary; activations are split over the batch.
DEFAULT_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "model"),
    ("act_heads", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("joint", None),
    ("patch", None),
    ("layers", None),
)

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
MODES = ("train", "eval")


def base_config():
  """Every key the trainer reads, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 256  # Global: negatives come from every device.
  # Length of training: exactly one of these is set.
  c.total_steps = ml_collections.config_dict.placeholder(int)
  c.total_epochs = ml_collections.config_dict.placeholder(float)
  c.total_examples = ml_collections.config_dict.placeholder(int)

  c.model = models.default_model_config()
  c.data = pipeline.default_data_config()
  # How every contrastive term runs (docs/scaling.md) and the weighted terms.
  c.objective = ml_collections.ConfigDict(dict(
      strategy="dense", block_size=ml_collections.config_dict.placeholder(int),
      terms={"clip": losses.term_config("clip")}))
  c.evals = ml_collections.ConfigDict()

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
      # Regexes over '/'-joined parameter paths.
      no_decay=(r"(^|/)(bias|scale|logit_scale|logit_bias|offset)$", r"(^|/)(pos_embedding|cls)$"),
      freeze=(), clip_norm=1.0))
  c.schedule = ml_collections.ConfigDict(dict(
      name="cosine", warmup_steps=ml_collections.config_dict.placeholder(int),
      warmup_epochs=ml_collections.config_dict.placeholder(float),
      warmup_examples=ml_collections.config_dict.placeholder(int), end_factor=0.0))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))

  # Micro-batches per step, with every negative kept (hvla.grad_cache).
  c.accum_steps = 1
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.init = ""  # A checkpoint directory (or workdir) to take parameters from.
  c.compilation_cache = ""  # A directory for jax's persistent compilation cache.
  return c


def _top_level_items(text):
  """'a=1,b=(1, 2),c={"x": 1}' -> ['a=1', 'b=(1, 2)', 'c={"x": 1}']: commas inside
  brackets or quotes do not split."""
  items, depth, quote, start = [], 0, None, 0
  for i, char in enumerate(text):
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      items.append(text[start:i])
      start = i + 1
  return [item.strip() for item in items + [text[start:]] if item.strip()]


def _literal(text):
  """A Python literal ('5', '(1, 5)', "{'dataset': '/d'}"), else the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_eval_flags(config, specs):
  """Adds, replaces and removes evaluators as `hvla.main --eval` asks, in order.

  `NAME=TYPE[,KEY=VALUE...]` sets `config.evals.NAME` to TYPE's defaults with the values
  (Python literals, else strings); `-NAME` removes it. Unknown types and keys fail with
  their name, as in a config file.
  """
  for spec in specs:
    if spec.startswith("-"):
      name = spec[1:]
      if name not in config.evals:
        raise ValueError(f"--eval={spec}: no config.evals.{name} to remove; there are "
                         f"{sorted(config.evals)}.")
      with config.unlocked():
        del config.evals[name]
      continue
    head, *items = _top_level_items(spec)
    name, sep, type_name = head.partition("=")
    if not (sep and name and type_name):
      raise ValueError(f"--eval={spec}: expected NAME=TYPE[,KEY=VALUE...] or -NAME.")
    overrides = {}
    for item in items:
      key, sep, value = item.partition("=")
      if not sep:
        raise ValueError(f"--eval={spec}: {item!r} is not KEY=VALUE.")
      overrides[key.strip()] = _literal(value.strip())
    try:
      ev = evaluators.default_eval_config(type_name, **overrides)
    except ValueError as e:
      raise ValueError(f"--eval={spec}: {e}") from None
    with config.unlocked():
      config.evals[name] = ev
  return config


def _check_keys(config, reference, path):
  for key in config.keys():
    if key not in reference:
      raise ValueError(
          f"Unknown config key {path}{key!r}; known under {path or 'the root'}: "
          f"{sorted(reference.keys())}.")
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(
        reference[key], ml_collections.ConfigDict) and reference[key].keys():
      _check_keys(config[key], reference[key], f"{path}{key}.")


def _require(ok, key, message):
  if not ok:
    raise ValueError(f"config.{key}: {message}")


def validate(config):
  """Raises ValueError naming the key of the first unknown key or impossible value."""
  reference = base_config()
  for section in ("model", "data", "objective", "evals"):
    reference[section] = config[section]  # Checked by their own validators below.
  _check_keys(config, reference, "")
  models.get_model(config.model)
  pipeline.validate_data_config(config.data)
  losses.get_objective(config.objective)
  for name, ev in config.evals.items():
    if "type" not in ev:
      raise ValueError(f"config.evals.{name}: needs a `type`.")
    evaluators.default_eval_config(
        ev.type, **{k: v for k, v in ev.items() if k != "type"})

  _require(config.data.text.max_len <= config.model.text.max_len, "data.text.max_len",
           f"{config.data.text.max_len} tokens do not fit the text tower's "
           f"model.text.max_len={config.model.text.max_len}.")
  _require(config.batch_size > 0, "batch_size", f"must be positive, got {config.batch_size}.")
  lengths = [k for k in ("total_steps", "total_epochs", "total_examples")
             if config[k] is not None]
  _require(len(lengths) == 1, "total_steps",
           f"set exactly one of total_steps / total_epochs / total_examples, got {lengths}.")
  _require(config[lengths[0]] > 0, lengths[0], "must be positive.")
  warmups = [k for k in ("warmup_steps", "warmup_epochs", "warmup_examples")
             if config.schedule[k] is not None]
  _require(len(warmups) <= 1, "schedule",
           f"set at most one of warmup_steps / warmup_epochs / warmup_examples, got {warmups}.")
  _require(config.schedule.name in SCHEDULES, "schedule.name",
           f"unknown schedule {config.schedule.name!r}; known: {SCHEDULES}.")
  _require(config.optimizer.name == "adamw", "optimizer.name",
           f"only 'adamw' is supported, got {config.optimizer.name!r}.")
  _require(config.optimizer.lr > 0, "optimizer.lr", "must be positive.")
  _require(0 <= config.optimizer.b1 < 1 and 0 <= config.optimizer.b2 < 1, "optimizer.b1",
           "Adam betas must lie in [0, 1).")
  for key in ("no_decay", "freeze"):
    for pattern in config.optimizer[key]:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"config.optimizer.{key}: bad regex {pattern!r}: {e}") from None
  for axis in ("data", "fsdp", "model"):
    size = config.mesh[axis]
    _require(size == -1 or size >= 1, f"mesh.{axis}", f"must be -1 or >= 1, got {size}.")
  _require([config.mesh[a] for a in ("data", "fsdp", "model")].count(-1) <= 1, "mesh",
           "at most one axis may be -1 (the rest of the devices).")
  _require(config.accum_steps >= 1 and config.batch_size % config.accum_steps == 0,
           "accum_steps", f"must be >= 1 and divide batch_size={config.batch_size}, "
           f"got {config.accum_steps}.")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
    _require(config[key] > 0, key, "must be positive.")
  for name, ev in config.evals.items():
    _require(ev.get("every_steps", 1) > 0, f"evals.{name}.every_steps", "must be positive.")
  return config
