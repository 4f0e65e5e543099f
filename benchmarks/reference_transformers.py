"""transformers' Flax CLIP, trained as its contrastive-image-text example trains it: a
reference step.

`transformers.FlaxCLIPModel` is the public JAX CLIP that installs from a package index
(`pip install -e ".[reference]"`); its `examples/flax/contrastive-image-text` script
trains it. It is built here with the towers of an hvla CLIP config and given hvla's
initial parameters (`to_transformers`; the tests check that both then compute the same
embeddings), so the two steps compute the same function from the same values.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from benchmarks import towers
from hvla.models import layers
from hvla.tools import benchmark


def hf_clip_config(model_config):
  """A transformers CLIPConfig with the towers of hvla's `config.model` (ViT + text
  transformer with CLIP's pooling: class token for images, EOT for text)."""
  from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top
  towers.check_clip_towers(model_config)
  image, text = model_config.image, model_config.text
  same = dict(hidden_act="gelu", layer_norm_eps=layers.LN_EPSILON)  # hvla's exact GELU
  return CLIPConfig(
      projection_dim=model_config.embed_dim,
      vision_config=dict(hidden_size=image.width, num_hidden_layers=image.depth,
                         num_attention_heads=image.heads, image_size=image.image_size,
                         patch_size=image.patch_size,
                         intermediate_size=int(image.width * image.mlp_ratio), **same),
      text_config=dict(vocab_size=text.vocab_size, hidden_size=text.width,
                       num_hidden_layers=text.depth, num_attention_heads=text.heads,
                       max_position_embeddings=text.max_len,
                       intermediate_size=int(text.width * text.mlp_ratio),
                       # transformers pools the first EOS id, hvla the last real token.
                       eos_token_id=3, **same))


def to_transformers(params, patch_size):
  """hvla CLIP parameters (unscanned) -> FlaxCLIPModel's, computing the same function."""
  def encoder_layers(encoder):
    def layer(block):
      qkv, out = block["attn"]["qkv"], block["attn"]["out"]
      width = qkv["kernel"].shape[0]
      def projection(i):
        return {"kernel": qkv["kernel"][:, i].reshape(width, -1),
                "bias": qkv["bias"][i].reshape(-1)}
      return {"self_attn": {"q_proj": projection(0), "k_proj": projection(1),
                            "v_proj": projection(2),
                            "out_proj": {"kernel": out["kernel"].reshape(-1, width),
                                         "bias": out["bias"]}},
              "layer_norm1": block["norm1"], "layer_norm2": block["norm2"],
              "mlp": block["mlp"]}
    return {"layers": {name.removeprefix("block_"): layer(block)
                       for name, block in encoder.items()}}
  img, txt = params["img"], params["txt"]
  patch_kernel = img["embedding"]["kernel"]  # rows in (row, column, channel) order
  return {
      "logit_scale": params["logit_scale"],
      "vision_model": {
          "embeddings": {
              "class_embedding": img["cls"],
              "patch_embedding": {"kernel": patch_kernel.reshape(
                  patch_size, patch_size, -1, patch_kernel.shape[-1])},
              "position_embedding": {"embedding": img["pos_embedding"]}},
          "pre_layrnorm": img["pre_norm"], "encoder": encoder_layers(img["encoder"]),
          "post_layernorm": img["norm"]},
      "visual_projection": params["img_proj"],
      "text_model": {
          "embeddings": {"token_embedding": txt["token_embedding"],
                         "position_embedding": {"embedding": txt["pos_embedding"]}},
          "encoder": encoder_layers(txt["encoder"]), "final_layer_norm": txt["norm"]},
      "text_projection": params["txt_proj"],
  }


class TransformersCase:
  """FlaxCLIPModel trained as transformers' contrastive-image-text example trains it,
  from hvla's parameters `params` (so both steps work on the same values), with the
  AdamW hyperparameters of hvla's config."""

  clips_gradients = False  # the example does not clip

  def __init__(self, hvla_config, params, batch, *, dtype):
    from transformers import FlaxCLIPModel  # pylint: disable=g-import-not-at-top
    model_config, opt = hvla_config.model, hvla_config.optimizer
    self.name = f"transformers FlaxCLIPModel, {dtype}"
    self.model = FlaxCLIPModel(hf_clip_config(model_config), dtype=jnp.dtype(dtype),
                               _do_init=False)
    expected = jax.eval_shape(
        lambda: self.model.init_weights(jax.random.key(0), self.model.input_shape))
    params = jax.device_put(to_transformers(params, model_config.image.patch_size))
    if jax.tree.structure(params) != jax.tree.structure(expected) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected))):
      raise ValueError("The towers differ: hvla's parameters do not map onto "
                       "FlaxCLIPModel's.")
    self.parameters = benchmark.parameter_count(params)
    decay = jax.tree.map(lambda x: x.ndim > 1, params)  # the example's decay mask
    tx = optax.adamw(opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                     weight_decay=opt.weight_decay, mask=decay)
    self.state = (params, tx.init(params))
    images, tokens = batch["images"]["image"], batch["tokens"]["caption"]
    self.batch = {"pixel_values": jnp.asarray(images.transpose(0, 3, 1, 2)),  # NCHW
                  "input_ids": jnp.asarray(tokens),
                  "attention_mask": jnp.asarray(tokens > 0, jnp.int32)}
    step = functools.partial(self.train_step, self.model, tx)
    self.flops_per_step = benchmark.lowered_flops(step, self.state, self.batch)
    self._step = jax.jit(step, donate_argnums=0)

  @staticmethod
  def train_step(model, tx, state, batch):
    params, opt_state = state

    def loss_fn(p):
      logits = model(**batch, params=p, train=True).logits_per_text
      labels = jnp.eye(logits.shape[0], dtype=jnp.float32)
      logits = logits.astype(jnp.float32)
      return (optax.softmax_cross_entropy(logits, labels).mean() +
              optax.softmax_cross_entropy(logits.T, labels).mean()) / 2

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def step(self):
    self.state, loss = self._step(self.state, self.batch)
    return loss
