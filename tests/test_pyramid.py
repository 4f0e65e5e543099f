"""PyramidCLIP: the six terms against a NumPy reference, the f1/f2 split, the LeFF, the ROI
path and its padding, the configs, a train step on 8 fake devices and the comparison tool."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from configs import pyramid as pyramid_config
from configs import pyramid_rn50, pyramid_vitb16, pyramid_vitb32
from hvla import config as config_lib
from hvla import losses, models, optim, sharding, train
from hvla.data import pipeline
from hvla.losses import pyramid
from hvla.models import layers, resnet
from hvla.tools import compare

IMAGE_LEVELS = ('global', 'local', 'roi')
TEXT_FIELDS = ('summary', 'caption', 'tags')
CTX = losses.Context(step=jnp.int32(0), total_steps=10, rng=jax.random.PRNGKey(0))


def objective(**options):
  """PyramidCLIP's six terms, `options` passed to `pyramid.terms` (alpha, lam, mu) or,
  for strategy / block_size, to the objective."""
  execution = {k: options.pop(k) for k in ('strategy', 'block_size') if k in options}
  return losses.get_objective(dict(terms=pyramid.terms(**options), **execution))


def random_levels(n, d=5, seed=0):
  """Normalised embeddings per level: global, local, roi (images), summary, caption, tags."""
  rng = np.random.default_rng(seed)
  out = {}
  for level in IMAGE_LEVELS + TEXT_FIELDS:
    x = rng.normal(size=(n, d))
    out[level] = jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), jnp.float32)
  return out


def as_features(obj, levels):
  """The objective's features (by pass) holding the given level embeddings."""
  image = {'encode_image_with_rois(images/global, rois)': {
               'embedding': levels['global'], 'roi_embedding': levels['roi']},
           'encode_image(images/local)': {'embedding': levels['local']}}
  text = {f'encode_text(tokens/{f})': {'embedding': levels[f]} for f in TEXT_FIELDS}
  features = {**image, **text}
  assert set(features) == set(obj.passes)
  return features


def pyramid_loss(obj, scale, levels):
  params = {'logit_scale': jnp.float32(np.log(scale))}
  return obj.loss(params, {}, as_features(obj, levels), CTX)


