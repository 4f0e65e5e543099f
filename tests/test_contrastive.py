"""The contrastive primitive against a naive NumPy reference, and its strategies against
each other on the 8 fake CPU devices."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

from hvla.losses.contrastive import Teacher, contrastive_loss, resolve_batch_mesh


# ----------------------------------------------------------------------------------------
# Naive reference: loops over anchors, float64, gradients by central differences.
# ----------------------------------------------------------------------------------------
def log_sum_exp(v):
  return v.max() + np.log(np.exp(v - v.max()).sum())


def reference_direction(a, c, a_ids, c_ids, a_dom, c_dom, scale, bias, kind, alpha,
                        exclude_self, a_valid=None, c_valid=None, teacher=None,
                        domain_mask=None):
  """Mean over valid anchors; an anchor without candidates adds 0. teacher: (teacher
  anchors, teacher candidates, teacher scale, weight) or None."""
  a_valid = np.ones(len(a), bool) if a_valid is None else a_valid
  c_valid = np.ones(len(c), bool) if c_valid is None else c_valid
  losses = []
  for i in np.flatnonzero(a_valid):
    js = [j for j in range(len(c)) if c_valid[j] and not (exclude_self and i == j)
          and (domain_mask is None or domain_mask[a_dom[i], c_dom[j]])]
    if not js:
      losses.append(0.0)
      continue
    logits = np.array([scale[a_dom[i], c_dom[j]] * (a[i] @ c[j] - bias[a_dom[i], c_dom[j]])
                       for j in js])
    positive = np.array([a_ids[i] == c_ids[j] for j in js])
    if kind == 'softmax':
      targets = np.where(positive, (1 - alpha) / max(positive.sum(), 1),
                         alpha / max((~positive).sum(), 1))
      if teacher is not None:
        t_a, t_c, t_scale, weight = teacher
        t = np.array([t_scale * t_a[i] @ t_c[j] for j in js])
        targets = weight * np.exp(t - log_sum_exp(t)) + (1 - weight) * targets
      losses.append(-(targets * (logits - log_sum_exp(logits))).sum())
    elif kind == 'mpnce':
      negatives = logits[~positive]
      neg_lse = log_sum_exp(negatives) if len(negatives) else -np.inf
      losses.append(np.mean([np.logaddexp(p, neg_lse) - p for p in logits[positive]])
                    if positive.any() else 0.0)
    else:
      z = np.where(positive, 1.0, -1.0)
      losses.append(np.sum(np.logaddexp(0.0, -z * logits)))
  return np.sum(losses) / max(len(losses), 1)


def reference_loss(x, y, scale, bias, *, kind='softmax', label_smoothing=0.0, row_ids=None,
                   col_ids=None, row_domains=None, col_domains=None, exclude_self=False,
                   symmetric=True, row_valid=None, col_valid=None, teacher=None,
                   domain_mask=None):
  n, m = len(x), len(y)
  row_ids = np.arange(n) if row_ids is None else row_ids
  col_ids = np.arange(m) if col_ids is None else col_ids
  row_dom = np.zeros(n, int) if row_domains is None else row_domains
  col_dom = np.zeros(m, int) if col_domains is None else col_domains
  scale, bias = (np.broadcast_to(p, (1, 1)) if np.ndim(p) == 0 else p for p in (scale, bias))
  forward = backward = None
  if teacher is not None:
    forward = (teacher.x, teacher.y, teacher.scale, teacher.weight)
    backward = (teacher.y, teacher.x, teacher.scale, teacher.weight)
  mask = None if domain_mask is None else np.asarray(domain_mask)
  directions = [(x, y, row_ids, col_ids, row_dom, col_dom, scale, bias, row_valid,
                 col_valid, forward, mask)]
  if symmetric:
    directions.append((y, x, col_ids, row_ids, col_dom, row_dom, scale.T, bias.T, col_valid,
                       row_valid, backward, None if mask is None else mask.T))
  return np.mean([reference_direction(*d[:8], kind, label_smoothing, exclude_self, *d[8:])
                  for d in directions])


def numeric_grads(f, args, eps=1e-6):
  """Central differences of f with respect to each array of args."""
  args = [np.array(a, np.float64) for a in args]
  grads = []
  for k, arg in enumerate(args):
    grad = np.zeros_like(arg)
    for idx in np.ndindex(arg.shape):
      shifted = []
      for sign in (1, -1):
        moved = [a.copy() for a in args]
        moved[k][idx] += sign * eps
        shifted.append(f(*moved))
      grad[idx] = (shifted[0] - shifted[1]) / (2 * eps)
    grads.append(grad)
  return grads


def embeddings(n, d, seed):
  e = np.random.default_rng(seed).normal(size=(n, d))
  return e / np.linalg.norm(e, axis=1, keepdims=True)


# Each case: shapes (N, M), scale, bias, options. `same`: y is x (exclude_self).
TABLE_SCALE = np.array([[4.0, 3.0], [2.5, 5.0]])
TABLE_BIAS = np.array([[0.1, -0.2], [0.3, 0.05]])
REFERENCE_CASES = {
    'softmax': dict(n=5, m=5, scale=3.0, bias=0.0, opts={}),
    'softmax_one_way_more_candidates': dict(n=4, m=6, scale=3.0, bias=0.0,
                                            opts=dict(symmetric=False)),
    'smoothing': dict(n=5, m=5, scale=3.0, bias=0.0, opts=dict(label_smoothing=0.2)),
    'multi_positive_smoothing': dict(
        n=5, m=5, scale=3.0, bias=0.0,
        opts=dict(label_smoothing=0.1, row_ids=np.array([0, 0, 1, 2, 2]),
                  col_ids=np.array([0, 1, 1, 2, 0]))),
    'softmax_domain_tables': dict(
        n=4, m=4, scale=TABLE_SCALE, bias=TABLE_BIAS,
        opts=dict(row_domains=np.array([0, 1, 0, 1]), col_domains=np.array([1, 1, 0, 0]))),
    'mpnce_all_pairs_domain_tables': dict(
        n=6, m=6, same=True, scale=TABLE_SCALE, bias=TABLE_BIAS,
        opts=dict(kind='mpnce', exclude_self=True, row_ids=np.array([0, 1, 0, 1, 0, 1]),
                  col_ids=np.array([0, 1, 0, 1, 0, 1]), row_domains=np.array([0, 0, 0, 0, 1, 1]),
                  col_domains=np.array([0, 0, 0, 0, 1, 1]))),
    'mpnce_all_pairs_domain_mask': dict(
        n=6, m=6, same=True, scale=TABLE_SCALE, bias=TABLE_BIAS,
        opts=dict(kind='mpnce', exclude_self=True, row_ids=np.array([0, 1, 0, 1, 0, 1]),
                  col_ids=np.array([0, 1, 0, 1, 0, 1]), row_domains=np.array([0, 0, 0, 0, 1, 1]),
                  col_domains=np.array([0, 0, 0, 0, 1, 1]),
                  domain_mask=np.array([[False, True], [True, True]]))),
    'softmax_domain_mask_one_sided': dict(
        n=4, m=4, scale=TABLE_SCALE, bias=TABLE_BIAS,
        opts=dict(row_domains=np.array([0, 1, 0, 1]), col_domains=np.array([1, 1, 0, 0]),
                  domain_mask=np.array([[True, True], [False, True]]))),
    'mpnce_one_way': dict(
        n=4, m=6, scale=3.0, bias=0.2,
        opts=dict(kind='mpnce', symmetric=False, row_ids=np.array([0, 1, 2, 3]),
                  col_ids=np.array([0, 1, 2, 3, 0, 1]))),
    'sigmoid': dict(n=5, m=5, scale=4.0, bias=0.4, opts=dict(kind='sigmoid', symmetric=False)),
    'sigmoid_symmetric_multi_positive_tables': dict(
        n=4, m=5, scale=TABLE_SCALE, bias=TABLE_BIAS,
        opts=dict(kind='sigmoid', row_ids=np.array([0, 1, 1, 2]),
                  col_ids=np.array([0, 1, 2, 2, 3]), row_domains=np.array([0, 1, 0, 1]),
                  col_domains=np.array([1, 0, 0, 1, 1]))),
}


@pytest.mark.parametrize('name', sorted(REFERENCE_CASES))
def test_matches_numpy_reference(name):
  case = REFERENCE_CASES[name]
  x, y = embeddings(case['n'], 4, seed=0), embeddings(case['m'], 4, seed=1)
  scale, bias, opts = np.asarray(case['scale']), np.asarray(case['bias']), case['opts']
  if case.get('same'):
    loss = lambda x, s, b: contrastive_loss(x, x, scale=s, bias=b, **opts)
    reference = lambda x, s, b: reference_loss(x, x, s, b, **opts)
    args = (x, scale, bias)
  else:
    loss = lambda x, y, s, b: contrastive_loss(x, y, scale=s, bias=b, **opts)
    reference = lambda x, y, s, b: reference_loss(x, y, s, b, **opts)
    args = (x, y, scale, bias)
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(
      *(jnp.asarray(a, jnp.float32) for a in args))
  np.testing.assert_allclose(value, reference(*args), rtol=1e-5)
  for got, want in zip(grads, numeric_grads(reference, args)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_stop_grad_cols_matches_reference():
  """Each direction's gradient reaches only its anchors."""
  x, y = embeddings(5, 4, seed=2), embeddings(5, 4, seed=3)
  loss = lambda x, y: contrastive_loss(x, y, scale=3.0, stop_grad_cols=True)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x, jnp.float32),
                                                   jnp.asarray(y, jnp.float32))
  one_way = functools.partial(reference_loss, scale=3.0, bias=0.0, symmetric=False)
  want_x, = numeric_grads(lambda x: one_way(x, y) / 2, [x])
  want_y, = numeric_grads(lambda y: one_way(y, x) / 2, [y])
  np.testing.assert_allclose(grads[0], want_x, rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(grads[1], want_y, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize('alpha', [0.0, 0.3])
def test_smoothing_matches_optax_targets(alpha):
  """alpha = 0 is plain CLIP InfoNCE; alpha > 0 puts alpha / (N - 1) on each negative."""
  n = 6
  x, y = embeddings(n, 4, seed=4), embeddings(n, 4, seed=5)
  logits = 5.0 * x @ y.T
  targets = np.where(np.eye(n), 1 - alpha, alpha / (n - 1))
  want = (optax.softmax_cross_entropy(logits, targets).mean() +
          optax.softmax_cross_entropy(logits.T, targets).mean()) / 2
  loss = jax.jit(functools.partial(contrastive_loss, scale=5.0, label_smoothing=alpha))
  np.testing.assert_allclose(loss(x, y), want, rtol=1e-5)
  if alpha == 0.0:
    labels = np.arange(n)
    plain = (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() +
             optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2
    np.testing.assert_allclose(loss(x, y), plain, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Strategies agree with 'dense': value and gradient wrt x, y, scale and bias.
# ----------------------------------------------------------------------------------------
N = 24
IDS = np.random.default_rng(6).integers(0, 5, N)
STRATEGY_CASES = {
    'softmax': dict(scale=5.0, bias=0.0, opts={}),
    'multi_positive_smoothing': dict(scale=5.0, bias=0.0,
                                     opts=dict(label_smoothing=0.2, row_ids=IDS, col_ids=IDS)),
    'mpnce_all_pairs_domain_tables': dict(
        same=True, scale=TABLE_SCALE, bias=TABLE_BIAS,
        opts=dict(kind='mpnce', exclude_self=True, row_ids=IDS, col_ids=IDS,
                  row_domains=np.arange(N) % 2, col_domains=np.arange(N) % 2)),
    'mpnce_domain_mask': dict(
        same=True, scale=TABLE_SCALE, bias=TABLE_BIAS,
        # UniCLIP's layout: (view, view, caption) of each example in turn
        opts=dict(kind='mpnce', exclude_self=True, symmetric=False,
                  row_ids=np.arange(N) // 3, col_ids=np.arange(N) // 3,
                  row_domains=np.arange(N) % 3 // 2, col_domains=np.arange(N) % 3 // 2,
                  domain_mask=np.array([[False, True], [True, True]]))),
    'sigmoid_one_way': dict(scale=8.0, bias=0.3, opts=dict(kind='sigmoid', symmetric=False,
                                                           row_ids=IDS, col_ids=IDS)),
    'softmax_stop_grad_cols': dict(scale=5.0, bias=0.0, opts=dict(stop_grad_cols=True)),
}


def value_and_grads(case, x, y, **strategy):
  opts = {**case['opts'], **strategy}
  def loss(x, y, scale, bias):
    return contrastive_loss(x, x if case.get('same') else y, scale=scale, bias=bias, **opts)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
      x, y, jnp.asarray(case['scale'], jnp.float32), jnp.asarray(case['bias'], jnp.float32))


def assert_trees_close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('name', sorted(STRATEGY_CASES))
def test_strategies_agree_with_dense(name):
  case = STRATEGY_CASES[name]
  x = jnp.asarray(embeddings(N, 8, seed=7), jnp.float32)
  y = jnp.asarray(embeddings(N, 8, seed=8), jnp.float32)
  mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(AxisType.Auto,) * 2)
  dense = value_and_grads(case, x, y)
  assert_trees_close(value_and_grads(case, x, y, strategy='chunked', block_size=7), dense)
  assert_trees_close(value_and_grads(case, x, y, strategy='sharded', mesh=mesh), dense)
  assert_trees_close(value_and_grads(case, x, y, strategy='sharded', mesh=mesh, block_size=5),
                     dense)


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit])
def test_sharded_reads_the_context_mesh(axis_type):
  """Under jax.set_mesh the mesh and its 'data'/'fsdp' axes are found at trace time; the
  'model' axis is left out of the batch."""
  x = jnp.asarray(embeddings(N, 8, seed=9), jnp.float32)
  y = jnp.asarray(embeddings(N, 8, seed=10), jnp.float32)
  case = STRATEGY_CASES['softmax']
  dense = value_and_grads(case, x, y)
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'model'), axis_types=(axis_type,) * 3)
  with jax.set_mesh(mesh):
    assert resolve_batch_mesh()[1] == ('data', 'fsdp')
    assert_trees_close(value_and_grads(case, x, y, strategy='sharded'), dense)


