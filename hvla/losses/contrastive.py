"""The one contrastive primitive every hvla objective is built on (METHODS.md §0).

Anchors x [N, D] meet candidates y [M, D] through the similarity

    s_ij = scale * (x_i . y_j - bias)        (scale = 1 / tau, bias = the offset b)

where scale and bias are scalars, or [R, C] tables indexed by the domains of the pair
(UniCLIP's domain-dependent similarity). Pair (i, j) is positive when the anchor's and
the candidate's group ids are equal (default ids: the diagonal), so no [N, M] mask is
ever an input. The loss of one direction is the mean over anchors of:

- 'softmax': cross-entropy of softmax(s_i) with a target distribution: (1 - alpha)
  spread uniformly over the anchor's positives and alpha uniformly over its negatives.
  With one positive among M candidates that is 1 - alpha and alpha / (M - 1): the
  softened targets of PyramidCLIP [recon] (unlike the usual label smoothing, which also
  gives alpha / M to the positive). Spreading over several positives is [ours].
- 'mpnce': UniCLIP's MP-NCE [recon]: -1/|P| sum_p log(e^s_ip / (e^s_ip + sum_neg e^s_in)),
  other positives kept out of the denominator.
- 'sigmoid': SigLIP [paper]: sum_j -log sigmoid(z_ij s_ij), z = +1 on positives and -1
  elsewhere, summed over candidates (then the mean over anchors).

`symmetric` averages the x->y and y->x directions (CLIP [paper]). The strategies compute
the same value and gradient: 'dense' materialises the [N, M] logits; 'chunked' streams
blocks of candidates with an online log-sum-exp and a custom VJP that recomputes them;
'sharded' runs under `jax.shard_map`, each device's anchors against all-gathered
candidates, so gradients flow back (reduce-scattered) to the device that produced them.
Logits are computed in float32 [ours].
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

KINDS = ('softmax', 'mpnce', 'sigmoid')
STRATEGIES = ('dense', 'chunked', 'sharded')
DEFAULT_BATCH_AXES = ('data', 'fsdp')
_FLOOR = float(jnp.finfo(jnp.float32).min)  # running max of an empty online log-sum-exp


class _Items(NamedTuple):
  """Embeddings and what the loss must know of each: group id (equal ids are positive
  pairs), domain (indexes per-domain-pair scale and bias) and position in the whole set
  (matches an anchor with itself for `exclude_self`; -1 marks block padding)."""
  emb: jax.Array  # float32 [K, D]
  ids: jax.Array  # int32 [K]
  dom: jax.Array  # int32 [K]
  index: jax.Array  # int32 [K]


class _Options(NamedTuple):
  kind: str
  label_smoothing: float
  exclude_self: bool


def contrastive_loss(x, y, *, scale, bias=0.0, kind='softmax', label_smoothing=0.0,
                     row_ids=None, col_ids=None, row_domains=None, col_domains=None,
                     exclude_self=False, symmetric=True, stop_grad_cols=False,
                     strategy='dense', block_size=None, mesh=None, batch_axes=None):
  """Contrastive loss of anchors x [N, D] against candidates y [M, D] (a scalar).

  Args:
    x, y: embeddings (normalised by the caller).
    scale, bias: s_ij = scale * (x_i . y_j - bias); scalars, or [R, C] tables indexed by
      (row_domains[i], col_domains[j]).
    kind: 'softmax', 'mpnce' or 'sigmoid' (see the module docstring).
    label_smoothing: alpha of the softened softmax targets.
    row_ids, col_ids: int [N], [M] group ids, positive pair iff equal; None: diagonal.
      An anchor without positives adds only its negatives' terms (sigmoid, smoothing).
    row_domains, col_domains: int [N], [M], needed when scale or bias is a table.
    exclude_self: x and y are the same N items; pair (i, i) is neither positive nor
      negative (UniCLIP's all-pairs setting).
    symmetric: mean of the x->y and y->x losses; otherwise x->y only.
    stop_grad_cols: the candidates of each direction carry no gradient (ViCHA [paper]).
    strategy: 'dense', 'chunked' or 'sharded'.
    block_size: candidates per block for 'chunked' (required) and, when set, within
      each device for 'sharded'; unused by 'dense'.
    mesh, batch_axes: for 'sharded', see `resolve_batch_mesh`.
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  scale, bias = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
  check_options(kind, label_smoothing, strategy, block_size)
  _check_args(x, y, scale, bias, row_ids, col_ids, row_domains, col_domains, exclude_self)
  rows = _items(x, row_ids, row_domains)
  cols = _items(y, col_ids, col_domains)
  opts = _Options(kind, float(label_smoothing), bool(exclude_self))
  local = functools.partial(_direction_sums, opts=opts, symmetric=symmetric,
                            stop_grad_cols=stop_grad_cols,
                            block_size=None if strategy == 'dense' else block_size)
  if strategy == 'sharded':
    sums = _sharded(local, rows, cols, scale, bias, *resolve_batch_mesh(mesh, batch_axes))
  else:
    sums = local(rows, cols, rows, cols, scale, bias)
  counts = (x.shape[0], y.shape[0])
  return sum(total / count for total, count in zip(sums, counts)) / len(sums)


def resolve_batch_mesh(mesh=None, batch_axes=None):
  """(mesh, batch axes) for the 'sharded' strategy.

  mesh defaults to the one activated with `jax.set_mesh` (read at trace time), batch
  axes to those of DEFAULT_BATCH_AXES that the mesh has.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError("strategy='sharded' needs a mesh: pass mesh= or activate one with "
                     'jax.set_mesh(mesh)')
  if batch_axes is None:
    batch_axes = tuple(a for a in DEFAULT_BATCH_AXES if a in mesh.axis_names)
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  unknown = [a for a in batch_axes if a not in mesh.axis_names]
  if unknown or not batch_axes:
    raise ValueError(f'batch axes {batch_axes} must be a non-empty subset of the mesh '
                     f'axes {mesh.axis_names}')
  return mesh, batch_axes


# ----------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------
def check_options(kind, label_smoothing=0.0, strategy='dense', block_size=None):
  """Raises ValueError for options no input could make valid; objectives call it when
  they are built, before anything is traced."""
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
  if strategy not in STRATEGIES:
    raise ValueError(f'strategy must be one of {STRATEGIES}, got {strategy!r}')
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
  if label_smoothing and kind != 'softmax':
    raise ValueError(f"label_smoothing applies to kind='softmax' only, not {kind!r}")
  if strategy == 'chunked' and block_size is None:
    raise ValueError("strategy='chunked' needs block_size")
  if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
    raise ValueError(f'block_size must be a positive int, got {block_size!r}')


def _check_args(x, y, scale, bias, row_ids, col_ids, row_domains, col_domains, exclude_self):
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f'x and y must be [N, D] and [M, D], got {x.shape} and {y.shape}')
  if x.shape[0] < 1 or y.shape[0] < 1 + exclude_self:
    raise ValueError(f'every anchor needs a candidate, got x {x.shape} and y {y.shape}')
  if exclude_self and x.shape[0] != y.shape[0]:
    raise ValueError(f'exclude_self needs x and y to be the same items, got {x.shape} '
                     f'and {y.shape}')
  if (row_ids is None) != (col_ids is None):
    raise ValueError('give both row_ids and col_ids, or neither (diagonal positives)')
  tables = [p.shape for p in (scale, bias) if p.ndim]
  if any(len(shape) != 2 for shape in tables):
    raise ValueError(f'scale and bias must be scalars or [R, C] tables, got {tables}')
  if bool(tables) != (row_domains is not None and col_domains is not None):
    raise ValueError('row_domains and col_domains are needed exactly when scale or bias '
                     'is a per-domain-pair table')
  for name, ids, n in (('row_ids', row_ids, x.shape[0]), ('col_ids', col_ids, y.shape[0]),
                       ('row_domains', row_domains, x.shape[0]),
                       ('col_domains', col_domains, y.shape[0])):
    if ids is not None and (jnp.shape(ids) != (n,) or
                            not jnp.issubdtype(jnp.result_type(ids), jnp.integer)):
      raise ValueError(f'{name} must be integers of shape ({n},), got '
                       f'{jnp.result_type(ids)} {jnp.shape(ids)}')


def _items(emb, ids, domains):
  position = jnp.arange(emb.shape[0], dtype=jnp.int32)
  return _Items(emb,
                position if ids is None else jnp.asarray(ids, jnp.int32),
                jnp.zeros_like(position) if domains is None else jnp.asarray(domains, jnp.int32),
                position)


# ----------------------------------------------------------------------------------------
# One block of logits, and what each kind sums over a block.
# ----------------------------------------------------------------------------------------
def _per_pair(param, a, c):
  return param if param.ndim == 0 else param[a.dom[:, None], c.dom[None, :]]


def _scores(a, c, scale, bias, opts):
  """Logits [n, b] of anchors a against candidates c, and their positive and negative
  masks (padding and, with exclude_self, the anchor itself are in neither)."""
  s = _per_pair(scale, a, c) * (a.emb @ c.emb.T - _per_pair(bias, a, c))
  keep = jnp.broadcast_to(c.index[None, :] >= 0, s.shape)
  if opts.exclude_self:
    keep &= a.index[:, None] != c.index[None, :]
  pos = keep & (a.ids[:, None] == c.ids[None, :])
  return s, pos, keep & ~pos


def _masked_sum(values, mask):
  return jnp.sum(jnp.where(mask, values, 0.0), axis=1)


def _masked_exp(s, mask, ref):
  """exp(s - ref) where mask, else exactly 0, also in the gradient (masked entries of
  s - ref may overflow)."""
  return jnp.exp(jnp.where(mask, s - ref[:, None], -jnp.inf))


def _lse_add(acc, s, mask):
  """Online log-sum-exp: fold a block into acc = (running max, sum of exp(s - max))."""
  peak, total = acc
  new_peak = jax.lax.stop_gradient(
      jnp.maximum(peak, jnp.max(jnp.where(mask, s, _FLOOR), axis=1)))
  return new_peak, total * jnp.exp(peak - new_peak) + jnp.sum(_masked_exp(s, mask, new_peak), 1)


def _lse_init(zeros):
  return zeros + _FLOOR, zeros


def _lse_value(acc):
  """The log-sum-exp; _FLOOR for an empty set rather than -inf, whose gradient is NaN
  (a non-empty total is >= 1: its largest term is exp(0))."""
  peak, total = acc
  return peak + jnp.log(jnp.maximum(total, 1.0))


def _sigmoid_pairs(s, pos, neg):
  return _masked_sum(jax.nn.softplus(-s), pos) + _masked_sum(jax.nn.softplus(s), neg)


def _target_weights(stats, alpha):
  """Softmax target mass of each positive and of each negative, per anchor."""
  return ((1.0 - alpha) / jnp.maximum(stats['n_pos'], 1.0),
          alpha / jnp.maximum(stats['n_neg'], 1.0))


# ----------------------------------------------------------------------------------------
# Per-anchor statistics (streamed over candidate blocks), losses and gradients.
# ----------------------------------------------------------------------------------------
def _anchor_stats(a, fold, scores, opts):
  """Per-anchor sums over all candidates, enough to give each anchor's loss.

  fold(step, init) runs step(acc, candidate_block) over the candidate blocks;
  scores(candidate_block) gives the block's logits and masks.
  """
  zeros = jnp.zeros_like(a.ids, jnp.float32)  # under shard_map, varying like the anchors
  if opts.kind == 'sigmoid':
    return fold(lambda acc, c: {'pairs': acc['pairs'] + _sigmoid_pairs(*scores(c))},
                {'pairs': zeros})

  if opts.kind == 'softmax':
    def softmax_step(acc, c):
      s, pos, neg = scores(c)
      return {'lse': _lse_add(acc['lse'], s, pos | neg),
              'n_pos': acc['n_pos'] + pos.sum(1), 'n_neg': acc['n_neg'] + neg.sum(1),
              's_pos': acc['s_pos'] + _masked_sum(s, pos),
              's_neg': acc['s_neg'] + _masked_sum(s, neg)}
    stats = fold(softmax_step, {'lse': _lse_init(zeros), 'n_pos': zeros, 'n_neg': zeros,
                                's_pos': zeros, 's_neg': zeros})
    return {**stats, 'lse': _lse_value(stats['lse'])}

  # mpnce: the log-sum-exp over negatives first, then one term per positive.
  def negatives_step(acc, c):
    s, pos, neg = scores(c)
    return {'neg_lse': _lse_add(acc['neg_lse'], s, neg), 'n_pos': acc['n_pos'] + pos.sum(1)}
  first = fold(negatives_step, {'neg_lse': _lse_init(zeros), 'n_pos': zeros})
  neg_lse = _lse_value(first['neg_lse'])

  def positives_step(acc, c):
    s, pos, _ = scores(c)
    gap = neg_lse[:, None] - s  # -log(e^s_ip / (e^s_ip + e^neg_lse)) = softplus(gap)
    return {'terms': acc['terms'] + _masked_sum(jax.nn.softplus(gap), pos),
            'd_neg_lse': acc['d_neg_lse'] + _masked_sum(jax.nn.sigmoid(gap), pos)}
  second = fold(positives_step, {'terms': zeros, 'd_neg_lse': zeros})
  return {'n_pos': first['n_pos'], 'neg_lse': neg_lse, **second}


def _anchor_losses(stats, opts):
  if opts.kind == 'sigmoid':
    return stats['pairs']
  if opts.kind == 'mpnce':
    return stats['terms'] / jnp.maximum(stats['n_pos'], 1.0)
  t_pos, t_neg = _target_weights(stats, opts.label_smoothing)
  lse = stats['lse']
  return (t_pos * (stats['n_pos'] * lse - stats['s_pos']) +
          t_neg * (stats['n_neg'] * lse - stats['s_neg']))


def _surrogate(s, pos, neg, stats, opts):
  """A function of one block's logits whose gradient, with the per-anchor statistics
  held fixed, is that block's share of the gradient of the summed anchor losses."""
  if opts.kind == 'sigmoid':
    return jnp.sum(_sigmoid_pairs(s, pos, neg))
  if opts.kind == 'mpnce':
    # d/ds_ip = (sigmoid(s_ip - neg_lse) - 1) / |P|, d/ds_in = d_neg_lse * softmax_neg(s)_n / |P|
    # where d_neg_lse = sum_p sigmoid(neg_lse - s_ip), the terms' derivative wrt neg_lse.
    per_pos = 1.0 / jnp.maximum(stats['n_pos'], 1.0)
    neg_lse = stats['neg_lse']
    return jnp.sum(per_pos * _masked_sum(jax.nn.softplus(neg_lse[:, None] - s), pos) +
                   per_pos * stats['d_neg_lse'] * jnp.sum(_masked_exp(s, neg, neg_lse), 1))
  # softmax: d/ds_ij = (target mass) * softmax(s_i)_j - t_ij.
  t_pos, t_neg = _target_weights(stats, opts.label_smoothing)
  mass = t_pos * stats['n_pos'] + t_neg * stats['n_neg']
  return jnp.sum(mass * jnp.sum(_masked_exp(s, pos | neg, stats['lse']), 1) -
                 t_pos * _masked_sum(s, pos) - t_neg * _masked_sum(s, neg))


# ----------------------------------------------------------------------------------------
# Strategies: the summed anchor losses of one direction.
# ----------------------------------------------------------------------------------------
def _dense_sum(a, c, scale, bias, opts):
  scores = lambda block: _scores(a, block, scale, bias, opts)
  return jnp.sum(_anchor_losses(_anchor_stats(a, lambda step, acc: step(acc, c), scores,
                                              opts), opts))


def _blocks(c, block_size):
  """Candidates as [num_blocks, block_size, ...], the last block padded (index -1)."""
  pad = -c.emb.shape[0] % block_size
  padded = _Items(*(jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1),
                            constant_values=-1 if name == 'index' else 0)
                    for name, v in zip(_Items._fields, c)))
  return jax.tree.map(lambda v: v.reshape(-1, block_size, *v.shape[1:]), padded)


