"""The 'clip' term on a tiny stand-in dual encoder: hand computations of both losses and
their gradients, its options, its passes and its strategies."""
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
  """The TwoTowers methods the term uses: linear image and bag-of-words text towers,
  dropout on the image embedding at train time."""
  embed_dim: int = 4
  logit_scale_init: float = math.log(1 / 0.07)

  def setup(self):
    self.img = nn.Dense(self.embed_dim)
    self.txt = nn.Embed(16, self.embed_dim)
    self.dropout = nn.Dropout(0.5)
    self.param('logit_scale', nn.initializers.constant(self.logit_scale_init), ())

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


def objective(**options):
  """An objective of one 'clip' term named 'clip'."""
  return losses.get_objective({'terms': {'clip': dict(type='clip', **options)}})


def init(model, batch, obj=None, logit_scale=None):
  """The towers' parameters, the objective's own under 'objective'."""
  params = dict(jax.jit(model.init)(jax.random.PRNGKey(0), batch['images']['image'],
                                    batch['tokens']['caption'])['params'])
  own = obj.init_params(jax.random.PRNGKey(1)) if obj is not None else {}
  if own:
    params['objective'] = own
  if logit_scale is not None:
    params['logit_scale'] = jnp.float32(logit_scale)
  return params


CTX = losses.Context(step=jnp.int32(0), total_steps=10, rng=jax.random.PRNGKey(0))


def embed(obj, model, params, batch, *, train=False, rng=None):
  """The term's features by alias ('image', 'text')."""
  features = jax.jit(lambda p, b: obj.embed(model, p, {}, b, train=train, rng=rng))(
      params, batch)
  return {alias: features[key]['embedding'] for alias, key in obj.reads['clip'].items()}


def total_loss(obj, model, params, batch, *, train=False, rng=None):
  """What the trainer computes: the passes, then the objective's loss."""
  features = obj.embed(model, params, {}, batch, train=train, rng=rng)
  return obj.loss(params, {}, features, CTX)


def log_softmax(z, axis):
  return z - np.log(np.exp(z - z.max(axis, keepdims=True)).sum(axis, keepdims=True)) - \
      z.max(axis, keepdims=True)


# ----------------------------------------------------------------------------------------
# Options.
# ----------------------------------------------------------------------------------------
def test_get_objective_builds_the_term_with_its_options_and_the_shared_execution():
  obj = losses.get_objective(ml_collections.ConfigDict(dict(
      strategy='chunked', block_size=4,
      terms=dict(clip=dict(type='clip', weight=0.5, label_smoothing=0.1, image_view='global',
                           text_field='summary')))))
  term = obj.terms['clip']
  assert isinstance(term, clip.Clip) and obj.weights == {'clip': 0.5}
  assert (term.kind, term.label_smoothing, term.strategy, term.block_size, term.image_view,
          term.text_field) == ('softmax', 0.1, 'chunked', 4, 'global', 'summary')


@pytest.mark.parametrize('options, message', [
    (dict(temperature=0.07), r'objective.terms.clip.temperature'),
    (dict(loss='cosine'), r'objective.terms.clip: loss must be one of'),
    (dict(loss='sigmoid', label_smoothing=0.1), "kind='softmax' only"),
    (dict(strategy='chunked'), 'needs block_size'),
    (dict(strategy='ring'), 'strategy must be one of'),
    (dict(image_output='roi_embedding'), 'needs rois=True'),
])
def test_bad_term_options_are_named(options, message):
  with pytest.raises(ValueError, match=message):
    objective(**options)


def test_term_config_lists_every_option_at_its_default():
  config = losses.term_config('clip', loss='sigmoid')
  assert config == dict(type='clip', weight=1.0, loss='sigmoid', label_smoothing=0.0,
                        image_view='image', rois=False, image_output='embedding',
                        concepts='', text_field='caption', bias_init=-10.0)
  with pytest.raises(ValueError, match=r"has no option\(s\) \['temperature'\]"):
    losses.term_config('clip', temperature=0.07)


def test_rois_need_the_roi_path():
  config = models.default_model_config()
  with pytest.raises(ValueError, match='terms.clip: rois=True needs the ROI path'):
    objective(rois=True).attach(models.get_model(config))


# ----------------------------------------------------------------------------------------
# Passes.
# ----------------------------------------------------------------------------------------
def test_passes_read_the_configured_fields_per_example():
  model, batch = TinyTwoTowers(), make_batch(6)
  obj = objective(image_view='global', text_field='summary')
  params = init(model, batch)
  assert obj.reads['clip'] == {'image': 'encode_image(images/global)',
                               'text': 'encode_text(tokens/summary)'}
  features = embed(obj, model, params, batch)
  want_img = model.apply({'params': params}, batch['images']['global'],
                         method=model.encode_image)['embedding']
  want_txt = model.apply({'params': params}, batch['tokens']['summary'],
                         method=model.encode_text)['embedding']
  np.testing.assert_allclose(features['image'], want_img, rtol=1e-6)
  np.testing.assert_allclose(features['text'], want_txt, rtol=1e-6)
  sub = embed(obj, model, params, jax.tree.map(lambda v: v[:3], batch))
  for key in ('image', 'text'):
    np.testing.assert_allclose(sub[key], features[key][:3], rtol=1e-6)