def largest_intermediate(jaxpr):
  """Size of the largest array any equation (at any nesting depth) produces."""
  sizes = [0]
  for eqn in jaxpr.eqns:
    sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          sizes.append(largest_intermediate(sub))
  return max(sizes)


@pytest.mark.parametrize('kind', ['softmax', 'mpnce', 'sigmoid'])
def test_chunked_never_builds_the_full_logits(kind):
  n, m, d, block = 48, 80, 8, 16
  x, y = jnp.ones((n, d)), jnp.ones((m, d))
  def size(**strategy):
    loss = lambda x, y, s: contrastive_loss(x, y, scale=s, kind=kind, **strategy)
    return largest_intermediate(
        jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, y, 2.0).jaxpr)
  assert size() >= n * m  # the check sees the dense logits
  assert size(strategy='chunked', block_size=block) <= max(n, m) * block


# ----------------------------------------------------------------------------------------
# Every strategy against the reference: saturated softmax, validity masks, teacher
# targets, bfloat16 inputs, blocks that do not divide N or M.
# ----------------------------------------------------------------------------------------
MESH = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(AxisType.Auto,) * 2)
EVERY_STRATEGY = {'dense': {}, 'chunked': dict(strategy='chunked', block_size=3),
                  'sharded': dict(strategy='sharded', mesh=MESH),
                  'sharded_blocks': dict(strategy='sharded', mesh=MESH, block_size=3)}