def _scan(blocks):
  return lambda step, acc: jax.lax.scan(lambda a, c: (step(a, c), None), acc, blocks)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_sum(opts, block_size, a, c, scale, bias):
  return _chunked_fwd(opts, block_size, a, c, scale, bias)[0]


def _chunked_fwd(opts, block_size, a, c, scale, bias):
  stats = _anchor_stats(a, _scan(_blocks(c, block_size)),
                        lambda b: _scores(a, b, scale, bias, opts), opts)
  return jnp.sum(_anchor_losses(stats, opts)), (a, c, scale, bias, stats)


def _chunked_bwd(opts, block_size, residuals, g):
  """Recompute each block's logits and pull the gradient back through them."""
  a, c, scale, bias, stats = residuals

  def block_surrogate(a_emb, block_emb, scale, bias, block):
    s, pos, neg = _scores(a._replace(emb=a_emb), block._replace(emb=block_emb), scale,
                          bias, opts)
    return g * _surrogate(s, pos, neg, stats, opts)
  block_grad = jax.grad(block_surrogate, argnums=(0, 1, 2, 3))

  def step(acc, block):
    d_a, d_block, d_scale, d_bias = block_grad(a.emb, block.emb, scale, bias, block)
    return jax.tree.map(jnp.add, acc, (d_a, d_scale, d_bias)), d_block
  zeros = jax.tree.map(jnp.zeros_like, (a.emb, scale, bias))
  (d_a, d_scale, d_bias), d_c = jax.lax.scan(step, zeros, _blocks(c, block_size))
  d_c = d_c.reshape(-1, d_c.shape[-1])[:c.emb.shape[0]]
  no_grad = dict(ids=None, dom=None, index=None)
  return _Items(d_a, **no_grad), _Items(d_c, **no_grad), d_scale, d_bias


