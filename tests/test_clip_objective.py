"""The objective registry and the 'clip' objective, on a tiny stand-in dual encoder."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType

from hvla import losses, models
from hvla.losses import clip


class TinyTwoTowers(nn.Module):
  """The TwoTowers methods the objective uses: linear image and bag-of-words text towers,
  dropout on the image embedding at train time."""
  embed_dim: int = 4
  logit_scale_init: float = math.log(1 / 0.07)
  logit_bias_init: float | None = None

  def setup(self):
    self.img = nn.Dense(self.embed_dim)
    self.txt = nn.Embed(16, self.embed_dim)
    self.dropout = nn.Dropout(0.5)
    self.param('logit_scale', nn.initializers.constant(self.logit_scale_init), ())
    if self.logit_bias_init is not None:
      self.param('logit_bias', nn.initializers.constant(self.logit_bias_init), ())

  def encode_image(self, images, *, train=False):
    x = self.dropout(self.img(images.reshape(images.shape[0], -1)), deterministic=not train)
    return {'embedding': models.l2_normalize(x)}

  def encode_text(self, tokens, *, train=False):
    del train
    return {'embedding': models.l2_normalize(self.txt(tokens).mean(axis=1))}

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)


def make_batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return {'images': {'image': rng.normal(size=(n, 4, 4, 3)).astype(np.float32),
                     'global': rng.normal(size=(n, 4, 4, 3)).astype(np.float32)},
          'tokens': {'caption': rng.integers(1, 16, (n, 5)).astype(np.int32),
                     'summary': rng.integers(1, 16, (n, 5)).astype(np.int32)}}


def init(model, batch, logit_scale=None):
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch['images']['image'],
                               batch['tokens']['caption'])['params']
  if logit_scale is not None:
    params = dict(params, logit_scale=jnp.float32(logit_scale))
  return params


def embed(obj, model, params, batch):
  return jax.jit(lambda p, b: obj.embed(model, p, b, train=False, rng=None))(params, batch)


def objective(**options):
  return losses.get_objective(ml_collections.ConfigDict(dict(name='clip', **options)))


def log_softmax(z, axis):
  return z - np.log(np.exp(z - z.max(axis, keepdims=True)).sum(axis, keepdims=True)) - \
      z.max(axis, keepdims=True)


# ----------------------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------------------
def test_get_objective_builds_the_named_objective_with_its_options():
  obj = objective(loss='softmax', label_smoothing=0.1, strategy='chunked', block_size=4,
                  image_view='global', text_field='summary')
  assert isinstance(obj, clip.Clip)
  assert (obj.kind, obj.label_smoothing, obj.strategy, obj.block_size, obj.image_view,
          obj.text_field) == ('softmax', 0.1, 'chunked', 4, 'global', 'summary')


@pytest.mark.parametrize('config, message', [
    (dict(name='clipp'), r"Unknown objective.name 'clipp'; known: \[.*'clip'"),
    (dict(name='clip', temperature=0.07), r'objective.temperature'),
    (dict(name='clip', loss='cosine'), r'objective.loss must be one of'),
    (dict(name='clip', loss='sigmoid', label_smoothing=0.1), "kind='softmax' only"),
    (dict(name='clip', strategy='chunked'), 'needs block_size'),
    (dict(name='clip', strategy='ring'), 'strategy must be one of'),
])
def test_bad_objective_config_is_named(config, message):
  with pytest.raises(ValueError, match=message):
    losses.get_objective(ml_collections.ConfigDict(config))


def test_a_name_is_registered_once():
  class Other:
    pass
  with pytest.raises(ValueError, match="'clip' is already registered"):
    losses.register('clip')(Other)
  assert losses.register('clip')(clip.Clip) is clip.Clip  # re-import is harmless
  assert isinstance(objective(), clip.Clip)


# ----------------------------------------------------------------------------------------
# embed.
# ----------------------------------------------------------------------------------------
def test_embed_is_per_example_and_reads_the_configured_fields():
  model, batch = TinyTwoTowers(), make_batch(6)
  params = init(model, batch)
  obj = objective(image_view='global', text_field='summary')
  features = embed(obj, model, params, batch)
  want_img = model.apply({'params': params}, batch['images']['global'],
                         method=model.encode_image)['embedding']
  want_txt = model.apply({'params': params}, batch['tokens']['summary'],
                         method=model.encode_text)['embedding']
  np.testing.assert_allclose(features['img'], want_img, rtol=1e-6)
  np.testing.assert_allclose(features['txt'], want_txt, rtol=1e-6)
  half = jax.tree.map(lambda v: v[:3], batch)
  sub = embed(obj, model, params, half)
  for key in ('img', 'txt'):
    np.testing.assert_allclose(sub[key], features[key][:3], rtol=1e-6)


def test_embed_feeds_rng_to_dropout_at_train_time():
  model, batch = TinyTwoTowers(), make_batch(6)
  params, obj = init(model, batch), objective()
  a, b, c = (obj.embed(model, params, batch, train=True, rng=jax.random.PRNGKey(k))['img']
             for k in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_embed_names_a_missing_field():
  model, batch = TinyTwoTowers(), make_batch(2)
  with pytest.raises(KeyError, match=r"no images/aug1; images/ has \['global', 'image'\]"):
    objective(image_view='aug1').embed(model, init(model, batch), batch, train=False,
                                       rng=None)


# ----------------------------------------------------------------------------------------
# loss.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('alpha', [0.0, 0.2])
def test_softmax_loss_matches_hand_computation(alpha):
  n = 6
  model, batch = TinyTwoTowers(), make_batch(n)
  params = init(model, batch, logit_scale=math.log(200.0))  # clamped to 100
  obj = objective(label_smoothing=alpha)
  features = embed(obj, model, params, batch)
  value, metrics = jax.jit(obj.loss)(params, features)

  img, txt = (np.asarray(features[k], np.float64) for k in ('img', 'txt'))
  logits = 100.0 * img @ txt.T
  targets = np.where(np.eye(n), 1 - alpha, alpha / (n - 1))
  image_to_text = -(targets * log_softmax(logits, 1)).sum(1).mean()
  text_to_image = -(targets * log_softmax(logits, 0)).sum(0).mean()
  want = (image_to_text + text_to_image) / 2
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert set(metrics) == {'loss/clip', 'logit_scale'}
  np.testing.assert_allclose(metrics['loss/clip'], want, rtol=1e-5)
  np.testing.assert_allclose(metrics['logit_scale'], 100.0, rtol=1e-6)


def test_sigmoid_loss_and_its_bias_gradient_match_hand_computation():
  n = 6
  model, batch = TinyTwoTowers(logit_scale_init=math.log(10.0), logit_bias_init=-2.0), \
      make_batch(n)
  params = init(model, batch)
  obj = objective(loss='sigmoid')
  features = embed(obj, model, params, batch)
  (value, metrics), grads = jax.jit(jax.value_and_grad(obj.loss, has_aux=True))(
      params, features)

  img, txt = (np.asarray(features[k], np.float64) for k in ('img', 'txt'))
  cosines = img @ txt.T
  logits = 10.0 * cosines - 2.0
  z = 2 * np.eye(n) - 1
  want = np.log1p(np.exp(-z * logits)).sum() / n  # SigLIP: -log sigmoid(z * logits)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['logit_bias'], -2.0)
  d_logits = -z / (1 + np.exp(z * logits)) / n
  np.testing.assert_allclose(grads['logit_bias'], d_logits.sum(), rtol=1e-4)
  np.testing.assert_allclose(grads['logit_scale'], (d_logits * 10.0 * cosines).sum(),
                             rtol=1e-4)


def test_sigmoid_without_logit_bias_is_named():
  model, batch = TinyTwoTowers(), make_batch(2)
  params = init(model, batch)
  obj = objective(loss='sigmoid')
  with pytest.raises(ValueError, match='model.logit_bias_init'):
    obj.loss(params, embed(obj, model, params, batch))


@pytest.mark.parametrize('loss', ['softmax', 'sigmoid'])
def test_strategies_agree_inside_a_jitted_step_on_the_mesh(loss):
  """The trainer's shape: jit(value_and_grad(loss . embed)) under jax.set_mesh."""
  model, batch = TinyTwoTowers(logit_bias_init=-1.0), make_batch(16)
  params = init(model, batch)
  mesh = jax.make_mesh((2, 4, 1), ('data', 'fsdp', 'model'), axis_types=(AxisType.Auto,) * 3)

  def step(strategy, block_size=None):
    obj = objective(loss=loss, strategy=strategy, block_size=block_size)
    def total(p):
      return obj.loss(p, obj.embed(model, p, batch, train=False, rng=None))
    with jax.set_mesh(mesh):
      return jax.jit(jax.value_and_grad(total, has_aux=True))(params)

  want = step('dense')
  for got in (step('chunked', 5), step('sharded')):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)


def test_runs_on_hvla_two_towers():
  config = models.default_model_config()
  config.embed_dim = 8
  config.image.update(image_size=8, patch_size=4, width=16, depth=1, heads=2,
                      patch_dropout=0.5)
  config.text.update(vocab_size=16, max_len=5, width=16, depth=1, heads=2)
  model, batch = models.get_model(config), make_batch(4)
  batch['images']['image'] = np.resize(batch['images']['image'], (4, 8, 8, 3))
  params = nn.unbox(init(model, batch))
  obj = objective()

  def total(p):
    return obj.loss(p, obj.embed(model, p, batch, train=True, rng=jax.random.PRNGKey(1)))
  (value, _), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
  assert np.isfinite(value)
  for tower in ('img', 'txt', 'logit_scale'):
    assert any(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads[tower]))