def jitted_value_and_grads(**opts):
  """f(x, y, scale) -> (loss, (d_x, d_y, d_scale)), jitted."""
  loss = lambda x, y, s: contrastive_loss(x, y, scale=s, **opts)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def reference_value_and_grads(x, y, scale, **opts):
  f = lambda x, y, s: reference_loss(x, y, s, 0.0, **opts)
  return f(x, y, scale), numeric_grads(f, [x, y, np.float64(scale)])


def assert_matches(got, want, tol, name=''):
  (value, grads), (want_value, want_grads) = got, want
  np.testing.assert_allclose(value, want_value, rtol=tol, atol=tol, err_msg=name)
  for g, w, arg in zip(grads, want_grads, 'xys'):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=tol, atol=tol,
                               err_msg=f'{name} d_{arg}')


def separated_pairs(layout):
  """8 pairs whose positives are far ahead of their negatives (x_i = e_i): y_j = e_j
  (orthogonal), or 0.8 e_j + 0.6 e_(j-1), so that anchor j-1 has one hard negative far
  ahead of the other negatives."""
  eye = np.eye(8, 16)
  return eye, eye if layout == 'orthogonal' else 0.8 * eye + 0.6 * np.roll(eye, 1, axis=0)


KIND_OPTIONS = {'softmax': {}, 'smoothing': dict(label_smoothing=0.2),
                'mpnce': dict(kind='mpnce'), 'sigmoid': dict(kind='sigmoid')}