_chunked_sum.defvjp(_chunked_fwd, _chunked_bwd)


def _direction_sums(row_anchors, col_anchors, rows, cols, scale, bias, *, opts, symmetric,
                    stop_grad_cols, block_size):
  """Summed anchor losses x->y (and y->x): anchors against all candidates."""
  def one_direction(anchors, candidates, scale, bias):
    if block_size is None:
      return _dense_sum(anchors, candidates, scale, bias, opts)
    return _chunked_sum(opts, block_size, anchors, candidates, scale, bias)

  def fixed(items):
    return items._replace(emb=jax.lax.stop_gradient(items.emb)) if stop_grad_cols else items
  sums = [one_direction(row_anchors, fixed(cols), scale, bias)]
  if symmetric:
    sums.append(one_direction(col_anchors, fixed(rows), scale.T, bias.T))
  return sums


def _sharded(local, rows, cols, scale, bias, mesh, batch_axes):
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  if rows.emb.shape[0] % shards or cols.emb.shape[0] % shards:
    raise ValueError(f"strategy='sharded' needs N and M divisible by the {shards} shards "
                     f'of axes {batch_axes}, got {rows.emb.shape[0]} and {cols.emb.shape[0]}')
  spec = PartitionSpec(batch_axes)
  if any(mesh.axis_types[mesh.axis_names.index(a)] == AxisType.Explicit for a in batch_axes):
    rows, cols = jax.tree.map(lambda v: jax.reshard(v, NamedSharding(mesh, spec)),
                              (rows, cols))

  def per_device(row_anchors, col_anchors, scale, bias):
    gather = lambda items: jax.tree.map(
        lambda v: jax.lax.all_gather(v, batch_axes, tiled=True), items)
    sums = local(row_anchors, col_anchors, gather(row_anchors), gather(col_anchors),
                 scale, bias)
    return [jax.lax.psum(total, batch_axes) for total in sums]
  return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, PartitionSpec(),
                                                        PartitionSpec()),
                       out_specs=PartitionSpec())(rows, cols, scale, bias)
