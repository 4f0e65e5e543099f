"""The 'clip' term: one image level against one text field.

'softmax' is CLIP's symmetric InfoNCE [paper] (optionally with PyramidCLIP's softened
targets [recon]); 'sigmoid' is SigLIP's loss [paper]: every pair scored on its own, summed
over texts and averaged over images, with a learnable logit bias that the term owns
(`params['objective'][name]['logit_bias']`). The logit scale is the towers' shared
`exp(params['logit_scale'])`, kept within `model.logit_scale_range` by projection after
every update (hvla.optim.project).

The image side is a view's pooled embedding (`encode_image`), or, with `rois`, the view
run through PyramidCLIP's f1 / f2 split with its regions (`encode_image_with_rois`), whose
`embedding` (the view) or `roi_embedding` (the region sequence) the term reads; with
`concepts`, ViCHA's concept tokens join the view's input (docs/vicha.md).
"""
import jax.numpy as jnp

from hvla.losses import contrastive
from hvla.losses.objective import Pass, Term, register

LOSSES = ("softmax", "sigmoid")
IMAGE_OUTPUTS = ("embedding", "roi_embedding")


def image_pass(view, rois=False, concepts="", outputs=("embedding",)):
  """The image tower's pass on batch['images'][view]: with its regions (batch['rois'])
  through the f1 / f2 split when `rois`, with ViCHA's concept tokens appended to its
  input when `concepts` names their text field (batch['tokens'][concepts]). Terms that
  read the same view with the same options share the pass."""
  inputs = (f"images/{view}",) + (("rois",) if rois else ())
  inputs += (f"tokens/{concepts}",) if concepts else ()
  return Pass("encode_image_with_rois" if rois else "encode_image", inputs, outputs=outputs)


def check_concepts(term, model):
  """A term with `concepts` set needs the model's concept encoder."""
  if term.concepts and model.concept_encoder is None:
    raise ValueError(f"config.objective.terms.{term.name}.concepts={term.concepts!r} needs "
                     "the concept encoder: set model.concept_depth > 0")


@register("clip")
class Clip(Term):
  """Options (the keys of `config.objective.terms.<name>` besides type and weight):

  loss: 'softmax' | 'sigmoid'.
  label_smoothing: alpha of the softened softmax targets (0: plain InfoNCE).
  image_view: batch['images'][image_view] is the image input.
  rois: run the view with its regions (batch['rois']) through the f1 / f2 split.
  image_output: 'embedding', or 'roi_embedding' (needs `rois`).
  concepts: batch['tokens'][concepts] is ViCHA's concept text, appended to the image
    input (needs model.concept_depth > 0); '' none.
  text_field: batch['tokens'][text_field] is the text input.
  bias_init: the initial logit bias b of 'sigmoid' (SigLIP: -10).
  strategy, block_size: how the contrastive term is computed (`contrastive_loss`);
  by default those of `config.objective`.
  """

  def __init__(self, *, loss="softmax", label_smoothing=0.0, image_view="image", rois=False,
               image_output="embedding", concepts="", text_field="caption", bias_init=-10.0,
               strategy="dense", block_size=None):
    if loss not in LOSSES:
      raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if image_output not in IMAGE_OUTPUTS:
      raise ValueError(f"image_output must be one of {IMAGE_OUTPUTS}, got {image_output!r}")
    if image_output == "roi_embedding" and not rois:
      raise ValueError("image_output='roi_embedding' needs rois=True")
    contrastive.check_options(loss, label_smoothing, strategy, block_size)
    self.kind = loss  # `loss` is the method below.
    self.label_smoothing = float(label_smoothing)
    self.image_view, self.rois, self.image_output = image_view, bool(rois), image_output
    self.concepts = concepts
    self.text_field = text_field
    self.bias_init = float(bias_init)
    self.strategy, self.block_size = strategy, block_size

  def passes(self):
    return {"image": image_pass(self.image_view, self.rois, self.concepts,
                                (self.image_output,)),
            "text": Pass("encode_text", (f"tokens/{self.text_field}",))}

  def attach(self, model):
    if self.rois and model.roi_source is None:
      raise ValueError(f"config.objective.terms.{self.name}: rois=True needs the ROI path: "
                       "set model.pyramid.roi.source to 'boxes' or 'features'")
    check_concepts(self, model)

  def init_params(self, rng):
    del rng
    if self.kind != "sigmoid":
      return {}
    return {"logit_bias": jnp.asarray(self.bias_init, jnp.float32)}

  def loss(self, params, state, features, ctx):
    del state, ctx
    scale = jnp.exp(params["logit_scale"])
    metrics = {}
    if self.kind == "sigmoid":
      # SigLIP's logits are scale * x.y + b; the primitive's offset is applied before the
      # scale: s = scale * (x.y - bias), so bias = -b / scale.
      logit_bias = self.own(params)["logit_bias"]
      bias = -logit_bias / scale
      metrics["logit_bias"] = logit_bias
    else:
      bias = 0.0
    value = contrastive.contrastive_loss(
        features["image"][self.image_output], features["text"]["embedding"], scale=scale,
        bias=bias, kind=self.kind, label_smoothing=self.label_smoothing,
        symmetric=self.kind == "softmax", strategy=self.strategy, block_size=self.block_size)
    return value, metrics
