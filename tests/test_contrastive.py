"""The contrastive primitive against a naive NumPy reference, and its strategies against
each other on the 8 fake CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

from hvla.losses.contrastive import contrastive_loss, resolve_batch_mesh


# ----------------------------------------------------------------------------------------
# Naive reference: loops over anchors, float64, gradients by central differences.
# ----------------------------------------------------------------------------------------
def reference_direction(a, c, a_ids, c_ids, a_dom, c_dom, scale, bias, kind, alpha,
                        exclude_self):
  losses = []
  for i in range(len(a)):
    js = [j for j in range(len(c)) if not (exclude_self and i == j)]
    logits = np.array([scale[a_dom[i], c_dom[j]] * (a[i] @ c[j] - bias[a_dom[i], c_dom[j]])
                       for j in js])
    positive = np.array([a_ids[i] == c_ids[j] for j in js])
    if kind == 'softmax':
      targets = np.where(positive, (1 - alpha) / positive.sum(),
                         alpha / max((~positive).sum(), 1))
      log_probs = logits - np.log(np.exp(logits).sum())
      losses.append(-(targets * log_probs).sum())
    elif kind == 'mpnce':
      negatives = np.exp(logits[~positive]).sum()
      losses.append(np.mean([-np.log(np.exp(p) / (np.exp(p) + negatives))
                             for p in logits[positive]]))
    else:
      z = np.where(positive, 1.0, -1.0)
      losses.append(np.sum(-np.log(1.0 / (1.0 + np.exp(-z * logits)))))
  return np.mean(losses)


def reference_loss(x, y, scale, bias, *, kind='softmax', label_smoothing=0.0, row_ids=None,
                   col_ids=None, row_domains=None, col_domains=None, exclude_self=False,
                   symmetric=True):
  n, m = len(x), len(y)
  row_ids = np.arange(n) if row_ids is None else row_ids
  col_ids = np.arange(m) if col_ids is None else col_ids
  row_dom = np.zeros(n, int) if row_domains is None else row_domains
  col_dom = np.zeros(m, int) if col_domains is None else col_domains
  scale, bias = (np.broadcast_to(p, (1, 1)) if np.ndim(p) == 0 else p for p in (scale, bias))
  directions = [(x, y, row_ids, col_ids, row_dom, col_dom, scale, bias)]
  if symmetric:
    directions.append((y, x, col_ids, row_ids, col_dom, row_dom, scale.T, bias.T))
  return np.mean([reference_direction(*d, kind, label_smoothing, exclude_self)
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
    (dict(y=jnp.ones((5, 3)), exclude_self=True), 'exclude_self needs'),
    (dict(strategy='sharded'), 'needs a mesh'),
    (dict(strategy='sharded', mesh=jax.make_mesh((8,), ('data',))), 'divisible by the 8'),
    (dict(strategy='sharded', mesh=jax.make_mesh((8,), ('data',)), batch_axes=('fsdp',)),
     'subset of the mesh axes'),
])
def test_bad_input_is_named(kwargs, message):
  kwargs = {'x': X, 'y': Y, 'scale': 2.0, **kwargs}
  with pytest.raises(ValueError, match=message):
    contrastive_loss(kwargs.pop('x'), kwargs.pop('y'), **kwargs)
