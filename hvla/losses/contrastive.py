"""The one contrastive primitive every hvla objective is built on (METHODS.md §0).

Anchors x [N, D] meet candidates y [M, D] through the similarity

    s_ij = scale * (x_i . y_j - bias)        (scale = 1 / tau, bias = the offset b)

where scale and bias are scalars, or [R, C] tables indexed by the domains of the pair
(UniCLIP's domain-dependent similarity). Pair (i, j) is positive when the anchor's and
the candidate's group ids are equal (default ids: the diagonal), so no [N, M] mask is
ever an input. `row_valid` and `col_valid` drop items: an invalid row is neither an
anchor of x->y nor a candidate of y->x, and likewise for columns. A `domain_mask` [R, C]
drops whole domain pairs (e.g. UniCLIP without its image-image pairs). The loss of one
direction is the mean over its valid anchors (0 when it has none) of:

- 'softmax': cross-entropy of softmax(s_i) with a target distribution: (1 - alpha)
  spread uniformly over the anchor's positives and alpha uniformly over its negatives.
  With one positive among M candidates that is 1 - alpha and alpha / (M - 1): the
  softened targets of PyramidCLIP [recon] (unlike the usual label smoothing, which also
  gives alpha / M to the positive). Spreading over several positives is [ours]. With a
  `Teacher` (momentum distillation, ALBEF / ViCHA [paper]) the target becomes
  a * softmax_j(t_ij) + (1 - a) * that hard target, t_ij = teacher scale * xt_i . yt_j
  over the same candidates; the teacher carries no gradient.
- 'mpnce': UniCLIP's MP-NCE [recon]: -1/|P| sum_p log(e^s_ip / (e^s_ip + sum_neg e^s_in)),
  other positives kept out of the denominator.
- 'sigmoid': SigLIP [paper]: sum_j -log sigmoid(z_ij s_ij), z = +1 on positives and -1
  elsewhere, summed over candidates (then the mean over anchors).

An anchor without any candidate adds 0 (and still counts in the mean) [ours].
`symmetric` averages the x->y and y->x directions (CLIP [paper]). Both come from one pass
over the logits: each block of s is computed once, its rows' statistics (reduced along
axis 1) and its columns' statistics (along axis 0) accumulate from it [ours]. The
columns' are not read from a transposed block: XLA fuses such a transpose into the
element-wise loops, which then read the whole [N, M] logits at strided addresses (value
and gradient) and made one-pass 'dense' slower than two one-way calls (BENCHMARKS.md,
"The symmetric loss"). The strategies compute the same value and gradient: 'dense'
materialises the [N, M] logits; 'chunked' streams blocks of candidates with an online
log-sum-exp and a custom VJP that recomputes each block once; 'sharded' runs under
`jax.shard_map`, each device's rows against the all-gathered columns, the columns'
statistics (partial over the device's rows) combined across devices by pmax / psum of
rescaled sums; gradients flow back (reduce-scattered) to the device that produced them.
XLA merges identical gathers, so an array that several calls in one jitted function use
is gathered once. Logits are computed in float32 [ours].
"""
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

KINDS = ("softmax", "mpnce", "sigmoid")
STRATEGIES = ("dense", "chunked", "sharded")
DEFAULT_BATCH_AXES = ("data", "fsdp")
_FLOOR = float(jnp.finfo(jnp.float32).min)  # running max of an empty online log-sum-exp


class Teacher(NamedTuple):
  """Soft targets from a teacher (e.g. the momentum model of ALBEF / ViCHA [paper]):
  anchor i's target is weight * softmax_j(scale * x_i . y_j) + (1 - weight) * the hard
  target. x [N, Dt] and y [M, Dt] are the teacher's embeddings of the same items; none
  of the four fields receives a gradient. kind='softmax' only."""
  x: Any
  y: Any
  scale: Any
  weight: Any


class _Items(NamedTuple):
  """Embeddings and what the loss must know of each: group id (equal ids are positive
  pairs), domain (indexes per-domain-pair scale and bias), position in the whole set
  (matches an anchor with itself for `exclude_self`), validity (False also for block
  padding) and, with a teacher, the teacher's embedding (the rows' pre-scaled)."""
  emb: jax.Array  # float32 [K, D]
  ids: jax.Array  # int32 [K]
  dom: jax.Array  # int32 [K]
  index: jax.Array  # int32 [K]
  valid: jax.Array  # bool [K]
  teacher: Any = None  # float32 [K, Dt] or None


