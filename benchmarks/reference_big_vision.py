"""big_vision's CLIP, trained as its contrastive trainer trains it: a reference step.

big_vision (github.com/google-research/big_vision) trains CLIP, LiT and SigLIP in JAX.
It is not on a package index, so it is imported from a checkout (`--big_vision_dir`).
Its CLIP is `proj.image_text.two_towers` with a `vit` image tower (class token) and
`proj.image_text.text_transformer`, trained by `trainers/proj/image_text/contrastive.py`.
Its towers are CLIP's with small differences, so the two steps compute near-equal FLOPs,
not the same function (each is counted by `benchmark.lowered_flops`):
- no LayerNorm before the image encoder, no position embedding for the class token, and
  a patch embedding and projection heads with biases;
- the text tower is not causally masked and pools the last position (hvla pools the
  last real token, which the benchmark's captions put last too);
- `dtype_mm` sets the matmul dtype of the image tower only: in bfloat16 its text tower
  computes in float32 (on a TPU, big_vision's home, float32 matmuls run in bfloat16
  passes by default, which a CPU or GPU does not do).
"""
import functools
import importlib
import math
import os
import sys

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from benchmarks import towers
from hvla.tools import benchmark

_TWO_TOWERS = "big_vision/models/proj/image_text/two_towers.py"


def import_big_vision(directory=None):
  """big_vision's model, optimizer and utility modules, from the checkout at `directory`
  (put first on the import path) or, without one, from the import path as it is."""
  if directory:
    if not os.path.isfile(os.path.join(directory, _TWO_TOWERS)):
      raise FileNotFoundError(
          f"{directory!r} is not a big_vision checkout: it has no {_TWO_TOWERS}. Clone "
          "https://github.com/google-research/big_vision and pass the clone's root.")
    sys.path.insert(0, os.path.abspath(directory))
  try:
    return [importlib.import_module(f"big_vision.{name}")
            for name in ("models.proj.image_text.two_towers", "optax", "utils")]
  except ImportError as e:
    raise ImportError(f"big_vision could not be imported ({e}). Pass its checkout with "
                      "--big_vision_dir and install its requirements.") from e


def two_towers_args(model_config, dtype):
  """big_vision two_towers.Model arguments for the towers of hvla's CLIP `config.model`,
  as big_vision's CLIP configs set them (class-token ViT, last-token text pooling)."""
  towers.check_clip_towers(model_config)
  image, text = model_config.image, model_config.text
  return dict(
      image_model="vit", text_model="proj.image_text.text_transformer",
      image=dict(width=image.width, depth=image.depth, num_heads=image.heads,
                 mlp_dim=int(image.width * image.mlp_ratio),
                 patch_size=(image.patch_size, image.patch_size), pool_type="tok",
                 head_zeroinit=False, dtype_mm=jnp.dtype(dtype).name),
      text=dict(width=text.width, depth=text.depth, num_heads=text.heads,
                mlp_dim=int(text.width * text.mlp_ratio), vocab_size=text.vocab_size,
                pool_type="last"),
      out_dim=(model_config.embed_dim, model_config.embed_dim),
      temperature_init=math.exp(model_config.logit_scale_init))


def optimizer_config(optimizer, warmup_steps):
  """big_vision's optimizer settings (`big_vision.optax.make`) for hvla's AdamW config:
  scale_by_adam, the learning rate, a cosine schedule and gradient clipping. big_vision
  decays weights by `wd` times the schedule alone, AdamW by the decay times the learning
  rate, so `wd` is their product; its default decay mask is every kernel."""
  if optimizer.name != "adamw":
    raise ValueError(f"The big_vision reference mirrors AdamW, not {optimizer.name!r}.")
  return ml_collections.ConfigDict(dict(
      optax_name="scale_by_adam",
      optax=dict(b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps),
      lr=optimizer.lr, wd=optimizer.lr * optimizer.weight_decay,
      schedule=dict(decay_type="cosine", warmup_steps=warmup_steps),
      grad_clip_norm=optimizer.clip_norm))


class BigVisionCase:
  """big_vision's two-tower CLIP with hvla's tower sizes, initialised by big_vision, and
  its contrastive trainer's update step jitted on one device."""

  clips_gradients = True  # as big_vision's image-text configs do (grad_clip_norm=1.0)

  def __init__(self, hvla_config, batch, *, dtype, big_vision_dir=None, total_steps=10**6):
    two_towers, bv_optax, bv_utils = import_big_vision(big_vision_dir)
    self.name = f"big_vision two_towers, {dtype}"
    model = two_towers.Model(**two_towers_args(hvla_config.model, dtype))
    images = jnp.asarray(batch["images"]["image"], jnp.float32)
    tokens = jnp.asarray(batch["tokens"]["caption"], jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1])["params"]
    self.parameters = benchmark.parameter_count(params)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # make() logs a line for every parameter
    try:
      tx, _ = bv_optax.make(optimizer_config(hvla_config.optimizer, warmup_steps=1), params,
                            sched_kw=dict(total_steps=total_steps, batch_size=len(images)))
    finally:
      logging.set_verbosity(verbosity)
    self.state = (params, jax.jit(tx.init)(params))
    self.batch = {"image": images, "labels": tokens}
    step = functools.partial(self.train_step, model, tx,
                             bv_utils.bidirectional_contrastive_loss)
    self.flops_per_step = benchmark.lowered_flops(step, self.state, self.batch)
    self._step = jax.jit(step, donate_argnums=0)

  @staticmethod
  def train_step(model, tx, contrastive_loss, state, batch):
    """The update of big_vision's contrastive trainer on one device: its loss, its
    optimizer, and the gradient, parameter and update norms it logs every step."""
    params, opt_state = state

    def loss_fn(p):
      zimg, ztxt, extras = model.apply({"params": p}, batch["image"], batch["labels"],
                                       train=True, rngs={"dropout": jax.random.key(0)})
      loss, loss_extras = contrastive_loss(zimg, ztxt, extras["t"], reduction=True)
      return loss, {"t": extras["t"], "nimg": jnp.mean(extras["img/norm"]),
                    "ntxt": jnp.mean(extras["txt/norm"]), **loss_extras}

    (loss, measurements), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    for name, tree in (("l2_grads", grads), ("l2_params", params), ("l2_updates", updates)):
      measurements[name] = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)))
    return (params, opt_state), (loss, measurements)

  def step(self):
    self.state, out = self._step(self.state, self.batch)
    return out


def parameter_difference(model_config):
  """hvla's parameter count minus big_vision's for the same tower sizes: hvla has a
  LayerNorm before the image encoder (2 x width) and a class-token position (width),
  big_vision a bias in the patch embedding (width) and in each projection (embed_dim)."""
  return 2 * model_config.image.width - 2 * model_config.embed_dim

