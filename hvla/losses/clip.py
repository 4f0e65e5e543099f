"""The CLIP baseline: one image view against one text field.

'softmax' is CLIP's symmetric InfoNCE [paper] (optionally with PyramidCLIP's softened
targets [recon]); 'sigmoid' is SigLIP's loss [paper]: every pair scored on its own, summed
over texts and averaged over images, with a learnable logit bias. The logit scale is
exp(params['logit_scale']) clamped at 100 [paper].
"""
import jax

from hvla.losses import batch_field, contrastive, encode, register
from hvla.models import logit_scale

LOSSES = ('softmax', 'sigmoid')


@register('clip')
class Clip:
  """Options (the keys of `config.objective`):

  loss: 'softmax' | 'sigmoid'.
  label_smoothing: alpha of the softened softmax targets (0: plain InfoNCE).
  strategy, block_size: how the contrastive term is computed (`contrastive_loss`).
  image_view: batch['images'][image_view] is the image input.
  text_field: batch['tokens'][text_field] is the text input.
  """

  def __init__(self, *, loss='softmax', label_smoothing=0.0, strategy='dense',
               block_size=None, image_view='image', text_field='caption'):
    if loss not in LOSSES:
      raise ValueError(f'objective.loss must be one of {LOSSES}, got {loss!r}')
    contrastive.check_options(loss, label_smoothing, strategy, block_size)
    self.kind = loss  # `loss` is the method below.
    self.label_smoothing = label_smoothing
    self.strategy = strategy
    self.block_size = block_size
    self.image_view = image_view
    self.text_field = text_field

  def embed(self, model, params, batch, *, train, rng):
    image_rng, text_rng = (None, None) if rng is None else jax.random.split(rng)
    images = batch_field(batch, 'images', self.image_view)
    tokens = batch_field(batch, 'tokens', self.text_field)
    return {'img': encode(model, params, 'encode_image', images, train=train,
                          rng=image_rng)['embedding'],
            'txt': encode(model, params, 'encode_text', tokens, train=train,
                          rng=text_rng)['embedding']}

  def loss(self, params, features):
    scale = logit_scale(params)
    metrics = {'logit_scale': scale}
    if self.kind == 'sigmoid':
      if 'logit_bias' not in params:
        raise ValueError("objective.loss='sigmoid' needs params['logit_bias']: set "
                         'model.logit_bias_init')
      # SigLIP's logits are scale * x.y + b; the primitive's offset is applied before the
      # scale: s = scale * (x.y - bias), so bias = -b / scale.
      bias = -params['logit_bias'] / scale
      metrics['logit_bias'] = params['logit_bias']
    else:
      bias = 0.0
    value = contrastive.contrastive_loss(
        features['img'], features['txt'], scale=scale, bias=bias, kind=self.kind,
        label_smoothing=self.label_smoothing, symmetric=self.kind == 'softmax',
        strategy=self.strategy, block_size=self.block_size)
    return value, {'loss/clip': value, **metrics}