@pytest.mark.parametrize('layout', ['orthogonal', 'hard_negative'])
@pytest.mark.parametrize('kind', sorted(KIND_OPTIONS))
def test_saturated_softmax_matches_reference(kind, layout):
  """At scale 20..100 every term but the largest underflows: the log-sum-exp must still
  give the whole gradient to the terms that are left."""
  x, y = separated_pairs(layout)
  fns = {name: jitted_value_and_grads(**KIND_OPTIONS[kind], **strategy)
         for name, strategy in EVERY_STRATEGY.items()}
  for scale in (20.0, 50.0, 100.0):
    want = reference_value_and_grads(x, y, scale, **KIND_OPTIONS[kind])
    for name, f in fns.items():
      got = f(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.float32(scale))
      assert_matches(got, want, 1e-4, f'{name} at scale {scale}')


def test_saturated_gradient_of_the_scale_is_zero():
  """The measured failure: 8 orthogonal pairs at scale 20 gave d loss / d scale = -0.5."""
  x = jnp.eye(8, 16)
  for name, strategy in EVERY_STRATEGY.items():
    grad = jax.grad(lambda s: contrastive_loss(x, x, scale=s, **strategy))(20.0)
    assert abs(float(grad)) < 1e-6, name


ROW_IDS = np.array([0, 1, 1, 2, 3, 3, 4, 5])
COL_IDS = np.array([0, 1, 2, 2, 3, 4, 5, 5, 6, 0, 1, 7, 3, 8, 9, 4])
MASK_CASES = {
    'random_masks': dict(row_ids=ROW_IDS, col_ids=COL_IDS,
                         row_valid=np.array([1, 1, 0, 1, 1, 0, 1, 1], bool),
                         col_valid=np.random.default_rng(12).random(16) < 0.6),
    'no_valid_rows': dict(row_ids=ROW_IDS, col_ids=COL_IDS, row_valid=np.zeros(8, bool)),
    'no_valid_cols': dict(row_ids=ROW_IDS, col_ids=COL_IDS, col_valid=np.zeros(16, bool)),
    # row 0's one valid candidate is itself; column 0 sees rows 1 (positive) and 2
    'anchor_without_candidates': dict(
        m=8, exclude_self=True, row_ids=ROW_IDS, col_ids=np.array([0, 0, 1, 2, 3, 3, 4, 5]),
        row_valid=np.arange(8) < 3, col_valid=np.arange(8) < 1),
}
MASK_KINDS = {'softmax': dict(label_smoothing=0.1), 'mpnce': dict(kind='mpnce'),
              'sigmoid': dict(kind='sigmoid')}


