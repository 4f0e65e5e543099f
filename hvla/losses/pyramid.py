"""PyramidCLIP (METHODS.md §1): six softened contrastive terms across three levels.

Levels: the global view G with the caption's summary T_s, the local view L with the
caption T, and the global view's regions R (through f2 only) with the object/attribute
tags T_OA. The six terms [recon], each a symmetric InfoNCE over the global batch with
softened targets (1 - alpha on the positive, alpha / (N - 1) on every negative):

| name (logged as loss/pyramid_<name>) | pair | weight |
|---|---|---|
| peer_global | (G, T_s) | (1 - lam - mu) / 2 |
| peer_local | (L, T) | (1 - lam - mu) / 2 |
| cross_global_tags | (G, T_OA) | lam / 2 |
| cross_global_roi | (R, T_s) | lam / 2 |
| cross_local_tags | (L, T_OA) | mu / 2 |
| cross_local_roi | (R, T) | mu / 2 |

(R, T_OA) is left out, as in the paper. One image tower, one text tower and one logit
scale serve every level [paper]. Each term is one call of the shared contrastive
primitive, so every execution strategy (dense, chunked, sharded) applies.

[ours] An example whose view kept no region gets one region covering the whole view (so
R stays informative); the regions are those of the global view (`config.data.box_view`
must be the global view's name).
"""
import jax
import jax.numpy as jnp

from hvla.losses import batch_field, contrastive, encode, register
from hvla.models import logit_scale

# name -> (image level, text level, weight group); the order of METHODS.md §1.
TERMS = {
    'peer_global': ('global', 'summary', 'peer'),
    'peer_local': ('local', 'caption', 'peer'),
    'cross_global_tags': ('global', 'tags', 'cross_global'),
    'cross_global_roi': ('roi', 'summary', 'cross_global'),
    'cross_local_tags': ('local', 'tags', 'cross_local'),
    'cross_local_roi': ('roi', 'caption', 'cross_local'),
}
TEXT_FIELDS = ('summary', 'caption', 'tags')
WHOLE_VIEW = (0.0, 0.0, 1.0, 1.0)


def term_weights(lam, mu):
  """Weight of every term: (1 - lam - mu) / 2 for the peers, lam / 2 and mu / 2 for the
  global and local cross terms."""
  group = {'peer': (1 - lam - mu) / 2, 'cross_global': lam / 2, 'cross_local': mu / 2}
  return {name: group[g] for name, (_, _, g) in TERMS.items()}


def whole_view_if_empty(rois):
  """Rows without a real region get region 0 = the whole view (box (0, 0, 1, 1))."""
  mask = jnp.asarray(rois['mask'], bool)
  empty = ~jnp.any(mask, axis=1)
  boxes = rois['boxes'].at[:, 0].set(
      jnp.where(empty[:, None], jnp.asarray(WHOLE_VIEW, rois['boxes'].dtype),
                rois['boxes'][:, 0]))
  return dict(rois, boxes=boxes, mask=mask.at[:, 0].set(mask[:, 0] | empty))


@register('pyramid')
class Pyramid:
  """Options (the keys of `config.objective`):

  alpha: softened-target mass on the negatives (0.2 [recon]; 0 is plain InfoNCE).
  lam, mu: weights of the global and local cross terms (1/3 each [recon]).
  strategy, block_size: how each contrastive term is computed (`contrastive_loss`).
  global_view, local_view: batch['images'][...] of G and L (the views' names in
  `config.data.views`).
  """

  def __init__(self, *, alpha=0.2, lam=1 / 3, mu=1 / 3, strategy='dense', block_size=None,
               global_view='global', local_view='local'):
    contrastive.check_options('softmax', alpha, strategy, block_size)
    if not (lam >= 0 and mu >= 0 and lam + mu <= 1):
      raise ValueError(f'objective.lam and objective.mu must be >= 0 with lam + mu <= 1, '
                       f'got lam={lam}, mu={mu}')
    self.alpha, self.lam, self.mu = float(alpha), float(lam), float(mu)
    self.strategy, self.block_size = strategy, block_size
    self.global_view, self.local_view = global_view, local_view
    self.weights = term_weights(self.lam, self.mu)

  def embed(self, model, params, batch, *, train, rng):
    """Per-example joint embeddings of the six levels: global, local, roi, summary,
    caption, tags (each [B, D])."""
    if model.roi_source is None:
      raise ValueError("objective 'pyramid' needs the ROI path: set "
                       "model.pyramid.roi.source to 'boxes' or 'features'")
    global_rng, local_rng = (None, None) if rng is None else jax.random.split(rng)
    keys = ('boxes', 'mask', 'features') if model.roi_source == 'features' else ('boxes', 'mask')
    rois = whole_view_if_empty({k: batch_field(batch, 'rois', k) for k in keys})
    views = model.apply(
        {'params': params}, batch_field(batch, 'images', self.global_view), rois,
        train=train, method='encode_image_with_rois',
        rngs=None if global_rng is None else {'dropout': global_rng})
    local = encode(model, params, 'encode_image', batch_field(batch, 'images', self.local_view),
                   train=train, rng=local_rng)
    features = {'global': views['embedding'], 'roi': views['roi_embedding'],
                'local': local['embedding']}
    for field in TEXT_FIELDS:
      features[field] = encode(model, params, 'encode_text', batch_field(batch, 'tokens', field),
                               train=train)['embedding']
    return features

  def loss(self, params, features):
    scale = logit_scale(params)
    terms = {
        name: contrastive.contrastive_loss(
            features[image], features[text], scale=scale, label_smoothing=self.alpha,
            symmetric=True, strategy=self.strategy, block_size=self.block_size)
        for name, (image, text, _) in TERMS.items()}
    total = sum(self.weights[name] * value for name, value in terms.items())
    metrics = {f'loss/pyramid_{name}': value for name, value in terms.items()}
    return total, {'loss/pyramid': total, **metrics, 'logit_scale': scale}
