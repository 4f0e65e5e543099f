"""The optimizer: AdamW with decay masks, regex freezing, clipping and LR schedules.

Lengths (`total_*`, `schedule.warmup_*`) are given in steps, epochs or examples and are
all converted to steps here, so the rest of the trainer only counts steps.
"""
import re

import jax
import jax.numpy as jnp
import optax


def path_name(path):
  """'img/blocks_0/attn/kernel' for a jax tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def match_tree(params, patterns):
  """A bool tree: does any regex in `patterns` search the parameter's path name."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(c.search(path_name(path)) for c in compiled), params)


def to_steps(config, key_prefix, section, examples_per_epoch):
  """Converts `<prefix>steps|epochs|examples` of `section` into a step count (or None)."""
  steps = section[f"{key_prefix}steps"]
  epochs = section[f"{key_prefix}epochs"]
  examples = section[f"{key_prefix}examples"]
  if steps is not None:
    return int(steps)
  if examples is not None:
    return -(-int(examples) // config.batch_size)
  if epochs is not None:
    if not examples_per_epoch:
      raise ValueError(f"{key_prefix}epochs needs the dataset size, which is unknown; "
                       f"give {key_prefix}steps instead.")
    return -(-int(epochs * examples_per_epoch) // config.batch_size)
  return None


def total_steps(config, examples_per_epoch=None):
  return to_steps(config, "total_", config, examples_per_epoch)


def make_schedule(config, examples_per_epoch=None):
  """Warm-up then cosine / linear / rsqrt / constant, as a function of the step."""
  total = total_steps(config, examples_per_epoch)
  warmup = to_steps(config, "warmup_", config.schedule, examples_per_epoch) or 0
  lr, end = config.optimizer.lr, config.schedule.end_factor
  if warmup >= total:
    raise ValueError(f"config.schedule: warm-up ({warmup} steps) must be shorter than "
                     f"training ({total} steps).")
  name = config.schedule.name

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    if name == "cosine":
      decay = end + (1 - end) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    elif name == "linear":
      decay = 1 - (1 - end) * progress
    elif name == "rsqrt":
      decay = jax.lax.rsqrt(jnp.maximum(step - warmup, 0.0) / max(warmup, 1) + 1.0)
    else:
      decay = jnp.ones_like(step)
    return lr * warm * decay

  return schedule


def clip_by_global_norm(max_norm):
  """Scales the updates by min(1, max_norm / their global norm).

  The same as `optax.clip_by_global_norm` up to rounding, but through one scalar
  factor: optax divides every element by the norm, and XLA does not duplicate a divide
  into its several consumers (Adam's two moments), so each gradient got a
  parameter-sized temporary: ~0.1 s of clip_vitb16's ~4 s step on the CPU backend
  (BENCHMARKS.md). A multiply by a scalar fuses into every consumer.
  """
  def update(updates, state, params=None):
    del params
    norm = optax.global_norm(updates)
    factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def gradient_norm(grads):
  """The gradients' global norm, for logging.

  The barrier keeps XLA from sharing the squares with Adam's second-moment update:
  shared, they are materialised as a parameter-sized temporary (~0.1 s of
  clip_vitb16's ~4 s step on the CPU backend without clipping, BENCHMARKS.md).
  """
  return optax.global_norm(jax.lax.optimization_barrier(grads))


def check_bounds(params, bounds):
  """Raises ValueError when `bounds` names a parameter that `params` does not have."""
  names = {path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  unknown = sorted(set(bounds) - names)
  if unknown:
    raise ValueError(f"Bounds for parameter(s) {unknown} that do not exist.")


def project(params, bounds):
  """The parameters with those named in `bounds` ({'/'-path: (low, high)}) clipped into
  their range; applied after every update, so a bounded parameter keeps its gradient."""
  check_bounds(params, bounds)

  def clip(path, p):
    low, high = bounds.get(path_name(path), (None, None))
    return p if low is None else jnp.clip(p, low, high).astype(p.dtype)
  return jax.tree_util.tree_map_with_path(clip, params)


def make_optimizer(config, params, examples_per_epoch=None):
  """Returns (optax transformation, schedule). `params` fixes the masks' structure."""
  opt = config.optimizer
  schedule = make_schedule(config, examples_per_epoch)
  decay_mask = jax.tree.map(lambda m: not m, match_tree(params, opt.no_decay))
  tx = optax.chain(
      clip_by_global_norm(opt.clip_norm) if opt.clip_norm else optax.identity(),
      optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=decay_mask),
  )
  if opt.freeze:
    frozen = match_tree(params, opt.freeze)
    labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