class _Options(NamedTuple):
  kind: str
  label_smoothing: float
  exclude_self: bool
  symmetric: bool
  stop_grad_cols: bool
  domain_mask: tuple | None  # rows of bools (static), or None: every domain pair


def contrastive_loss(x, y, *, scale, bias=0.0, kind="softmax", label_smoothing=0.0,
                     row_ids=None, col_ids=None, row_domains=None, col_domains=None,
                     exclude_self=False, symmetric=True, stop_grad_cols=False,
                     strategy="dense", block_size=None, mesh=None, batch_axes=None,
                     row_valid=None, col_valid=None, teacher=None, domain_mask=None):
  """Contrastive loss of anchors x [N, D] against candidates y [M, D] (a scalar).

  Args:
    x, y: embeddings (normalised by the caller).
    scale, bias: s_ij = scale * (x_i . y_j - bias); scalars, or [R, C] tables indexed by
      (row_domains[i], col_domains[j]).
    kind: 'softmax', 'mpnce' or 'sigmoid' (see the module docstring).
    label_smoothing: alpha of the softened softmax targets.
    row_ids, col_ids: int [N], [M] group ids, positive pair iff equal; None: diagonal.
      An anchor without positives adds only its negatives' terms (sigmoid, smoothing).
    row_domains, col_domains: int [N], [M], needed when scale or bias is a table or
      there is a domain_mask.
    exclude_self: x and y are the same N items; pair (i, i) is neither positive nor
      negative (UniCLIP's all-pairs setting).
    symmetric: mean of the x->y and y->x losses; otherwise x->y only.
    stop_grad_cols: the candidates of each direction carry no gradient (ViCHA [paper]).
    strategy: 'dense', 'chunked' or 'sharded'.
    block_size: candidates per block for 'chunked' (required) and, when set, within
      each device for 'sharded'; unused by 'dense'.
    mesh, batch_axes: for 'sharded', see `resolve_batch_mesh`.
    row_valid, col_valid: bool [N], [M]; None: all valid. Invalid items are neither
      anchors nor candidates; each direction averages over its valid anchors.
    teacher: a `Teacher` whose softmax enters the targets (kind='softmax').
    domain_mask: bool [R, C] (a concrete array or nested lists); pairs whose domain pair
      is False are neither positive nor negative. None: every pair counts.
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  scale, bias = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
  check_options(kind, label_smoothing, strategy, block_size)
  domain_mask = _static_mask(domain_mask)
  _check_args(x, y, scale, bias, row_ids, col_ids, row_domains, col_domains, exclude_self,
              row_valid, col_valid, domain_mask)
  _check_teacher(teacher, kind, x, y)
  rows = _items(x, row_ids, row_domains, row_valid)
  cols = _items(y, col_ids, col_domains, col_valid)
  weight = jnp.float32(0.0)
  if teacher is not None:
    t_scale = jax.lax.stop_gradient(jnp.asarray(teacher.scale, jnp.float32))
    rows = rows._replace(teacher=jax.lax.stop_gradient(
        t_scale * jnp.asarray(teacher.x, jnp.float32)))
    cols = cols._replace(teacher=jax.lax.stop_gradient(jnp.asarray(teacher.y, jnp.float32)))
    weight = jax.lax.stop_gradient(jnp.asarray(teacher.weight, jnp.float32))
  opts = _Options(kind, float(label_smoothing), bool(exclude_self), bool(symmetric),
                  bool(stop_grad_cols), domain_mask)
  block_size = None if strategy == "dense" else block_size
  if strategy == "sharded":
    sums = _sharded(opts, block_size, rows, cols, scale, bias, weight,
                    *resolve_batch_mesh(mesh, batch_axes))
  else:
    sums = _summed_losses(opts, block_size, rows, cols, scale, bias, weight)
  counts = [jnp.sum(items.valid) for items in (rows, cols)]
  terms = [total / jnp.maximum(count, 1) for total, count in zip(sums, counts)]
  return sum(terms) / len(terms)


def resolve_batch_mesh(mesh=None, batch_axes=None):
  """(mesh, batch axes) for the 'sharded' strategy.

  mesh defaults to the one activated with `jax.set_mesh` (read at trace time), batch
  axes to those of DEFAULT_BATCH_AXES that the mesh has.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError("strategy='sharded' needs a mesh: pass mesh= or activate one with "
                     "jax.set_mesh(mesh)")
  if batch_axes is None:
    batch_axes = tuple(a for a in DEFAULT_BATCH_AXES if a in mesh.axis_names)
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  unknown = [a for a in batch_axes if a not in mesh.axis_names]
  if unknown or not batch_axes:
    raise ValueError(f"batch axes {batch_axes} must be a non-empty subset of the mesh "
                     f"axes {mesh.axis_names}")
  return mesh, batch_axes


