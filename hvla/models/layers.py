"""Transformer pieces shared by the image and text towers.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, and
`layers` for a scanned stack); activations carry logical constraints (`act_batch`,
`act_len`, `act_embed`, `act_mlp`, `act_heads`). Both are inert until a mesh and
logical axis rules are active, so the same modules run on one CPU and on a pod.

A block stack (`Encoder`) runs any sub-range `[start, stop)` of its blocks, so an
objective can run the lower blocks, change the tokens, then run the upper ones, and
it returns a per-block readout (the tower's pooling applied after every block) for
layer-wise alignment. The first `leff_depth` blocks may replace their MLP by a LeFF
(PyramidCLIP's f1 blocks).
"""
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLINGS = ("cls", "gap", "eot", "max", "mean")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep the weight matmuls, recompute attention scores and elementwise ops.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
LN_EPSILON = 1e-5  # CLIP's LayerNorm epsilon, so CLIP weights load unchanged.


def partitioned(init, *names):
  """An initializer whose parameter carries the logical axis `names`."""
  return nn.with_logical_partitioning(init, names)


def constrain(x, *names):
  """Logical sharding constraint on an activation: a no-op without rules, and skipped
  on a one-device mesh, where it could only cost copies."""
  if jax.sharding.get_abstract_mesh().size == 1:
    return x
  return nn.with_logical_constraint(x, names)


def layer_norm(dtype, name=None):
  """LayerNorm over the width, with CLIP's epsilon."""
  return nn.LayerNorm(
      epsilon=LN_EPSILON, dtype=dtype, name=name,
      scale_init=partitioned(nn.initializers.ones, "embed"),
      bias_init=partitioned(nn.initializers.zeros, "embed"))


def valid_lengths(tokens, pad_id=0):
  """Number of leading positions up to and including the last non-pad token."""
  positions = jnp.arange(1, tokens.shape[1] + 1)
  return jnp.max(jnp.where(tokens != pad_id, positions, 0), axis=1).astype(jnp.int32)


