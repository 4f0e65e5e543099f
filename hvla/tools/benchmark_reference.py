r"""hvla's CLIP train step against the Flax CLIP of Hugging Face transformers.

  pip install -e ".[reference]"
  python -m hvla.tools.benchmark_reference --config=configs/clip_vitb16.py --batch=8 \
      --dtypes=bfloat16,float32

`transformers.FlaxCLIPModel` is the public JAX CLIP that installs from a package index;
its `examples/flax/contrastive-image-text` script trains it. Here it is built with the
towers of the hvla config (widths, depths, heads, patch and image size, vocabulary,
context and joint width), given hvla's initial parameters (`to_transformers`; the tests
check that both then compute the same embeddings), and trained the way that script does: CLIP's symmetric cross-entropy of the logits, `optax.adamw`, one
jitted step, with the hvla config's AdamW hyperparameters. hvla's own step runs on the
same single device with the same synthetic batch and compute dtype, twice: as
configured (gradient clipping, decay masks, metrics and all), and without gradient
clipping, which the reference does not do. The steps alternate, so the ratios of their
median times hold on a loaded machine.
"""
import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from hvla.models import layers
from hvla.tools import benchmark

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file("config", "configs/clip_vitb16.py", "hvla config[:args].")
  flags.DEFINE_integer("batch", 8, "Batch size.")
  flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes to compare in.")
  flags.DEFINE_integer("steps", 5, "Timed steps of each.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")


def hf_clip_config(model_config):
  """A transformers CLIPConfig with the towers of hvla's `config.model` (ViT + text
  transformer with CLIP's pooling: class token for images, EOT for text)."""
  from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top
  image, text = model_config.image, model_config.text
  if image.name != "vit" or text.name != "transformer" or image.pool != "cls" or (
      text.pooling != "eot"):
    raise ValueError("The reference covers CLIP's towers only: model.image.name='vit' "
                     "with pool='cls', model.text.name='transformer' with pooling='eot'.")
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


def parameter_count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class ReferenceCase:
  """FlaxCLIPModel trained as transformers' contrastive-image-text example trains it,
  from hvla's parameters `params` (so both steps work on the same values)."""

  def __init__(self, model_config, params, batch, *, dtype, lr=5e-4, b1=0.9, b2=0.98,
               eps=1e-6, weight_decay=0.2):
    from transformers import FlaxCLIPModel  # pylint: disable=g-import-not-at-top
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
    self.parameters = parameter_count(params)
    decay = jax.tree.map(lambda x: x.ndim > 1, params)  # the example's decay mask
    tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay)
    self.state = (params, tx.init(params))
    images, tokens = batch["images"]["image"], batch["tokens"]["caption"]
    self.batch = {"pixel_values": jnp.asarray(images.transpose(0, 3, 1, 2)),  # NCHW
                  "input_ids": jnp.asarray(tokens),
                  "attention_mask": jnp.asarray(tokens > 0, jnp.int32)}
    self._step = jax.jit(functools.partial(self.train_step, self.model, tx),
                         donate_argnums=0)

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


def compare(config, *, batch, dtypes, steps, warmup):
  """Per dtype, the results of [hvla's step as configured, hvla's step with the
  reference's optimizer (no gradient clipping), the reference's step]: the same towers,
  parameter values, batch and device."""
  rows = []
  for dtype in dtypes:
    hvla_config = benchmark.apply_overrides(
        config, [f"batch_size={batch}", f"model.dtype='{dtype}'", "accum_steps=1",
                 "mesh.data=1", "mesh.fsdp=1", "mesh.model=1"])
    one_device = jax.devices()[:1]
    configured = benchmark.Case(
        f"hvla (clip_norm={hvla_config.optimizer.clip_norm}), {dtype}", hvla_config,
        aot=False, devices=one_device)
    unclipped = benchmark.Case(
        f"hvla (clip_norm=0), {dtype}",
        benchmark.apply_overrides(hvla_config, ["optimizer.clip_norm=0.0"]), aot=False,
        devices=one_device)
    host_batch = benchmark.synthetic_batch(
        benchmark.batch_spec(hvla_config.data, batch), hvla_config.model.text.vocab_size)
    opt = hvla_config.optimizer
    reference = ReferenceCase(
        hvla_config.model, jax.device_get(configured.state["params"]), host_batch,
        dtype=dtype, lr=opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay)
    cases = [configured, unclipped, reference]
    times = benchmark.time_interleaved(cases, steps=steps, warmup=warmup)
    theirs = {"name": reference.name, "batch": batch,
              "device_kind": configured.results["device_kind"],
              "flops_per_step": configured.results["flops_per_step"]}
    row = [benchmark.add_speed(case.results, times[case.name])
           for case in (configured, unclipped)]
    row.append(benchmark.add_speed(theirs, times[reference.name]))
    for r in row:
      r["parameters"] = reference.parameters
    rows.append(row)
  return rows


def format_table(rows):
  """Markdown: each step's median time, and the reference's time over each hvla step's."""
  lines = ["| dtype | step | parameters | step s (median of n) | examples/s | speed vs "
           "reference |", "|---|---|---|---|---|---|"]
  for row in rows:
    reference = row[-1]["step_seconds_median"]
    for r in row:
      name, dtype = r["name"].rsplit(", ", 1)
      speed = f"{reference / r['step_seconds_median']:.2f}x" if r is not row[-1] else "1.00x"
      lines.append(f"| {dtype} | {name} | {r['parameters']:,} | "
                   f"{r['step_seconds_median']:.2f} ({len(r['step_seconds_all'])}) | "
                   f"{r['examples_per_sec']:.2f} | {speed} |")
  return "\n".join(lines)


def main(argv):
  del argv
  rows = compare(FLAGS.config, batch=FLAGS.batch, dtypes=FLAGS.dtypes, steps=FLAGS.steps,
                 warmup=FLAGS.warmup)
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), batch {FLAGS.batch}\n"
        + format_table(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main)