# ----------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------
def check_options(kind, label_smoothing=0.0, strategy="dense", block_size=None):
  """Raises ValueError for options no input could make valid; objectives call it when
  they are built, before anything is traced."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  if label_smoothing and kind != "softmax":
    raise ValueError(f"label_smoothing applies to kind='softmax' only, not {kind!r}")
  if strategy == "chunked" and block_size is None:
    raise ValueError("strategy='chunked' needs block_size")
  if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _static_mask(domain_mask):
  """A domain mask as nested tuples of bools: hashable, so it can steer tracing."""
  if domain_mask is None:
    return None
  try:
    mask = np.asarray(domain_mask)
  except jax.errors.TracerArrayConversionError:
    raise ValueError("domain_mask must be concrete (it selects pairs when tracing), not "
                     "a traced array") from None
  if mask.ndim != 2 or mask.dtype != np.bool_:
    raise ValueError(f"domain_mask must be an [R, C] table of bools, got {mask.dtype} "
                     f"{mask.shape}")
  return tuple(tuple(bool(v) for v in row) for row in mask)


def _check_args(x, y, scale, bias, row_ids, col_ids, row_domains, col_domains, exclude_self,
                row_valid, col_valid, domain_mask):
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"x and y must be [N, D] and [M, D], got {x.shape} and {y.shape}")
  if x.shape[0] < 1 or y.shape[0] < 1 + exclude_self:
    raise ValueError(f"every anchor needs a candidate, got x {x.shape} and y {y.shape}")
  if exclude_self and x.shape[0] != y.shape[0]:
    raise ValueError(f"exclude_self needs x and y to be the same items, got {x.shape} "
                     f"and {y.shape}")
  if (row_ids is None) != (col_ids is None):
    raise ValueError("give both row_ids and col_ids, or neither (diagonal positives)")
  tables = [p.shape for p in (scale, bias) if p.ndim]
  if any(len(shape) != 2 for shape in tables):
    raise ValueError(f"scale and bias must be scalars or [R, C] tables, got {tables}")
  if (bool(tables) or domain_mask is not None) != (row_domains is not None and
                                                    col_domains is not None):
    raise ValueError("row_domains and col_domains are needed exactly when scale or bias "
                     "is a per-domain-pair table or a domain_mask is given")
  for name, ids, n in (("row_ids", row_ids, x.shape[0]), ("col_ids", col_ids, y.shape[0]),
                       ("row_domains", row_domains, x.shape[0]),
                       ("col_domains", col_domains, y.shape[0])):
    if ids is not None and (jnp.shape(ids) != (n,) or
                            not jnp.issubdtype(jnp.result_type(ids), jnp.integer)):
      raise ValueError(f"{name} must be integers of shape ({n},), got "
                       f"{jnp.result_type(ids)} {jnp.shape(ids)}")
  for name, valid, n in (("row_valid", row_valid, x.shape[0]),
                         ("col_valid", col_valid, y.shape[0])):
    if valid is not None and (jnp.shape(valid) != (n,) or
                              jnp.result_type(valid) != jnp.bool_):
      raise ValueError(f"{name} must be booleans of shape ({n},), got "
                       f"{jnp.result_type(valid)} {jnp.shape(valid)}")


def _check_teacher(teacher, kind, x, y):
  if teacher is None:
    return
  if kind != "softmax":
    raise ValueError(f"teacher targets apply to kind='softmax' only, not {kind!r}")
  tx, ty = jnp.shape(teacher.x), jnp.shape(teacher.y)
  if len(tx) != 2 or len(ty) != 2 or tx[1] != ty[1] or (tx[0], ty[0]) != (x.shape[0],
                                                                          y.shape[0]):
    raise ValueError(f"teacher.x and teacher.y must be [N, Dt] and [M, Dt] with N, M = "
                     f"{x.shape[0]}, {y.shape[0]}, got {tx} and {ty}")
  if jnp.ndim(teacher.scale) or jnp.ndim(teacher.weight):
    raise ValueError("teacher.scale and teacher.weight must be scalars")
  if isinstance(teacher.weight, (int, float)) and not 0.0 <= teacher.weight <= 1.0:
    raise ValueError(f"teacher.weight must be in [0, 1], got {teacher.weight}")


def _items(emb, ids, domains, valid):
  position = jnp.arange(emb.shape[0], dtype=jnp.int32)
  return _Items(emb,
                position if ids is None else jnp.asarray(ids, jnp.int32),
                jnp.zeros_like(position) if domains is None else jnp.asarray(domains, jnp.int32),
                position,
                jnp.ones(emb.shape[:1], bool) if valid is None else jnp.asarray(valid, bool))


# ----------------------------------------------------------------------------------------
# One block of logits.
# ----------------------------------------------------------------------------------------
def _per_pair(param, a, c):
  return param if param.ndim == 0 else param[a.dom[:, None], c.dom[None, :]]


def _scores(a, c, scale, bias, opts):
  """One block [n, b] of anchors a against candidates c: the logits that feed the rows'
  statistics and those that feed the columns' (the same values; with stop_grad_cols each
  passes gradient to its own anchors only, and XLA merges the two products), the
  teacher's logits (or None), and the positive and negative masks (invalid items and,
  with exclude_self, the pair (i, i) are in neither)."""
  def logits(a_emb, c_emb):
    return _per_pair(scale, a, c) * (a_emb @ c_emb.T - _per_pair(bias, a, c))
  if opts.stop_grad_cols:
    s_rows = logits(a.emb, jax.lax.stop_gradient(c.emb))
    s_cols = logits(jax.lax.stop_gradient(a.emb), c.emb)
  else:
    s_rows = s_cols = logits(a.emb, c.emb)
  t = None if a.teacher is None else a.teacher @ c.teacher.T
  keep = a.valid[:, None] & c.valid[None, :]
  if opts.domain_mask is not None:
    keep &= _per_pair(jnp.asarray(opts.domain_mask), a, c)
  if opts.exclude_self:
    keep &= a.index[:, None] != c.index[None, :]
  pos = keep & (a.ids[:, None] == c.ids[None, :])
  return s_rows, s_cols, t, pos, keep & ~pos


def _masked_sum(values, mask, axis):
  return jnp.sum(jnp.where(mask, values, 0.0), axis=axis)


def _count(mask, axis):
  return jnp.sum(mask, axis=axis, dtype=jnp.float32)


def _along(v, axis):
  """A per-anchor vector broadcast against a block whose candidates run along `axis`."""
  return v[:, None] if axis == 1 else v[None, :]


# ----------------------------------------------------------------------------------------
# Online log-sum-exp: partial sums over disjoint candidate sets, merged by rescaling.
# ----------------------------------------------------------------------------------------
class _Online(NamedTuple):
  """sum_j exp(l_j - peak) and sum_j exp(l_j - peak) * w_j for a few weights w."""
  peak: jax.Array
  sums: tuple


def _online(l, mask, axis, peak=None, weights=()):
  """Per-anchor _Online over the masked entries of l [n, b], reduced along `axis` (1:
  the rows are the anchors, 0: the columns are); `peak` given (the final one, when the
  backward pass recomputes a block) fixes the reference. The peak carries no gradient:
  the log-sum-exp does not depend on it."""
  if peak is None:
    peak = jnp.max(jnp.where(mask, l, _FLOOR), axis=axis, initial=_FLOOR)
  peak = jax.lax.stop_gradient(peak)
  # exactly 0 where masked, also in the gradient (masked entries of l - peak may overflow)
  e = jnp.exp(jnp.where(mask, l - _along(peak, axis), -jnp.inf))
  return _Online(peak, (jnp.sum(e, axis),) +
                 tuple(jnp.sum(e * w, axis) for w in weights))


def _is_online(v):
  return isinstance(v, _Online)


def _merge(a, b):
  """Statistics of the union of two disjoint candidate sets."""
  def one(u, v):
    if not _is_online(u):
      return u + v
    peak = jnp.maximum(u.peak, v.peak)
    return _Online(peak, tuple(p * jnp.exp(u.peak - peak) + q * jnp.exp(v.peak - peak)
                               for p, q in zip(u.sums, v.sums)))
  return jax.tree.map(one, a, b, is_leaf=_is_online)


def _combine(stats, axes):
  """Statistics over every device's candidates, from each device's partial ones."""
  def one(u):
    if not _is_online(u):
      return jax.lax.psum(u, axes)
    peak = jax.lax.pmax(jax.lax.stop_gradient(u.peak), axes)
    return _Online(peak, tuple(jax.lax.psum(p * jnp.exp(u.peak - peak), axes)
                               for p in u.sums))
  return jax.tree.map(one, stats, is_leaf=_is_online)


def _peaks(stats):
  return {k: v.peak for k, v in stats.items() if _is_online(v)}


def _log_sum_exp(acc):
  """peak + log(sum); _FLOOR for an empty set, with zero gradient rather than NaN. Not
  log(max(sum, 1)): when every term but the largest underflows the sum is exactly 1, and
  the tie would halve the gradient."""
  total = acc.sums[0]
  return acc.peak + jnp.log(jnp.where(total > 0, total, 1.0))


# ----------------------------------------------------------------------------------------
# What each kind sums per anchor over a block of candidates (along `axis` of s).
# ----------------------------------------------------------------------------------------
def _softmax_stats(s, t, pos, neg, extra, peaks, axis):
  del extra
  keep = pos | neg
  stats = {"lse": _online(s, keep, axis, peaks.get("lse")), "n_pos": _count(pos, axis),
           "n_neg": _count(neg, axis), "s_pos": _masked_sum(s, pos, axis),
           "s_neg": _masked_sum(s, neg, axis)}
  if t is not None:  # the teacher's softmax and its mean of s, in one online pass
    stats["teacher"] = _online(t, keep, axis, peaks.get("teacher"), weights=(s,))
  return stats


def _mpnce_negatives(s, t, pos, neg, extra, peaks, axis):
  del t, extra
  return {"neg": _online(s, neg, axis, peaks.get("neg")), "n_pos": _count(pos, axis)}


def _mpnce_positives(s, t, pos, neg, neg_lse, peaks, axis):
  """-log(e^s_ip / (e^s_ip + e^neg_lse)) = softplus(neg_lse - s_ip), summed over p."""
  del t, neg, peaks
  return {"terms": _masked_sum(jax.nn.softplus(_along(neg_lse, axis) - s), pos, axis)}


def _sigmoid_stats(s, t, pos, neg, extra, peaks, axis):
  del t, extra, peaks
  return {"pairs": _masked_sum(jax.nn.softplus(-s), pos, axis) +
                   _masked_sum(jax.nn.softplus(s), neg, axis)}


def _softmax_losses(stats, opts, weight):
  lse = _log_sum_exp(stats["lse"])
  t_pos = (1.0 - opts.label_smoothing) / jnp.maximum(stats["n_pos"], 1.0)
  t_neg = opts.label_smoothing / jnp.maximum(stats["n_neg"], 1.0)
  hard = (t_pos * (stats["n_pos"] * lse - stats["s_pos"]) +
          t_neg * (stats["n_neg"] * lse - stats["s_neg"]))
  if "teacher" not in stats:
    return hard
  total, weighted = stats["teacher"].sums  # -sum_j q_j log p_j = lse - sum_j q_j s_j
  some = total > 0
  soft = jnp.where(some, lse - weighted / jnp.where(some, total, 1.0), 0.0)
  return weight * soft + (1.0 - weight) * hard


# ----------------------------------------------------------------------------------------
# The statistics of all anchors of both directions, from one pass over the blocks.
# ----------------------------------------------------------------------------------------
def _block_stats(stats_fn, opts, rows, block, scale, bias, row_extra, block_extra,
                 row_peaks=None, col_peaks=None):
  """Rows' statistics over this block's candidates and (symmetric) the block columns'
  statistics over all rows, from one computation of the block's logits: the rows'
  reduce along axis 1, the columns' along axis 0 of the same arrays (no transpose)."""
  s_rows, s_cols, t, pos, neg = _scores(rows, block, scale, bias, opts)
  row = stats_fn(s_rows, t, pos, neg, row_extra, row_peaks or {}, axis=1)
  if not opts.symmetric:
    return row, None
  return row, stats_fn(s_cols, t, pos, neg, block_extra, col_peaks or {}, axis=0)