@pytest.mark.parametrize('kind', sorted(MASK_KINDS))
@pytest.mark.parametrize('name', sorted(MASK_CASES))
def test_validity_masks_match_reference(name, kind):
  opts = {**MASK_CASES[name], **MASK_KINDS[kind]}
  x, y = embeddings(8, 4, seed=13), embeddings(opts.pop('m', 16), 4, seed=14)
  want = reference_value_and_grads(x, y, 4.0, **opts)
  for strategy, extra in EVERY_STRATEGY.items():
    got = jitted_value_and_grads(**opts, **extra)(jnp.asarray(x, jnp.float32),
                                                  jnp.asarray(y, jnp.float32), 4.0)
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(got)), strategy
    assert_matches(got, want, 2e-5, strategy)


TEACHER_CASES = {
    'plain': dict(m=16, opts={}),
    'smoothing_multi_positive_masks': dict(
        m=16, opts=dict(label_smoothing=0.1, row_ids=ROW_IDS, col_ids=COL_IDS,
                        row_valid=MASK_CASES['random_masks']['row_valid'],
                        col_valid=MASK_CASES['random_masks']['col_valid'])),
    'exclude_self_one_way': dict(m=8, opts=dict(exclude_self=True, symmetric=False,
                                                row_ids=ROW_IDS, col_ids=ROW_IDS)),
}


def teacher_value_and_grads(teacher, **opts):
  """Like jitted_value_and_grads, the teacher's weight a traced argument (it is ramped in
  training)."""
  def loss(x, y, s, weight):
    return contrastive_loss(x, y, scale=s, teacher=teacher._replace(weight=weight), **opts)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize('name', sorted(TEACHER_CASES))
def test_teacher_targets_match_reference(name):
  case = TEACHER_CASES[name]
  x, y = embeddings(8, 4, seed=15), embeddings(case['m'], 4, seed=16)
  teacher = Teacher(x=embeddings(8, 6, seed=17), y=embeddings(case['m'], 6, seed=18),
                    scale=7.0, weight=0.4)
  want = reference_value_and_grads(x, y, 4.0, teacher=teacher, **case['opts'])
  for strategy, extra in EVERY_STRATEGY.items():
    f = teacher_value_and_grads(teacher, **case['opts'], **extra)
    got = f(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), 4.0, 0.4)
    assert_matches(got, want, 2e-5, strategy)