def np_log_softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_term(x, y, scale, alpha):
  """Symmetric softened InfoNCE and its gradients wrt x and y, by hand (float64)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = len(x)
  targets = np.full((n, n), alpha / (n - 1))
  np.fill_diagonal(targets, 1 - alpha)
  logits = scale * x @ y.T
  rows, cols = np_log_softmax(logits), np_log_softmax(logits.T)
  value = (-(targets * rows).sum(1).mean() - (targets * cols).sum(1).mean()) / 2
  dlogits = ((np.exp(rows) - targets) + (np.exp(cols) - targets).T) / (2 * n)
  return value, scale * dlogits @ y, scale * dlogits.T @ x


# ----------------------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('scale', [7.5, 100.0])
@pytest.mark.parametrize('name', list(pyramid.TERMS))
def test_each_term_matches_the_reference_in_value_and_gradient(name, scale):
  levels, alpha = random_levels(6), 0.2
  if scale == 100.0:  # Saturated: separated pairs, every negative's softmax underflows.
    eye = np.eye(6, 5)
    levels = {k: jnp.asarray(eye + 1e-3 * np.asarray(v), jnp.float32) for k, v in levels.items()}
    levels = {k: v / jnp.linalg.norm(v, axis=1, keepdims=True) for k, v in levels.items()}
  obj = objective(alpha=alpha)
  image, text, _ = pyramid.TERMS[name]

  def term(lv):
    return pyramid_loss(obj, scale, lv)[1][f'{name}/loss']

  value, grads = jax.jit(jax.value_and_grad(term))(levels)
  want, d_image, d_text = np_term(levels[image], levels[text], scale, alpha)
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[image], d_image, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads[text], d_text, rtol=1e-4, atol=1e-5)
  for level in set(levels) - {image, text}:
    np.testing.assert_array_equal(grads[level], 0)


def test_total_is_the_weighted_sum_of_the_terms():
  levels, scale = random_levels(5, seed=1), 12.0
  lam, mu = 0.25, 0.15
  obj = objective(lam=lam, mu=mu)
  total, metrics = pyramid_loss(obj, scale, levels)
  term = {name: np_term(levels[i], levels[t], scale, 0.2)[0]
          for name, (i, t, _) in pyramid.TERMS.items()}
  want = ((1 - lam - mu) * (term['peer_global'] + term['peer_local']) / 2
          + lam * (term['cross_global_tags'] + term['cross_global_roi']) / 2
          + mu * (term['cross_local_tags'] + term['cross_local_roi']) / 2)
  np.testing.assert_allclose(total, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['logit_scale'], scale, rtol=1e-6)
  assert set(metrics) == {'logit_scale', *(f'{n}/loss' for n in pyramid.TERMS)}


def test_alpha_zero_reduces_to_clip():
  levels = random_levels(6, seed=2)
  clip_obj = losses.get_objective({'terms': {'clip': {'type': 'clip'}}})
  params = {'logit_scale': jnp.float32(np.log(20.0))}
  _, metrics = pyramid_loss(objective(alpha=0.0), 20.0, levels)
  for name, (image, text, _) in pyramid.TERMS.items():
    want, _ = clip_obj.loss(params, {}, {
        'encode_image(images/image)': {'embedding': levels[image]},
        'encode_text(tokens/caption)': {'embedding': levels[text]}}, CTX)
    np.testing.assert_allclose(metrics[f'{name}/loss'], want, rtol=1e-6)


def test_every_strategy_gives_the_dense_loss_and_gradient():
  levels = random_levels(8, seed=3)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))

  def value_and_grad(obj):
    fn = jax.value_and_grad(lambda lv: pyramid_loss(obj, 10.0, lv)[0])
    with jax.set_mesh(mesh):
      return jax.jit(fn)(levels)

  dense = value_and_grad(objective())
  for options in (dict(strategy='chunked', block_size=3), dict(strategy='sharded')):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 value_and_grad(objective(**options)), dense)


@pytest.mark.parametrize('options, message', [
    (dict(alpha=1.0), 'label_smoothing must be in'),
    (dict(lam=0.7, mu=0.5), 'lam and mu must be'),
    (dict(mu=-0.1), 'lam and mu must be'),
    (dict(strategy='chunked'), 'needs block_size'),
])
def test_bad_options_are_named(options, message):
  with pytest.raises(ValueError, match=message):
    objective(**options)


def test_whole_view_stands_in_for_missing_regions():
  boxes = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 2, 4)), jnp.float32)
  mask = jnp.array([[True, False], [False, False], [False, True]])
  out = jax.jit(models.whole_view_if_empty)({'boxes': boxes, 'mask': mask, 'features': 7})
  np.testing.assert_array_equal(out['mask'], [[True, False], [True, False], [False, True]])
  np.testing.assert_array_equal(out['boxes'][1, 0], [0, 0, 1, 1])
  np.testing.assert_array_equal(np.delete(out['boxes'].reshape(6, 4), 2, 0),
                                np.delete(boxes.reshape(6, 4), 2, 0))
  np.testing.assert_array_equal(out['features'], 7)


# ----------------------------------------------------------------------------------------
# Model parts.
# ----------------------------------------------------------------------------------------
def tiny_config(image='vit', roi='boxes', leff=True, **pyramid_fields):
  c = models.default_model_config()
  c.embed_dim = 16
  if image == 'vit':
    c.image.update(image_size=16, patch_size=4, width=32, depth=3, heads=2)
  else:
    c.image = resnet.default_rn50_config()
    c.image.update(image_size=64, layers=(1, 1, 1, 1), width=8, heads=4, output_dim=24,
                   norm_groups=2)
    leff = False
  c.text.update(vocab_size=64, max_len=8, width=32, depth=1, heads=2, pooling='max')
  c.pyramid.leff = leff
  c.pyramid.roi.source = roi
  c.pyramid.roi.feature_dim = 6
  c.pyramid.update(pyramid_fields)
  return c


def build(config, batch=3, seed=0):
  """(model, random parameters, images, tokens); parameters from shapes, no init compile:
  norm scales near one, everything else (biases included) small and random."""
  model = models.get_model(config)
  size = config.image.image_size
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(4, 64, size=(batch, 8)), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, tokens))['params']
  params = jax.tree.map_with_path(
      lambda path, x: (float(path[-1].key == 'scale') + 0.1 * rng.normal(size=x.shape))
      .astype(np.float32), shapes)
  return model, params, images, tokens


def apply(model, params, *args, method, **kwargs):
  return jax.jit(lambda p, *a: model.apply({'params': p}, *a, method=method, **kwargs))(
      params, *args)


@pytest.mark.parametrize('image, leff, scan', [('vit', True, False), ('vit', False, True),
                                               ('resnet', False, False)])
def test_f1_then_f2_is_the_whole_tower(image, leff, scan):
  config = tiny_config(image, leff=leff)
  config.scan = scan  # init runs f2 (the ROI path) first: a slice of a scanned stack
  model, params, images, _ = build(config)

  def whole_and_parts(m, x):
    f1 = m.image_f1(x)
    return m.encode_image(x), m.image_f2(f1['tokens'], f1['grid'])

  whole, parts = apply(model, params, images, method=whole_and_parts)
  np.testing.assert_allclose(parts['embedding'], whole['embedding'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(parts['pooled'], whole['pooled'], rtol=1e-5, atol=1e-5)


def test_f1_has_three_quarters_of_the_blocks():
  for depth, f1 in {12: 9, 4: 3, 3: 2, 2: 1, 24: 18}.items():
    assert models.ViT(depth=depth).f1_blocks == f1
  assert models.ViT(depth=12, f1_depth=6).f1_blocks == 6


def np_group_norm(x, groups, scale, bias, eps=layers.LN_EPSILON):
  b, c = x.shape[0], x.shape[-1]
  g = x.reshape(b, -1, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_quick_gelu(x):
  return x / (1 + np.exp(-1.702 * x))


def np_leff(p, x, grid):
  """The LeFF by hand: x [B, h*w, W] -> [B, h*w, W]."""
  groups = layers.LEFF_NORM_GROUPS
  y = x @ p['fc1']['kernel'] + p['fc1']['bias']
  y = np_quick_gelu(np_group_norm(y, groups, p['norm1']['scale'], p['norm1']['bias']))
  h, w = grid
  fmap = np.pad(y.reshape(len(x), h, w, -1), ((0, 0), (1, 1), (1, 1), (0, 0)))
  kernel = p['conv_kernel']  # [3, 3, C]: one filter per channel
  conv = sum(fmap[:, i:i + h, j:j + w] * kernel[i, j] for i in range(3) for j in range(3))
  y = np_quick_gelu(np_group_norm(conv.reshape(y.shape), groups, p['norm2']['scale'],
                                  p['norm2']['bias']))
  y = y @ p['fc2']['kernel'] + p['fc2']['bias']
  return np_quick_gelu(np_group_norm(y, groups, p['norm3']['scale'], p['norm3']['bias']))


def test_leff_block_matches_numpy_and_adds_the_normalised_class_token():
  """The official block adds LEFF(ln_2(x)) to x, and its LEFF returns the class token of
  ln_2(x) unchanged: the class token gains its own normalised value, the patches the LeFF."""
  grid, width = (3, 4), 32
  block = layers.Block(mlp_dim=64, heads=2, readout='cls', leff_grid=grid)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 13, width)), jnp.float32)
  params = nn.unbox(jax.jit(block.init)(jax.random.key(0), x))['params']
  params = jax.tree.map(
      lambda a: np.asarray(a) + 0.1 * np.random.default_rng(a.size).normal(size=a.shape), params)
  out, readout = jax.jit(lambda p, x: block.apply({'params': p}, x))(params, x)
  np_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  @jax.jit
  def attended(p, x):  # The block up to its second norm, from its own parameters.
    norm = nn.LayerNorm(epsilon=layers.LN_EPSILON)
    return x + layers.Attention(heads=2).apply(
        {'params': p['attn']}, norm.apply({'params': p['norm1']}, x))

  h = np.asarray(attended(params, x), np.float64)
  norm2 = np_params['norm2']
  z = ((h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + layers.LN_EPSILON)
       * norm2['scale'] + norm2['bias'])
  want = h + np.concatenate([z[:, :1], np_leff(np_params['leff'], z[:, 1:], grid)], axis=1)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out[:, 0], h[:, 0] + z[:, 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(readout, out[:, 0], rtol=1e-6)


def np_pool_boxes(patches, grid, boxes):
  """Coverage-weighted mean of the patch cells, cell by cell."""
  h, w = grid
  out = np.zeros(boxes.shape[:2] + patches.shape[-1:])
  for b, m in np.ndindex(*boxes.shape[:2]):
    x0, y0, x1, y1 = boxes[b, m]
    total = np.zeros(patches.shape[-1])
    weight = 0.0
    for i, j in np.ndindex(h, w):
      cover = (max(0.0, min(y1, (i + 1) / h) - max(y0, i / h)) *
               max(0.0, min(x1, (j + 1) / w) - max(x0, j / w)))
      total += cover * patches[b, i * w + j]
      weight += cover
    out[b, m] = total / weight if weight else 0.0
  return out


def test_pool_boxes_matches_numpy():
  rng = np.random.default_rng(0)
  grid = (3, 5)
  patches = rng.normal(size=(2, 15, 4)).astype(np.float32)
  corners = np.sort(rng.uniform(size=(2, 4, 2, 2)), axis=2)  # [B, M, (lo, hi), (x, y)]
  boxes = np.concatenate([corners[:, :, 0], corners[:, :, 1]], axis=-1).astype(np.float32)
  boxes[0, 1] = [0.1, 0.2, 0.12, 0.21]  # Smaller than a cell.
  boxes[1, 2] = [0.0, 0.0, 1.0, 1.0]  # The whole grid: the mean of every patch.
  boxes[1, 3] = 0.0  # Padding: zero area.
  got = jax.jit(models.pool_boxes, static_argnums=1)(patches, grid, boxes)
  np.testing.assert_allclose(got, np_pool_boxes(patches, grid, boxes), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1, 2], patches[1].mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[1, 3], 0)


@pytest.mark.parametrize('image', ['vit', 'resnet'])
def test_padded_regions_do_not_change_the_roi_embedding(image):
  model, params, _, _ = build(tiny_config(image, roi='features'))
  rng = np.random.default_rng(1)
  regions = rng.normal(size=(3, 3, 6)).astype(np.float32)
  boxes = rng.uniform(size=(3, 3, 4)).astype(np.float32)
  real = np.array([[True] * 3, [True, True, False], [True, False, False]])
  # The same regions with junk padding interleaved.
  junk = lambda shape: rng.normal(size=shape).astype(np.float32) * 5  # noqa: E731
  order = [0, 3, 1, 4, 2]
  padded = (np.concatenate([regions, junk((3, 2, 6))], 1)[:, order],
            np.concatenate([boxes, junk((3, 2, 4))], 1)[:, order],
            np.concatenate([real, np.zeros((3, 2), bool)], 1)[:, order])

  def embed(m, plain, padded, short):
    return [m.image_rois(*inputs)['embedding'] for inputs in (plain, padded, short)]

  # Only the real regions matter: row 1 also equals its first two regions alone.
  short = (regions[1:2, :2], boxes[1:2, :2], real[1:2, :2])
  base, with_junk, alone = apply(model, params, (regions, boxes, real), padded, short,
                                 method=embed)
  np.testing.assert_allclose(with_junk, base, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(alone, base[1:2], rtol=1e-5, atol=1e-6)
  assert not np.allclose(base[0], base[1], atol=1e-3)


def test_roi_path_is_the_f2_blocks_on_class_token_and_embedded_regions():
  model, params, _, _ = build(tiny_config('vit', roi='features'))
  rng = np.random.default_rng(2)
  regions = rng.normal(size=(2, 4, 6)).astype(np.float32)
  boxes = rng.uniform(size=(2, 4, 4)).astype(np.float32)
  got = apply(model, params, regions, boxes, np.ones((2, 4), bool), method='image_rois')
  p = params['img']
  linear = p['roi_embedding']
  assert sorted(linear) == ['kernel']  # bias-free, as the official proj_pre
  x = np.concatenate([regions, boxes], -1) @ linear['kernel']
  x = np.concatenate([np.broadcast_to(p['cls'], (2, 1, 32)), x], 1)

  def f2_path(m, x):
    x = m.image_pre_norm(x)
    x, _ = m.image_blocks(x, 2, 3)
    return m.image_project(m.image_norm(x[:, 0]))

  want = apply(model, params, jnp.asarray(x, jnp.float32), method=f2_path)
  np.testing.assert_allclose(got['embedding'], want, rtol=1e-5, atol=1e-6)


def test_roi_path_errors_say_what_is_wrong():
  model, params, images, _ = build(tiny_config('vit', roi='features'))
  regions, boxes, mask = np.zeros((3, 2, 5)), np.zeros((3, 2, 4)), np.ones((3, 2), bool)
  with pytest.raises(ValueError, match=r'width 5; the ROI path takes 6 \(model.pyramid'):
    jax.eval_shape(lambda p: model.apply({'params': p}, regions, boxes, mask,
                                         method='image_rois'), params)
  with pytest.raises(ValueError, match='needs rois/features'):
    jax.eval_shape(lambda p: model.apply({'params': p}, images, {'boxes': boxes, 'mask': mask},
                                         method='encode_image_with_rois'), params)
  plain = models.get_model(tiny_config('vit', roi=None))
  with pytest.raises(ValueError, match='needs model.pyramid.roi.source'):
    jax.eval_shape(lambda p: plain.apply({'params': p}, images, {'boxes': boxes, 'mask': mask},
                                         method='encode_image_with_rois'), params)


@pytest.mark.parametrize('image', ['vit', 'resnet'])
def test_box_regions_are_pooled_f1_patches(image):
  model, params, images, _ = build(tiny_config(image, roi='boxes'))
  rng = np.random.default_rng(3)
  boxes = jnp.asarray(np.sort(rng.uniform(size=(3, 2, 2, 2)), 2).transpose(0, 1, 3, 2)
                      .reshape(3, 2, 4)[..., [0, 2, 1, 3]], jnp.float32)
  mask = jnp.array([[True, True], [True, False], [False, True]])

  def together_and_by_hand(m, x):
    f1 = m.image_f1(x)
    regions = models.pool_boxes(f1['patches'], f1['grid'], boxes)
    return (m.encode_image_with_rois(x, {'boxes': boxes, 'mask': mask}),
            m.image_f2(f1['tokens'], f1['grid']), m.image_rois(regions, boxes, mask))

  got, image_out, roi_out = apply(model, params, images, method=together_and_by_hand)
  np.testing.assert_allclose(got['embedding'], image_out['embedding'], rtol=1e-6)
  np.testing.assert_allclose(got['roi_embedding'], roi_out['embedding'], rtol=1e-5, atol=1e-6)


def test_passes_read_every_level_per_example():
  config = tiny_config('vit', roi='boxes')
  model, params, _, _ = build(config)
  rng = np.random.default_rng(4)
  n = 4
  batch = {
      'images': {v: rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
                 for v in ('global', 'local')},
      'tokens': {f: rng.integers(1, 64, size=(n, 8)).astype(np.int32) for f in TEXT_FIELDS},
      'rois': {'boxes': np.tile(np.float32([0.1, 0.2, 0.7, 0.9]), (n, 3, 1)),
               'mask': np.array([[True, True, False]] * n)},
  }
  obj = objective()

  @jax.jit
  def run(p, b):
    half = jax.tree.map(lambda x: x[:2], b)
    embed = lambda batch: obj.embed(model, p, {}, batch, train=False, rng=None)
    return (embed(b), embed(half),
            model.apply({'params': p}, b['images']['global'], b['rois'],
                        method='encode_image_with_rois'),
            model.apply({'params': p}, b['tokens']['tags'], method='encode_text'))

  features, half, global_view, tags = run(params, batch)
  rois = features['encode_image_with_rois(images/global, rois)']
  np.testing.assert_allclose(rois['roi_embedding'], global_view['roi_embedding'], rtol=1e-6)
  np.testing.assert_allclose(features['encode_text(tokens/tags)']['embedding'],
                             tags['embedding'], rtol=1e-6)
  for outputs in features.values():
    for x in outputs.values():
      assert x.shape == (n, 16)
  # Per example: half of the batch embeds to half of the embeddings.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[:2], rtol=1e-5, atol=1e-6),
               half, features)
  with pytest.raises(ValueError, match='needs the ROI path'):
    objective().attach(models.get_model(tiny_config(roi=None)))
  with pytest.raises(ValueError, match='needs rois/features'):
    objective().embed(models.get_model(tiny_config(roi='features')), params, {}, batch,
                      train=False, rng=None)


@pytest.mark.parametrize('image, changes, key', [
    ('vit', {'pyramid.f1_depth': 3}, 'model.pyramid.f1_depth'),
    ('vit', {'pyramid.f1_depth': 0}, 'model.pyramid.f1_depth'),
    ('vit', {'image.mlp_ratio': 2.5}, 'model.image.width'),
    ('vit', {'pyramid.roi.source': 'detector'}, 'model.pyramid.roi.source'),
    ('vit', {'pyramid.roi.feature_dim': 0}, 'model.pyramid.roi.feature_dim'),
    ('vit', {'pyramid.levels': 3}, 'model.pyramid.levels'),
    ('vit', {'pyramid.roi.max_regions': 3}, 'model.pyramid.roi.max_regions'),
    ('vit', {'scan': True}, 'model.scan'),
    ('vit', {'image.width': 48, 'image.heads': 2}, 'model.image.width'),
    ('vit', {'image.patch_dropout': 0.5}, 'model.image.patch_dropout'),
    ('vit', {'image.leff': True}, 'model.image.leff'),
    ('resnet', {'pyramid.leff': True}, 'model.pyramid.leff'),
    ('resnet', {'pyramid.f1_depth': 2}, 'model.pyramid.f1_depth'),
])
def test_bad_pyramid_model_config_is_named(image, changes, key):
  config = tiny_config(image)
  for path, value in changes.items():
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ValueError, match=key):
    models.get_model(config)


# ----------------------------------------------------------------------------------------
# Configs and training.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('module', [pyramid_vitb16, pyramid_vitb32, pyramid_rn50])
@pytest.mark.parametrize('arg', [None, 'runlocal', 'runlocal,roi=features,alpha=0.1,steps=7'])
def test_configs_validate(module, arg):
  config = config_lib.validate(module.get_config(arg))
  assert set(config.objective.terms) == set(pyramid.TERMS)
  assert config.model.text.pooling == 'max'
  assert set(config.data.views) == {'global', 'local'} and config.data.box_view == 'global'
  assert config.data.views['global'].crop_scale == pyramid_config.GLOBAL_CROP_SCALE
  assert config.data.views['local'].crop_scale == pyramid_config.LOCAL_CROP_SCALE
  assert set(config.data.text.fields) == set(TEXT_FIELDS)
  vit = module is not pyramid_rn50
  assert config.model.pyramid.leff == vit
  assert config.optimizer.freeze == ((pyramid_config.PATCH_EMBEDDING,) if vit else ())
  if arg and 'runlocal' in arg:
    assert {ev.view for ev in config.evals.values()} == {'global'}
    assert 'grounding' in config.evals
  if arg and 'steps=7' in arg:
    assert config.total_steps == 7
    assert {t.label_smoothing for t in config.objective.terms.values()} == {0.1}
    assert config.model.pyramid.roi.source == 'features'


def test_switches_turn_the_leff_and_the_freezing_off():
  config = pyramid_vitb16.get_config('leff=false,freeze_patch_embed=false')
  assert not config.model.pyramid.leff and config.optimizer.freeze == ()
  with pytest.raises(ValueError, match="'leff'"):
    pyramid_rn50.get_config('leff=true')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def test_runlocal_train_step_on_8_devices(data_dir):
  config = pyramid_vitb16.get_config('runlocal,evals=false')
  config.batch_size = 16
  config.model.image.depth = config.model.text.depth = 2
  config.data.data_dir = str(data_dir)
  config.data.shapes.update(num_train=32, num_validation=8, num_test=8)
  pipeline.ensure_dataset(config.data)
  loader = pipeline.make_loader(config.data, split='train', global_batch_size=16, train=True,
                                seed=0, process_index=0, process_count=1)
  host_batch = next(iter(loader))
  assert {'summary', 'caption', 'tags'} <= set(host_batch['tokens'])
  assert host_batch['rois']['mask'].any(axis=1).all()

  setup = train.Setup(config)
  assert setup.mesh.devices.size == 8
  state = setup.init_state()
  before = jax.device_get(state['params'])
  step = setup.compile_train_step(train.global_batch_spec(host_batch))
  state, metrics = step(state, sharding.make_global_batch(host_batch, setup.mesh))
  after = jax.device_get(state['params'])
  weighted = sum(setup.objective.weights[name] * metrics[f'{name}/loss']
                 for name in pyramid.TERMS)
  np.testing.assert_allclose(metrics['loss'], weighted, rtol=1e-6)
  frozen = optim.match_tree(before, config.optimizer.freeze)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
  flat_frozen, flat_changed = jax.tree.leaves(frozen), jax.tree.leaves(changed)
  assert sum(flat_frozen) == 1  # img/embedding/kernel, and nothing else
  assert all(c != f for c, f in zip(flat_changed, flat_frozen))


# ----------------------------------------------------------------------------------------
# The fair-comparison command.
# ----------------------------------------------------------------------------------------
def test_compare_configs_are_equal_runlocal_runs_with_grounding():
  clip = compare.load_config('clip_vitb16', steps=40, batch=32)
  pyr = compare.load_config('pyramid_vitb16:leff=false', steps=40, batch=32)
  for config in (clip, pyr):
    assert (config.total_steps, config.batch_size, config.checkpoint_every) == (40, 32, 40)
    assert config.schedule.warmup_steps == 4 and config.data.dataset == 'hvla_shapes'
    assert {ev.every_steps for ev in config.evals.values()} == {40}
    assert config.model.image.width == 128
  assert not pyr.model.pyramid.leff
  assert clip.evals.grounding.view == 'image' and pyr.evals.grounding.view == 'global'
  assert set(clip.evals) == set(pyr.evals)


def test_markdown_table_puts_configs_side_by_side():
  table = compare.markdown_table({'a': {'x/top1': 0.5, 'train/seconds': 12.34},
                                  'b': {'x/top1': 0.25, 'y/r1': 1.0}})
  assert table.splitlines() == [
      '| metric | a | b |', '|---|---|---|', '| x/top1 | 0.500 | 0.250 |',
      '| y/r1 | - | 1.000 |', '| train/seconds | 12.3 | - |']


def test_compare_run_trains_then_evaluates(tmp_path, data_dir):
  config = compare.load_config('pyramid_vitb16', steps=2, batch=16)
  config.model.image.depth = config.model.text.depth = 2
  config.data.data_dir = str(data_dir)
  config.data.shapes.update(num_train=32, num_validation=8, num_test=8)
  config.evals = {k: config.evals[k] for k in ('zeroshot_shape', 'grounding')}  # Faster.
  for ev in config.evals.values():
    ev.batch_size = 8
  results, seconds = compare.run('pyramid_vitb16', config, str(tmp_path))
  assert seconds > 0
  for key in ('zeroshot_shape/top1', 'grounding/pointing', 'grounding/box_acc'):
    assert 0 <= results[key] <= 1
  assert (tmp_path / 'eval_results_step2.json').exists()