def _blocked(tree, block_size):
  """Arrays [M, ...] as [num_blocks, block_size, ...], the last block zero-padded
  (padding is invalid: `valid` pads with False)."""
  def one(v):
    pad = -v.shape[0] % block_size
    v = jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1))
    return v.reshape(-1, block_size, *v.shape[1:])
  return jax.tree.map(one, tree)


def _unblocked(tree, m):
  return jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:])[:m], tree)


def _stats(stats_fn, opts, block_size, rows, cols, scale, bias, row_extra, col_extra):
  """(Rows' statistics over all of cols, cols' statistics over these rows or None)."""
  if block_size is None:
    return _block_stats(stats_fn, opts, rows, cols, scale, bias, row_extra, col_extra)
  return _streamed(stats_fn, opts, block_size, rows, cols, scale, bias, row_extra,
                   col_extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _streamed(stats_fn, opts, block_size, rows, cols, scale, bias, row_extra, col_extra):
  return _streamed_fwd(stats_fn, opts, block_size, rows, cols, scale, bias, row_extra,
                       col_extra)[0]


def _streamed_fwd(stats_fn, opts, block_size, rows, cols, scale, bias, row_extra, col_extra):
  """The rows' statistics accumulate online over the column blocks; each block's columns
  see every row at once, so their statistics are complete within the block."""
  empty = jax.tree.map(lambda v: v[:0], (cols, col_extra))
  init, _ = _block_stats(stats_fn, opts, rows, *empty[:1], scale, bias, row_extra, empty[1])

  def step(acc, xs):
    row, col = _block_stats(stats_fn, opts, rows, *xs[:1], scale, bias, row_extra, xs[1])
    return _merge(acc, row), col
  row_stats, col_stats = jax.lax.scan(step, init, _blocked((cols, col_extra), block_size))
  stats = (row_stats, _unblocked(col_stats, cols.emb.shape[0]))
  return stats, (rows, cols, scale, bias, row_extra, col_extra, stats)


def _streamed_bwd(stats_fn, opts, block_size, residuals, cotangents):
  """Recompute each block's logits once and pull the cotangents of both directions'
  statistics back through them; the blocks' sums are taken against the final peaks, so
  their gradient is that of the rescaled, merged sums."""
  rows, cols, scale, bias, row_extra, col_extra, (row_stats, col_stats) = residuals
  ct_rows, ct_cols = cotangents
  row_peaks = _peaks(row_stats)
  inner = lambda ct, stats: sum(jnp.sum(c * v) for c, v in zip(jax.tree.leaves(ct),
                                                                 jax.tree.leaves(stats)))

  def surrogate(row_emb, block_emb, scale, bias, row_extra, block_extra, block, col_peaks,
                ct_block):
    row, col = _block_stats(stats_fn, opts, rows._replace(emb=row_emb),
                            block._replace(emb=block_emb), scale, bias, row_extra,
                            block_extra, row_peaks, col_peaks)
    return inner(ct_rows, row) + (0.0 if col is None else inner(ct_block, col))
  block_grad = jax.grad(surrogate, argnums=(0, 1, 2, 3, 4, 5))

  def step(acc, xs):
    block, block_extra, col_peaks, ct_block = xs
    d_rows, d_block, d_scale, d_bias, d_row_extra, d_block_extra = block_grad(
        rows.emb, block.emb, scale, bias, row_extra, block_extra, block, col_peaks, ct_block)
    return (jax.tree.map(jnp.add, acc, (d_rows, d_scale, d_bias, d_row_extra)),
            (d_block, d_block_extra))
  zeros = jax.tree.map(jnp.zeros_like, (rows.emb, scale, bias, row_extra))
  col_peaks = None if col_stats is None else _peaks(col_stats)
  xs = _blocked((cols, col_extra, col_peaks, ct_cols), block_size)
  (d_rows, d_scale, d_bias, d_row_extra), d_cols = jax.lax.scan(step, zeros, xs)
  d_cols, d_col_extra = _unblocked(d_cols, cols.emb.shape[0])
  no_grad = dict(ids=None, dom=None, index=None, valid=None, teacher=None)
  return (_Items(d_rows, **no_grad), _Items(d_cols, **no_grad), d_scale, d_bias,
          d_row_extra, d_col_extra)


_streamed.defvjp(_streamed_fwd, _streamed_bwd)


def _anchor_losses(opts, block_size, rows, cols, scale, bias, weight, axes=None):
  """[the rows' per-anchor losses] (+ [the columns'] when symmetric). Under shard_map
  (axes), rows are this device's and cols all of them; the columns' statistics are
  combined across devices, so every device has all of the columns' losses."""
  def run(stats_fn, row_extra=None, col_extra=None):
    row, col = _stats(stats_fn, opts, block_size, rows, cols, scale, bias, row_extra,
                      col_extra)
    return row, (col if col is None or axes is None else _combine(col, axes))

  if opts.kind == "mpnce":  # the log-sum-exp over negatives first, then the positives
    first = run(_mpnce_negatives)
    neg_lse = [None if f is None else _log_sum_exp(f["neg"]) for f in first]
    second = run(_mpnce_positives, *neg_lse)
    losses = [None if f is None else s["terms"] / jnp.maximum(f["n_pos"], 1.0)
              for f, s in zip(first, second)]
  elif opts.kind == "sigmoid":
    losses = [None if s is None else s["pairs"] for s in run(_sigmoid_stats)]
  else:
    losses = [None if s is None else _softmax_losses(s, opts, weight)
              for s in run(_softmax_stats)]
  return [loss for loss in losses if loss is not None]


def _valid_sums(losses, rows, cols):
  return [jnp.sum(jnp.where(items.valid, loss, 0.0)) for items, loss in zip((rows, cols),
                                                                           losses)]


def _summed_losses(opts, block_size, rows, cols, scale, bias, weight):
  return _valid_sums(_anchor_losses(opts, block_size, rows, cols, scale, bias, weight),
                     rows, cols)


def _sharded(opts, block_size, rows, cols, scale, bias, weight, mesh, batch_axes):
  """Each device: its rows against all columns, all-gathered. XLA merges identical
  gathers, so an array that several terms of one jitted objective use is gathered once;
  the gather's transpose reduce-scatters the columns' gradients to their devices."""
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  if rows.emb.shape[0] % shards or cols.emb.shape[0] % shards:
    raise ValueError(f"strategy='sharded' needs N and M divisible by the {shards} shards "
                     f"of axes {batch_axes}, got {rows.emb.shape[0]} and {cols.emb.shape[0]}")
  spec = PartitionSpec(batch_axes)
  if any(mesh.axis_types[mesh.axis_names.index(a)] == AxisType.Explicit for a in batch_axes):
    rows, cols = jax.tree.map(lambda v: jax.reshard(v, NamedSharding(mesh, spec)),
                              (rows, cols))

  def per_device(rows, cols, scale, bias, weight):
    gathered = jax.tree.map(lambda v: jax.lax.all_gather(v, batch_axes, tiled=True), cols)
    losses = _anchor_losses(opts, block_size, rows, gathered, scale, bias, weight,
                            batch_axes)
    if len(losses) == 2:  # each device sums its own columns' losses
      m = cols.emb.shape[0]
      losses[1] = jax.lax.dynamic_slice_in_dim(
          losses[1], jax.lax.axis_index(batch_axes) * m, m)
    return [jax.lax.psum(total, batch_axes) for total in _valid_sums(losses, rows, cols)]
  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(spec, spec, PartitionSpec(), PartitionSpec(),
                                 PartitionSpec()),
                       out_specs=PartitionSpec())(rows, cols, scale, bias, weight)