def pool(x, lengths, kind):
  """Pools tokens `x` [B, L, W] into [B, W].

  `lengths` [B] counts the valid leading positions (None: all valid). Kinds: `cls`
  position 0; `gap` mean of positions 1: (the patch tokens after a class token);
  `eot` the last valid position; `max` and `mean` over valid positions. Positions past
  `lengths` never change the result.
  """
  if kind == "cls":
    return x[:, 0]
  if kind == "gap":
    return jnp.mean(x[:, 1:], axis=1)
  if lengths is None:
    lengths = jnp.full(x.shape[:1], x.shape[1], jnp.int32)
  if kind == "eot":
    last = jnp.maximum(lengths - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
  valid = (jnp.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]
  if kind == "max":
    return jnp.max(jnp.where(valid, x, jnp.finfo(x.dtype).min), axis=1)
  if kind == "mean":
    total = jnp.sum(jnp.where(valid, x, 0), axis=1)
    return total / jnp.maximum(lengths, 1)[:, None].astype(x.dtype)
  raise ValueError(f"Unknown pooling {kind!r}, expected one of {POOLINGS}.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_to(logits, dtype):
  """softmax(logits) over the last axis, computed in float32 and returned in `dtype`.

  Its gradient is written out from the returned probabilities alone [ours]. Autodiff of
  `jax.nn.softmax` keeps float32 intermediates of the [B, H, T, S] attention weights
  for the backward pass as well: 2.9 of clip_vitb16's 20.4 GiB at batch 64, and 1-7%
  of its bfloat16 forward and backward pass on the CPU backend (two runs,
  BENCHMARKS.md). In bfloat16 the backward pass then differentiates the probabilities
  the forward pass used.
  """
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_to_fwd(logits, dtype):
  probs = softmax_to(logits, dtype)
  return probs, probs


def _softmax_to_bwd(dtype, probs, grad):
  del dtype
  probs, grad = probs.astype(jnp.float32), grad.astype(jnp.float32)
  return (probs * (grad - jnp.sum(grad * probs, axis=-1, keepdims=True)),)


softmax_to.defvjp(_softmax_to_fwd, _softmax_to_bwd)


def dot_product_attention(q, k, v, *, implementation="xla", causal=False, lengths=None,
                          mask=None):
  """Softmax attention of q [B, T, H, D] over k, v [B, S, H, D]; returns [B, T, H, D].

  Keys are hidden past each row's `lengths` [B] (None: none), after the query when
  `causal`, and where `mask` (broadcastable to [B, H, T, S], True: attend) is False.

  'cudnn' is jax.nn.dot_product_attention's fused (flash) kernel. 'xla' is written here
  [ours]: the same function as jax.nn.dot_product_attention's XLA path (the tests
  compare them), logits in the compute dtype and the softmax in float32 (`softmax_to`),
  but as two einsums over [B, H, T, S] without that path's grouped-query 5-D reshapes,
  whose transposes cost ~4% of clip_vitb16's train step on the CPU backend
  (BENCHMARKS.md).
  """
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, key_value_seq_lengths=lengths,
        implementation="cudnn")
  logits = jnp.einsum("bthd,bshd->bhts", q, k)
  logits = (logits * jnp.asarray(q.shape[-1] ** -0.5, logits.dtype)).astype(jnp.float32)
  t, s = logits.shape[-2:]
  keep = jnp.ones((1, 1, 1, s), bool) if mask is None else mask
  if lengths is not None:
    keep = keep & (jnp.arange(s) < lengths[:, None])[:, None, None, :]
  if causal:
    keep = keep & jnp.tril(jnp.ones((t, s), bool))
  logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  probs = softmax_to(logits, v.dtype)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


def split_over_devices(*names):
  """Whether the active logical rules and mesh split any of the logical axes `names`
  over more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False
  for entry in nn.logical_to_mesh_axes(names):
    for axis in entry if isinstance(entry, tuple) else (entry,):
      if axis is not None and mesh.shape[axis] > 1:
        return True
  return False


class DenseNd(nn.Module):
  """A Dense layer whose input and output features have several axes: x [..., *in]
  times a kernel [*in, *features] plus a bias [*features], e.g. the width to
  (q/k/v, heads, head_dim), or (heads, head_dim) back to the width.

  It multiplies as one matrix [prod(in), prod(features)] [ours]: given the kernel as a
  4-D einsum operand, XLA's CPU backend computes its gradient transposed and transposes
  it back in the optimizer (~8% of clip_vitb16's train step, BENCHMARKS.md). Merging
  kernel axes is free unless the rules split one that is not the first of its group over
  devices (q/k/v before sharded heads); that kernel would be gathered, so it is then
  multiplied as it is.
  """
  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]  # logical names, input axes then `features`'
  kernel_init: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n_in = len(self.kernel_axes) - len(self.features)
    in_shape, batch = x.shape[x.ndim - n_in:], x.shape[:x.ndim - n_in]
    kernel = self.param("kernel", partitioned(self.kernel_init, *self.kernel_axes),
                        in_shape + tuple(self.features))
    bias = self.param("bias", partitioned(nn.initializers.zeros, *self.kernel_axes[n_in:]),
                      tuple(self.features))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if split_over_devices(*self.kernel_axes[1:n_in], *self.kernel_axes[n_in + 1:]):
      y = jax.lax.dot_general(
          x, kernel, ((tuple(range(len(batch), x.ndim)), tuple(range(n_in))), ((), ())))
    else:
      y = (x.reshape(batch + (-1,)) @ kernel.reshape(math.prod(in_shape), -1)).reshape(
          batch + tuple(self.features))
    return y + bias


def split_qkv(qkv):
  """q, k, v [B, L, H, D] of a fused projection [B, L, 3, H, D].

  One `jnp.split` rather than three slices [ours]: the gradient of a split is one
  concatenation, where three slices give three zero-padded arrays summed, through the
  heads' transposes. That took 7% of clip_vitb16's bfloat16 forward and backward pass
  on the CPU backend (BENCHMARKS.md).
  """
  return tuple(constrain(part[:, :, 0], "act_batch", "act_len", "act_heads", None)
               for part in jnp.split(qkv, 3, axis=2))


class Attention(nn.Module):
  """Multi-head self-attention (`dot_product_attention` with `implementation`).

  The fused q/k/v kernel [W, 3, heads, head_dim] is initialised as one [W, 3W] matrix
  (as torch's MultiheadAttention, which CLIP uses).

  `lengths` [B] (or None) masks keys past each row's valid length, which makes
  padding invisible to every real position.
  """
  heads: int
  causal: bool = False
  dtype: Any = jnp.float32
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x, lengths=None):
    width = x.shape[-1]
    head_dim = width // self.heads
    qkv = DenseNd(
        (3, self.heads, head_dim), ("embed", None, "heads", "kv"),
        nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2, 3)), self.dtype,
        name="qkv")(x)
    q, k, v = split_qkv(qkv)
    y = dot_product_attention(q, k, v, implementation=self.implementation,
                              causal=self.causal, lengths=lengths)
    return DenseNd(
        (width,), ("heads", "kv", "embed"),
        nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2), self.dtype,
        name="out")(y)


class Mlp(nn.Module):
  """Two-layer GELU MLP (exact erf GELU, as torch's default)."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(
        self.hidden, dtype=self.dtype, name="fc1",
        kernel_init=partitioned(nn.initializers.xavier_uniform(), "embed", "mlp"),
        bias_init=partitioned(nn.initializers.zeros, "mlp"))(x)
    h = constrain(nn.gelu(h, approximate=False), "act_batch", "act_len", "act_mlp")
    return nn.Dense(
        x.shape[-1], dtype=self.dtype, name="fc2",
        kernel_init=partitioned(nn.initializers.xavier_uniform(), "mlp", "embed"),
        bias_init=partitioned(nn.initializers.zeros, "embed"))(h)


def quick_gelu(x):
  """CLIP's GELU approximation x * sigmoid(1.702 x), used by the LeFF [paper]."""
  return x * jax.nn.sigmoid(1.702 * x)


LEFF_NORM_GROUPS = 32


def depthwise_conv3x3(x, kernel):
  """x [B, h, w, C] with one 3x3 filter per channel, kernel [3, 3, C], zero padding 1.

  Nine shifted products rather than a grouped convolution, which XLA's CPU backend
  runs (and its cost analysis counts) as a dense C x C convolution [ours].
  """
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(padded[:, i:i + h, j:j + w] * kernel[i, j] for i in range(3) for j in range(3))


class Leff(nn.Module):
  """Locally enhanced feed-forward on the patch tokens of a ViT [paper, official model code]:
  Linear W->hidden, norm, QuickGELU; the tokens as their (h, w) grid, depthwise 3x3
  convolution, norm, QuickGELU; Linear hidden->W, norm, QuickGELU.

  [ours] The paper's BatchNorms become GroupNorms (LEFF_NORM_GROUPS groups, statistics
  over one example's patch tokens): BatchNorm would mix the examples of a batch (the
  objective's `embed` must stay per-example for exact gradient accumulation) and needs
  mutable batch statistics that the pure train step does not carry. The depthwise
  convolution has no bias (the norm after it has one).
  """
  hidden: int
  grid: tuple[int, int]
  dtype: Any = jnp.float32

  def _norm(self, name, axis_name):
    return nn.GroupNorm(
        num_groups=LEFF_NORM_GROUPS, epsilon=LN_EPSILON, dtype=self.dtype, name=name,
        scale_init=partitioned(nn.initializers.ones, axis_name),
        bias_init=partitioned(nn.initializers.zeros, axis_name))

  @nn.compact
  def __call__(self, x):
    b, p, width = x.shape
    h, w = self.grid
    if p != h * w:
      raise ValueError(f"The LeFF got {p} patch tokens for a {h}x{w} grid.")
    y = nn.Dense(
        self.hidden, dtype=self.dtype, name="fc1",
        kernel_init=partitioned(nn.initializers.xavier_uniform(), "embed", "mlp"),
        bias_init=partitioned(nn.initializers.zeros, "mlp"))(x)
    y = quick_gelu(self._norm("norm1", "mlp")(y))
    kernel = self.param(
        "conv_kernel", partitioned(nn.initializers.variance_scaling(
            2.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2),
            None, None, "mlp"), (3, 3, self.hidden))
    y = depthwise_conv3x3(y.reshape(b, h, w, self.hidden), kernel.astype(self.dtype))
    y = quick_gelu(self._norm("norm2", "mlp")(y.reshape(b, p, self.hidden)))
    y = constrain(y, "act_batch", "act_len", "act_mlp")
    y = nn.Dense(
        width, dtype=self.dtype, name="fc2",
        kernel_init=partitioned(nn.initializers.xavier_uniform(), "mlp", "embed"),
        bias_init=partitioned(nn.initializers.zeros, "embed"))(y)
    return quick_gelu(self._norm("norm3", "embed")(y))


class Block(nn.Module):
  """Pre-norm transformer block. Returns (tokens, readout of the tokens).

  The readout is `pool(tokens, lengths, readout)`: the per-layer feature that
  layer-wise objectives align. Returning it from the block lets `nn.scan` stack it
  without keeping every layer's full token sequence.

  With a `leff_grid` (h, w) the feed-forward is a `Leff` on the patch tokens instead of
  the MLP. The class token (position 0) skips the LeFF but still comes out of the
  feed-forward as its normalised input, so the residual adds `norm2(x)` to it [paper,
  official model code: LEFF returns the class token it was given].

  `extra` trailing tokens (ViCHA's concept tokens, after the patches) are not part of
  the patch grid: the readout and the LeFF read only the tokens before them, and they
  pass a LeFF as the class token does [ours].
  """
  mlp_dim: int
  heads: int
  readout: str
  causal: bool = False
  dtype: Any = jnp.float32
  attention: str = "xla"
  leff_grid: tuple[int, int] | None = None
  extra: int = 0

  @nn.compact
  def __call__(self, x, lengths=None):
    y = layer_norm(self.dtype, "norm1")(x)
    x = x + Attention(self.heads, self.causal, self.dtype, self.attention, name="attn")(
        y, lengths)
    y = layer_norm(self.dtype, "norm2")(x)
    end = x.shape[1] - self.extra  # the class token and the patch grid before it
    if self.leff_grid is None:
      x = x + Mlp(self.mlp_dim, self.dtype, name="mlp")(y)
    else:
      patches = Leff(self.mlp_dim, self.leff_grid, self.dtype, name="leff")(y[:, 1:end])
      x = x + jnp.concatenate([y[:, :1], patches, y[:, end:]], axis=1)
    x = constrain(x, "act_batch", "act_len", "act_embed")
    return x, pool(x[:, :end], lengths, self.readout)


class Encoder(nn.Module):
  """A stack of `depth` blocks that runs any contiguous sub-range of them.

  Parameters live in `block_{i}` (one per block) or, with `scan=True`, in one
  `blocks` subtree whose leaves have a leading `layers` axis of size `depth`. A
  scanned sub-range slices that axis, so both layouts give the same results.
  Blocks [0, leff_depth) use a LeFF instead of the MLP (not with `scan`: their
  parameters differ from the other blocks').
  """
  depth: int
  mlp_dim: int
  heads: int
  readout: str
  causal: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  attention: str = "xla"
  leff_depth: int = 0

  @nn.compact
  def __call__(self, x, lengths=None, start=0, stop=None, grid=None, extra=0):
    """Runs blocks [start, stop) on `x`; returns (x, readouts [stop - start, B, W]).

    `grid` (h, w) is the patch grid of x[:, 1:], needed when a LeFF block runs; the
    last `extra` tokens follow the grid (see `Block`).
    """
    stop = self.depth if stop is None else stop
    if not 0 <= start < stop <= self.depth:
      raise ValueError(f"Block range [{start}, {stop}) is empty or outside [0, {self.depth}).")
    if self.scan and self.leff_depth:
      raise ValueError("LeFF blocks cannot be scanned: set model.scan=False.")
    if start < self.leff_depth and grid is None:
      raise ValueError("LeFF blocks need the patch `grid`.")
    block = Block
    if self.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    kwargs = dict(mlp_dim=self.mlp_dim, heads=self.heads, readout=self.readout,
                  causal=self.causal, dtype=self.dtype, attention=self.attention,
                  extra=extra)
    if not self.scan:
      readouts = []
      for i in range(start, stop):
        leff_grid = tuple(grid) if i < self.leff_depth else None
        x, r = block(**kwargs, leff_grid=leff_grid, name=f"block_{i}")(x, lengths)
        readouts.append(r)
      return x, jnp.stack(readouts)

    def scanned(length):
      return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=nn.broadcast, length=length,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    if (start, stop) == (0, self.depth):
      stack = scanned(self.depth)
    elif self.is_initializing():
      # A sliced view cannot create the stack: `init` runs the whole of it, creating
      # every layer's parameters; only the shapes of its outputs matter there.
      x, readouts = scanned(self.depth)(**kwargs, name="blocks")(x, lengths)
      return x, readouts[start:stop]
    else:
      stack = nn.map_variables(
          scanned(stop - start), "params",
          trans_in_fn=lambda tree: jax.tree.map(lambda a: a[start:stop], tree))
    return stack(**kwargs, name="blocks")(x, lengths)


# Set once in the model config for both towers, not per tower.
SHARED_FIELDS = ("dtype", "remat", "scan", "attention")


def tower_kwargs(cls, config, path, exclude=()):
  """Module keyword arguments from a tower config at `path`, rejecting unknown keys.

  `name` selects the tower and is dropped; every other key must be a field of `cls`
  that the model config does not set for both towers (SHARED_FIELDS) nor elsewhere
  (`exclude`, e.g. the fields `model.pyramid` sets).
  """
  fields = {f.name for f in dataclasses.fields(cls)} - {
      "parent", "name", *SHARED_FIELDS, *exclude}
  unknown = sorted(set(config) - fields - {"name"})
  if unknown:
    raise ValueError(f"Unknown key(s) {', '.join(f'{path}.{k}' for k in unknown)}; "
                     f"{cls.__name__} takes {sorted(fields)}.")
  return {k: v for k, v in config.items() if k != "name"}


def check(ok, key, message):
  """Raises a ValueError naming the config `key` unless `ok`."""
  if not ok:
    raise ValueError(f"{key}: {message}")


def check_positive_ints(tower, path, *keys):
  """Checks that the fields `keys` of `tower` are positive integers."""
  for key in keys:
    value = getattr(tower, key)
    check(isinstance(value, int) and value > 0, f"{path}.{key}",
          f"must be a positive integer, got {value!r}")


def check_transformer(tower, path):
  """Checks the fields every transformer tower has: width, depth, heads, mlp_ratio."""
  check_positive_ints(tower, path, "width", "depth", "heads")
  check(tower.width % tower.heads == 0, f"{path}.width",
        f"{tower.width} is not divisible by {path}.heads={tower.heads}")
  check(tower.mlp_ratio > 0 and int(tower.width * tower.mlp_ratio) > 0,
        f"{path}.mlp_ratio", f"must be positive, got {tower.mlp_ratio!r}")