def test_passes_feed_rng_to_dropout_at_train_time():
  model, batch = TinyTwoTowers(), make_batch(6)
  obj = objective()
  params = init(model, batch)
  a, b, c = (embed(obj, model, params, batch, train=True, rng=jax.random.PRNGKey(k))['image']
             for k in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_a_missing_field_is_named():
  model, batch = TinyTwoTowers(), make_batch(2)
  obj = objective(image_view='aug1')
  with pytest.raises(KeyError, match=r"lack 'images/aug1'; they have \[.*'images/global'"):
    obj.embed(model, init(model, batch), {}, batch, train=False, rng=None)


# ----------------------------------------------------------------------------------------
# Loss.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('alpha', [0.0, 0.2])
@pytest.mark.parametrize('scale', [14.0, 100.0])
def test_softmax_loss_matches_hand_computation(alpha, scale):
  n = 6
  model, batch = TinyTwoTowers(), make_batch(n)
  obj = objective(label_smoothing=alpha)
  params = init(model, batch, logit_scale=math.log(scale))
  value, metrics = jax.jit(lambda p: total_loss(obj, model, p, batch))(params)

  img, txt = (np.asarray(v, np.float64) for v in embed(obj, model, params, batch).values())
  logits = scale * img @ txt.T
  targets = np.where(np.eye(n), 1 - alpha, alpha / (n - 1))
  image_to_text = -(targets * log_softmax(logits, 1)).sum(1).mean()
  text_to_image = -(targets * log_softmax(logits, 0)).sum(0).mean()
  want = (image_to_text + text_to_image) / 2
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert set(metrics) == {'clip/loss', 'logit_scale'}
  np.testing.assert_allclose(metrics['clip/loss'], want, rtol=1e-5)
  np.testing.assert_allclose(metrics['logit_scale'], scale, rtol=1e-5)


def test_logit_scale_keeps_its_gradient_at_the_bound():
  """The bound is a projection after the update (optim.project): at the bound the loss
  still pulls the scale back, which a clamp in the forward pass would cut to zero."""
  model, batch = TinyTwoTowers(), make_batch(6)
  obj = objective(label_smoothing=0.2)
  params = init(model, batch, logit_scale=math.log(100.0))
  grad = jax.grad(lambda p: total_loss(obj, model, p, batch)[0])(params)['logit_scale']
  assert grad != 0


def test_sigmoid_loss_and_its_own_bias_gradient_match_hand_computation():
  n = 6
  model, batch = TinyTwoTowers(logit_scale_init=math.log(10.0)), make_batch(n)
  obj = objective(loss='sigmoid', bias_init=-2.0)
  params = init(model, batch, obj)
  assert params['objective'] == {'clip': {'logit_bias': -2.0}}
  (value, metrics), grads = jax.jit(jax.value_and_grad(
      lambda p: total_loss(obj, model, p, batch), has_aux=True))(params)

  img, txt = (np.asarray(v, np.float64) for v in embed(obj, model, params, batch).values())
  cosines = img @ txt.T
  logits = 10.0 * cosines - 2.0
  z = 2 * np.eye(n) - 1
  want = np.log1p(np.exp(-z * logits)).sum() / n  # SigLIP: -log sigmoid(z * logits)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['clip/logit_bias'], -2.0)
  d_logits = -z / (1 + np.exp(z * logits)) / n
  np.testing.assert_allclose(grads['objective']['clip']['logit_bias'], d_logits.sum(),
                             rtol=1e-4)
  np.testing.assert_allclose(grads['logit_scale'], (d_logits * 10.0 * cosines).sum(),
                             rtol=1e-4)


@pytest.mark.parametrize('loss', ['softmax', 'sigmoid'])
def test_strategies_agree_inside_a_jitted_step_on_the_mesh(loss):
  """The trainer's shape: jit(value_and_grad(loss . passes)) under jax.set_mesh."""
  model, batch = TinyTwoTowers(), make_batch(16)
  mesh = jax.make_mesh((2, 4, 1), ('data', 'fsdp', 'model'), axis_types=(AxisType.Auto,) * 3)

  def step(strategy, block_size=None):
    obj = objective(loss=loss, strategy=strategy, block_size=block_size)
    params = init(model, batch, obj)
    with jax.set_mesh(mesh):
      return jax.jit(jax.value_and_grad(lambda p: total_loss(obj, model, p, batch),
                                        has_aux=True))(params)

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
  obj = objective()
  params = nn.unbox(init(model, batch))

  def total(p):
    return total_loss(obj, model, p, batch, train=True, rng=jax.random.PRNGKey(1))
  (value, _), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
  assert np.isfinite(value)
  for tower in ('img', 'txt', 'logit_scale'):
    assert any(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads[tower]))