def test_teacher_weight_zero_is_no_teacher_and_one_on_itself_has_no_gradient():
  """a = 0: the hard targets. a = 1 with the student as its own teacher: the targets are
  the (fixed) predictions, so the loss is their entropy and its gradient is 0."""
  x = jnp.asarray(embeddings(8, 4, seed=19), jnp.float32)
  y = jnp.asarray(embeddings(16, 4, seed=20), jnp.float32)
  for strategy, extra in EVERY_STRATEGY.items():
    plain = jitted_value_and_grads(label_smoothing=0.1, **extra)(x, y, 4.0)
    f = teacher_value_and_grads(Teacher(x, y, 4.0, 0.0), label_smoothing=0.1, **extra)
    assert_trees_close(f(x, y, 4.0, 0.0), plain)
    value, grads = f(x, y, 4.0, 1.0)
    logits = 4.0 * np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    entropy = lambda z: -np.sum(np.exp(z) * z, 1).mean()
    log_p = lambda z: z - np.log(np.exp(z).sum(1, keepdims=True))
    np.testing.assert_allclose(value, (entropy(log_p(logits)) + entropy(log_p(logits.T))) / 2,
                               rtol=1e-5, err_msg=strategy)
    for g in grads:
      np.testing.assert_allclose(g, 0.0, atol=1e-6, err_msg=strategy)


def test_bfloat16_inputs_match_reference():
  x, y = embeddings(8, 4, seed=21), embeddings(16, 4, seed=22)
  x16, y16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
  opts = dict(label_smoothing=0.1, row_ids=ROW_IDS, col_ids=COL_IDS)
  want = reference_value_and_grads(np.asarray(x16, np.float64), np.asarray(y16, np.float64),
                                   4.0, **opts)
  for strategy, extra in EVERY_STRATEGY.items():
    value, grads = jitted_value_and_grads(**opts, **extra)(x16, y16, 4.0)
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16, strategy
    np.testing.assert_allclose(value, want[0], rtol=1e-5, err_msg=strategy)
    for g, w in zip(grads, want[1]):  # the gradients are rounded to bfloat16
      np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-2, atol=1e-3,
                                 err_msg=strategy)


# ----------------------------------------------------------------------------------------
# The symmetric loss in one pass over the logits.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('kind', sorted(MASK_KINDS))
def test_symmetric_equals_two_one_way_calls_with_domain_tables(kind):
  """The y->x direction of the fused pass is the one-way loss of y against x with the
  transposed tables."""
  x = jnp.asarray(embeddings(8, 4, seed=23), jnp.float32)
  y = jnp.asarray(embeddings(16, 4, seed=24), jnp.float32)
  x_dom, y_dom = np.arange(8) % 2, np.arange(16) // 8
  valid = MASK_CASES['random_masks']
  one_way = dict(symmetric=False, **MASK_KINDS[kind])
  scale, bias = jnp.asarray(TABLE_SCALE, jnp.float32), jnp.asarray(TABLE_BIAS, jnp.float32)
  for strategy, extra in EVERY_STRATEGY.items():
    def fused(x, y, scale, bias):
      return contrastive_loss(x, y, scale=scale, bias=bias, row_ids=ROW_IDS, col_ids=COL_IDS,
                              row_domains=x_dom, col_domains=y_dom,
                              row_valid=valid['row_valid'], col_valid=valid['col_valid'],
                              **MASK_KINDS[kind], **extra)
    def two_pass(x, y, scale, bias):
      forward = contrastive_loss(x, y, scale=scale, bias=bias, row_ids=ROW_IDS,
                                 col_ids=COL_IDS, row_domains=x_dom, col_domains=y_dom,
                                 row_valid=valid['row_valid'], col_valid=valid['col_valid'],
                                 **one_way, **extra)
      backward = contrastive_loss(y, x, scale=scale.T, bias=bias.T, row_ids=COL_IDS,
                                  col_ids=ROW_IDS, row_domains=y_dom, col_domains=x_dom,
                                  row_valid=valid['col_valid'], col_valid=valid['row_valid'],
                                  **one_way, **extra)
      return (forward + backward) / 2
    grads = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, y, scale, bias)
    assert_trees_close(grads(fused), grads(two_pass))


