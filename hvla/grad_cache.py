"""Gradient accumulation that keeps every negative (GradCache).

Splitting a contrastive batch into micro-batches and averaging their gradients would
shrink each example's negatives to its micro-batch. Instead: (1) embed every micro-batch
without keeping activations, (2) compute the full-batch loss on the concatenated
features and its gradient with respect to the features, (3) re-embed one micro-batch at a
time and pull that feature gradient back into the parameters. The result equals the
full-batch gradient; activation memory is that of one micro-batch plus the features.
Features without a gradient (momentum towers) are computed in (1) only.
It relies on the objective contract: embedding never mixes examples, the loss does.
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


def value_and_grad(embed, loss, params, batch, rng, accum_steps=1):
  """((loss, metrics), grads, features) of `loss(params, embed(..., True), embed(...,
  False))`, the gradient over the whole batch with `accum_steps` micro-batches.

  `embed(params, batch, rng, grad)` gives the per-example features with (grad=True) or
  without (grad=False) a gradient; `loss(params, features, fixed_features)`. Micro-batch
  i uses the i-th key of `jax.random.split(rng, accum_steps)` in both passes, so random
  ops (patch dropout) agree; with one step, `rng` itself.
  """
  if accum_steps == 1:
    fixed = jax.lax.stop_gradient(embed(params, batch, rng, False))

    def full(p):
      features = embed(p, batch, rng, True)
      value, metrics = loss(p, features, fixed)
      return value, (metrics, features)
    (value, (metrics, features)), grads = jax.value_and_grad(full, has_aux=True)(params)
    return (value, metrics), grads, {**features, **fixed}

  micro = split(batch, accum_steps)
  rngs = jax.random.split(rng, accum_steps)
  frozen = jax.lax.stop_gradient(params)
  features, fixed = merge(jax.lax.map(
      lambda args: (embed(frozen, *args, True), embed(frozen, *args, False)), (micro, rngs)))
  (value, metrics), (direct_grads, feature_grads) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(params, features, fixed)

  def pull_back(grads, args):
    micro_batch, micro_rng, cotangent = args
    _, vjp = jax.vjp(lambda p: embed(p, micro_batch, micro_rng, True), params)
    return jax.tree.map(jnp.add, grads, vjp(cotangent)[0]), None

  grads, _ = jax.lax.scan(pull_back, direct_grads,
                          (micro, rngs, split(feature_grads, accum_steps)))
  return (value, metrics), grads, {**features, **fixed}
