"""Gradient accumulation that keeps every negative (GradCache).

Splitting a contrastive batch into micro-batches and averaging their gradients would
shrink each example's negatives to its micro-batch. Instead: (1) embed every micro-batch
without keeping activations, (2) compute the full-batch loss on the concatenated
features and its gradient with respect to the features, (3) re-embed one micro-batch at a
time and pull that feature gradient back into the parameters. The result equals the
full-batch gradient; activation memory is that of one micro-batch plus the features.
It relies on the objective contract: `embed` never mixes examples, `loss` does.
"""
import jax
import jax.numpy as jnp


def split(tree, parts):
  """[B, ...] -> [parts, B / parts, ...], micro-batch i taking rows i, i + parts, ...

  Strided rather than contiguous rows so that every micro-batch stays spread over all
  the devices the batch is sharded on.
  """
  def one(x):
    if x.shape[0] % parts:
      raise ValueError(f"config.accum_steps={parts} does not divide the batch {x.shape[0]}.")
    return jnp.swapaxes(x.reshape((x.shape[0] // parts, parts) + x.shape[1:]), 0, 1)
  return jax.tree.map(one, tree)


def merge(tree):
  """Inverse of `split`."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), tree)


def value_and_grad(embed, loss, params, batch, rng, accum_steps):
  """Full-batch (loss, metrics), grads of `loss(params, embed(params, batch, rng))`.

  `embed(params, micro_batch, rng)` must act on each example independently; micro-batch
  i uses the same key in both passes so random ops (patch dropout) agree.
  """
  micro = split(batch, accum_steps)
  rngs = jax.random.split(rng, accum_steps)
  features = merge(jax.lax.map(
      lambda args: embed(jax.lax.stop_gradient(params), *args), (micro, rngs)))
  (value, metrics), (direct_grads, feature_grads) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(params, features)

  def pull_back(grads, args):
    micro_batch, micro_rng, cotangent = args
    _, vjp = jax.vjp(lambda p: embed(p, micro_batch, micro_rng), params)
    return jax.tree.map(jnp.add, grads, vjp(cotangent)[0]), None

  grads, _ = jax.lax.scan(pull_back, direct_grads, (micro, rngs, split(feature_grads,
                                                                        accum_steps)))
  return (value, metrics), grads