def count_dots(jaxpr, shapes, primitive="dot_general"):
  """Matrix products (or other `primitive`s, at any nesting depth) whose output has one
  of `shapes`."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == primitive and eqn.outvars[0].aval.shape in shapes
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          count += count_dots(sub, shapes, primitive)
  return count


@pytest.mark.parametrize('kind', ['softmax', 'sigmoid'])
def test_symmetric_loss_computes_each_block_of_logits_once(kind):
  """dense: one [N, M] product, for value and gradient; chunked: one [N, block] product
  in the forward scan and one in the backward scan (two directions computed apart
  would take twice as many)."""
  n, m, d, block = 12, 20, 8, 4
  x, y = jnp.ones((n, d)), jnp.ones((m, d))
  def dots(shapes, **strategy):
    loss = lambda x, y, s: contrastive_loss(x, y, scale=s, kind=kind, **strategy)
    return count_dots(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        x, y, 2.0).jaxpr, shapes)
  assert dots([(n, m), (m, n)]) == 1
  assert dots([(n, block), (block, n)], strategy='chunked', block_size=block) == 2


@pytest.mark.parametrize("kind, teacher", [("softmax", False), ("softmax", True),
                                           ("mpnce", False), ("sigmoid", False)])
def test_symmetric_loss_reads_the_columns_without_transposing_the_logits(kind, teacher):
  """The columns' statistics reduce along axis 0 of the block: no [N, M] (dense) or
  [N, block] (chunked) array is transposed, in the value or the gradient. A transposed
  block made XLA read the whole [N, M] logits at strided addresses in several fusions,
  which made the one-pass dense loss slower than two one-way calls (BENCHMARKS.md)."""
  n, m, d, block = 12, 20, 8, 4
  x, y = jnp.ones((n, d)), jnp.ones((m, d))
  extra = dict(teacher=Teacher(x[:, :3], y[:, :3], 5.0, 0.5)) if teacher else {}
  def transposes(shapes, **strategy):
    loss = lambda x, y, s: contrastive_loss(x, y, scale=s, kind=kind, **extra, **strategy)
    return count_dots(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        x, y, 2.0).jaxpr, shapes, primitive="transpose")
  assert transposes([(n, m), (m, n)]) == 0
  assert transposes([(n, block), (block, n)], strategy="chunked", block_size=block) == 0


def count_collective_arrays(hlo, op, shape):
  """How many arrays of `shape` the `op` instructions (combined ones included) move."""
  total = 0
  for line in hlo.splitlines():
    match = re.search(rf'= (.*?) {op}(-start)?\(', line)
    total += len(re.findall(re.escape(shape), match.group(1))) if match else 0
  return total


@pytest.mark.parametrize('block_size', [None, 4])
def test_sharded_gathers_an_array_once_for_several_terms(block_size):
  """Three terms of one jitted function over three arrays, columns b, b and c: XLA
  gathers b once (2 all-gathers, not 3), and each term reduce-scatters its columns'
  gradient; sharded equals dense."""
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  def objective(strategy):
    def loss(a, b, c):
      return sum(contrastive_loss(u, v, scale=5.0, label_smoothing=0.1, strategy=strategy,
                                  mesh=mesh, block_size=block_size)
                 for u, v in ((a, b), (c, b), (a, c)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  args = [jax.device_put(jnp.asarray(embeddings(32, 8, seed), jnp.float32), rows)
          for seed in (25, 26, 27)]
  hlo = objective('sharded').lower(*args).compile().as_text()
  assert count_collective_arrays(hlo, 'all-gather', 'f32[32,8]') == 2
  assert count_collective_arrays(hlo, 'reduce-scatter', 'f32[4,8]') == 3
  assert_trees_close(objective('sharded')(*args), objective('dense')(*args))


@pytest.mark.parametrize('kind', ['softmax', 'mpnce', 'sigmoid'])
def test_chunked_never_builds_the_full_logits_with_masks_or_teacher(kind):
  n, m, d, block = 48, 80, 8, 16
  x, y = jnp.ones((n, d)), jnp.ones((m, d))
  teacher = Teacher(jnp.ones((n, 5)), jnp.ones((m, 5)), 3.0, 0.4) if kind == 'softmax' else None
  loss = lambda x, y, s: contrastive_loss(
      x, y, scale=s, kind=kind, strategy='chunked', block_size=block, teacher=teacher,
      row_valid=jnp.arange(n) % 3 > 0, col_valid=jnp.arange(m) % 5 > 0)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, y, 2.0).jaxpr
  assert largest_intermediate(jaxpr) <= max(n, m) * block


# ----------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------
X, Y = jnp.ones((4, 3)), jnp.ones((4, 3))


@pytest.mark.parametrize('kwargs, message', [
    (dict(kind='cosine'), 'kind must be one of'),
    (dict(strategy='ring'), 'strategy must be one of'),
    (dict(y=jnp.ones((4, 5))), r'must be \[N, D\] and \[M, D\]'),
    (dict(kind='sigmoid', label_smoothing=0.1), "applies to kind='softmax' only"),
    (dict(label_smoothing=1.0), r'label_smoothing must be in \[0, 1\)'),
    (dict(strategy='chunked'), 'needs block_size'),
    (dict(strategy='chunked', block_size=0), 'block_size must be a positive int'),
    (dict(row_ids=jnp.arange(4)), 'give both row_ids and col_ids'),
    (dict(row_ids=jnp.arange(3), col_ids=jnp.arange(4)), r'row_ids must be integers of shape'),
    (dict(row_ids=jnp.ones(4), col_ids=jnp.arange(4)), r'row_ids must be integers of shape'),
    (dict(scale=jnp.ones((2, 2))), 'row_domains and col_domains are needed'),
    (dict(scale=jnp.ones(2)), 'scalars or'),
    (dict(domain_mask=np.ones((2, 2), bool)), 'row_domains and col_domains are needed'),
    (dict(domain_mask=np.ones(2, bool), row_domains=jnp.zeros(4, int),
          col_domains=jnp.zeros(4, int)), r'domain_mask must be an \[R, C\] table of bools'),
    (dict(y=jnp.ones((5, 3)), exclude_self=True), 'exclude_self needs'),
    (dict(strategy='sharded'), 'needs a mesh'),
    (dict(strategy='sharded', mesh=jax.make_mesh((8,), ('data',))), 'divisible by the 8'),
    (dict(strategy='sharded', mesh=jax.make_mesh((8,), ('data',)), batch_axes=('fsdp',)),
     'subset of the mesh axes'),
    (dict(row_valid=jnp.ones(3, bool)), r'row_valid must be booleans of shape'),
    (dict(col_valid=jnp.ones(4)), r'col_valid must be booleans of shape'),
    (dict(kind='mpnce', teacher=Teacher(X, Y, 1.0, 0.5)), "teacher targets apply to kind='softmax'"),
    (dict(teacher=Teacher(X, jnp.ones((4, 2)), 1.0, 0.5)), 'teacher.x and teacher.y must be'),
    (dict(teacher=Teacher(X, Y, jnp.ones(2), 0.5)), 'must be scalars'),
    (dict(teacher=Teacher(X, Y, 1.0, 1.5)), r'teacher.weight must be in \[0, 1\]'),
])
def test_bad_input_is_named(kwargs, message):
  kwargs = {'x': X, 'y': Y, 'scale': 2.0, **kwargs}
  with pytest.raises(ValueError, match=message):
    contrastive_loss(kwargs.pop('x'), kwargs.pop('y'), **kwargs)


# ----------------------------------------------------------------------------------------
# The benchmark's two-pass switch.
# ----------------------------------------------------------------------------------------
def test_benchmark_two_pass_case_computes_the_symmetric_loss():
  from hvla.tools import benchmark_contrastive as bc
  x = jnp.asarray(embeddings(16, 4, seed=28), jnp.float32)
  y = jnp.asarray(embeddings(16, 4, seed=29), jnp.float32)
  for strategy in ('dense', 'chunked'):
    fused = jax.jit(bc.loss_and_grads(strategy, block_size=5))(x, y, 3.0)
    two_pass = jax.jit(bc.loss_and_grads(strategy, block_size=5, two_pass=True))(x, y, 3.0)
    assert_trees_close(two_pass, fused)
  results = bc.measure(32, 4, ['dense', 'chunked'], block_size=8, repeats=2, two_pass=True)
  assert [(r['strategy'], r['two_pass']) for r in results] == [
      ('dense', False), ('dense', True), ('chunked', False), ('chunked', True)]
  assert all(len(r['seconds_all']) == 2 for r in results)
  assert '| 32 | chunked, two-pass | 8 | 1 |' in bc.format_table(results)


def test_a_traced_domain_mask_is_refused_by_name():
  def loss(mask):
    return contrastive_loss(X, Y, scale=2.0, row_domains=jnp.zeros(4, int),
                            col_domains=jnp.zeros(4, int), domain_mask=mask)
  with pytest.raises(ValueError, match='domain_mask must be concrete'):
    jax.jit(loss)(jnp.ones((1, 1), bool))
