"""A test-only term that uses every part of the term interface the built-in terms do not:
state that is not a parameter (an EMA copy of the towers, a queue of momentum text
embeddings, a pointer and the last step seen), a gradient-free pass with the EMA
weights, and its own inference embedding. MoCo-style: each image's negatives are the
batch's texts plus the queued momentum texts."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from hvla import losses, models
from hvla.losses import contrastive
from hvla.losses.objective import towers

TYPE = "_test_momentum"


@losses.register(TYPE)
class Momentum(losses.Term):

  def __init__(self, *, decay=0.5, queue_size=8, embed_dim=32, strategy="dense",
               block_size=None):
    self.decay, self.queue_size, self.embed_dim = decay, queue_size, embed_dim
    self.strategy, self.block_size = strategy, block_size

  def passes(self):
    return {"image": losses.Pass("encode_image", ("images/image",)),
            "text": losses.Pass("encode_text", ("tokens/caption",)),
            "momentum": losses.Pass("encode_text", ("tokens/caption",),
                                    weights=f"{self.name}/ema")}

  def init_params(self, rng):
    return {"gain": nn.LogicallyPartitioned(jnp.ones((self.embed_dim,)), names=("joint",))}

  def param_bounds(self):
    return {"gain": (0.0, 1.5)}

  def init_state(self, params):
    queue = nn.LogicallyPartitioned(jnp.zeros((self.queue_size, self.embed_dim)),
                                    names=(None, "joint"))
    return {"ema": jax.tree.map(jnp.copy, towers(params)), "queue": queue,
            "pointer": jnp.zeros((), jnp.int32), "last_step": -jnp.ones((), jnp.int32)}

  def loss(self, params, state, features, ctx):
    image = models.l2_normalize(features["image"]["embedding"] * self.own(params)["gain"])
    texts = jnp.concatenate([features["text"]["embedding"], state["queue"]])
    n, k = image.shape[0], self.queue_size
    value = contrastive.contrastive_loss(
        image, texts, scale=jnp.exp(params["logit_scale"]), symmetric=False,
        row_ids=jnp.arange(n), col_ids=jnp.concatenate([jnp.arange(n), -1 - jnp.arange(k)]))
    return value, {"queue_norm": jnp.linalg.norm(state["queue"])}

  def update_state(self, state, params, features, ctx):
    ema = jax.tree.map(lambda e, p: self.decay * e + (1 - self.decay) * p, state["ema"],
                       towers(params))
    new = features["momentum"]["embedding"][:self.queue_size]
    rows = (state["pointer"] + jnp.arange(new.shape[0])) % self.queue_size
    return {"ema": ema, "queue": state["queue"].at[rows].set(new),
            "pointer": (state["pointer"] + new.shape[0]) % self.queue_size,
            "last_step": ctx.step}

  def encoders(self, model):
    """Images embedded as the loss sees them: scaled by the term's own `gain`."""
    plain = losses.Encoders.of_towers(model)

    def image(params, images):
      out = plain.image(params, images)
      return dict(out, embedding=models.l2_normalize(out["embedding"] * self.own(params)["gain"]))
    return losses.Encoders(image=image, text=plain.text)
