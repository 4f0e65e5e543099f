"""Momentum distillation (ALBEF, ViCHA [paper]): the image-text term against EMA towers
and feature queues, with the momentum model's similarities as soft targets.

The term keeps, as objective state: `ema`, an exponential moving average (decay 0.995
[paper]) of the towers' parameters, main projections and the concept encoder included
[paper, official code: the per-level heads and the MAE decoder have no momentum copy];
`image_queue` and `text_queue` [Q, D], the momentum features of the last Q examples of
the global batch (65,536 [paper]); `pointer` and `count` (how many entries are filled).
Two gradient-free passes embed the batch with the EMA weights.

Loss [paper, official code]: image i against the columns [momentum texts of the batch,
text queue] (and text i against [momentum images, image queue]), the learnable logit
scale, and the target `alpha * softmax(momentum image i . columns * scale) + (1 - alpha)
* one-hot(i)`, through the contrastive primitive's `Teacher`; the two directions
averaged. alpha is 0.4 [paper], ramped linearly from 0 over the first `ramp_epochs` of
training (one epoch [paper]); where the epoch length is unknown (`Context.epoch_steps`
0: no dataset size) alpha is constant [ours].

After each optimizer step the EMA takes the new parameters, so the next step's momentum
passes see ema_t = m ema_{t-1} + (1 - m) theta_t, as the official code (which updates the
EMA before its momentum forward); then this step's momentum features of the global batch
are written at the pointer. Q must be a multiple of the global batch [paper: asserted].

[ours] The queues start empty rather than random: an entry joins the columns once
filled (`col_valid`), where the official code starts from random unit vectors.
The queues' rows are sharded like a batch (logical axis `act_batch`).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from hvla.losses import contrastive
from hvla.losses.clip import check_concepts, image_pass
from hvla.losses.objective import Pass, Term, register, towers


@register("momentum")
class Momentum(Term):
  """Options (the keys of `config.objective.terms.<name>` besides type and weight):

  decay: the EMA's momentum m (ViCHA: 0.995).
  queue_size: Q, momentum features kept per modality (65,536); a multiple of the batch.
  alpha: the soft targets' weight after the ramp (0.4); 0 is hard InfoNCE with queues.
  ramp_epochs: epochs over which alpha rises linearly from 0 (1); 0 no ramp.
  image_view, concepts: the image pass, as for a 'clip' term.
  text_field: batch['tokens'][text_field] is the text.
  strategy, block_size: how each direction is computed (`contrastive_loss`).
  """

  def __init__(self, *, decay=0.995, queue_size=65536, alpha=0.4, ramp_epochs=1.0,
               image_view="image", concepts="", text_field="caption", strategy="dense",
               block_size=None):
    if not 0.0 <= decay < 1.0:
      raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    if not isinstance(queue_size, int) or queue_size < 1:
      raise ValueError(f"queue_size must be a positive int, got {queue_size!r}")
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if ramp_epochs < 0:
      raise ValueError(f"ramp_epochs must be >= 0, got {ramp_epochs!r}")
    contrastive.check_options("softmax", 0.0, strategy, block_size)
    self.decay, self.queue_size = float(decay), queue_size
    self.alpha, self.ramp_epochs = float(alpha), float(ramp_epochs)
    self.image_view, self.concepts, self.text_field = image_view, concepts, text_field
    self.strategy, self.block_size = strategy, block_size
    self.embed_dim = None  # the model's joint width, in attach

  def passes(self):
    image, text = (image_pass(self.image_view, False, self.concepts),
                   Pass("encode_text", (f"tokens/{self.text_field}",)))
    ema = f"{self.name}/ema"
    return {"image": image, "text": text,
            "momentum_image": Pass(image.method, image.inputs, weights=ema),
            "momentum_text": Pass(text.method, text.inputs, weights=ema)}

  def attach(self, model):
    check_concepts(self, model)
    self.embed_dim = model.embed_dim

  def init_state(self, params):
    def queue():
      return nn.LogicallyPartitioned(jnp.zeros((self.queue_size, self.embed_dim)),
                                     names=("act_batch", "joint"))
    return {"ema": jax.tree.map(jnp.copy, towers(params)),
            "image_queue": queue(), "text_queue": queue(),
            "pointer": jnp.zeros((), jnp.int32), "count": jnp.zeros((), jnp.int32)}

  def weight(self, ctx):
    """alpha at this step: ramped linearly from 0 over the first `ramp_epochs`."""
    ramp = self.ramp_epochs * ctx.epoch_steps
    if not ramp:
      return jnp.float32(self.alpha)
    return self.alpha * jnp.minimum(1.0, ctx.step.astype(jnp.float32) / ramp)

  def _check_batch(self, n):
    if self.queue_size % n:
      raise ValueError(f"config.objective.terms.{self.name}.queue_size={self.queue_size} "
                       f"must be a multiple of the global batch {n}")

  def loss(self, params, state, features, ctx):
    image, text = features["image"]["embedding"], features["text"]["embedding"]
    image_m = features["momentum_image"]["embedding"]
    text_m = features["momentum_text"]["embedding"]
    n = image.shape[0]
    self._check_batch(n)
    scale, alpha = jnp.exp(params["logit_scale"]), self.weight(ctx)
    ids = jnp.arange(n, dtype=jnp.int32)
    col_ids = jnp.concatenate([ids, -1 - jnp.arange(self.queue_size, dtype=jnp.int32)])
    col_valid = jnp.concatenate([jnp.ones((n,), bool),
                                 jnp.arange(self.queue_size) < state["count"]])

    def one_way(rows, rows_m, cols_m, queue):
      columns = jnp.concatenate([cols_m, queue.astype(cols_m.dtype)])
      return contrastive.contrastive_loss(
          rows, columns, scale=scale, symmetric=False, row_ids=ids, col_ids=col_ids,
          col_valid=col_valid, teacher=contrastive.Teacher(rows_m, columns, scale, alpha),
          strategy=self.strategy, block_size=self.block_size)
    value = (one_way(image, image_m, text_m, state["text_queue"]) +
             one_way(text, text_m, image_m, state["image_queue"])) / 2
    return value, {"alpha": alpha, "queue_fill": state["count"] / self.queue_size}

  def update_state(self, state, params, features, ctx):
    del ctx
    m = self.decay
    ema = jax.tree.map(lambda e, p: m * e + (1 - m) * p, state["ema"], towers(params))
    new = {}
    for modality in ("image", "text"):
      rows = features[f"momentum_{modality}"]["embedding"]
      self._check_batch(rows.shape[0])
      new[f"{modality}_queue"] = jax.lax.dynamic_update_slice_in_dim(
          state[f"{modality}_queue"], rows.astype(jnp.float32), state["pointer"], axis=0)
    n = rows.shape[0]
    return {"ema": ema, **new, "pointer": (state["pointer"] + n) % self.queue_size,
            "count": jnp.minimum(state["count"] + n, self.queue_size)}
