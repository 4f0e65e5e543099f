"""Shared body of the PyramidCLIP configs (pyramid_vitb16.py, pyramid_vitb32.py,
pyramid_rn50.py); docs/pyramid.md explains every switch.

Arguments (after the colon): runlocal, evals=false, batch=N, steps=N, data=NAME,
roi=boxes|features, alpha=, lam=, mu=, and for the ViT configs leff=true|false and
freeze_patch_embed=true|false (both on by default, as in the official model).
siglip=W adds a SigLIP term of weight W on (local view, caption) beside the six: a
combination of methods, read from the same tower passes (no tower runs twice).
"""
import ml_collections

from configs import common
from hvla import evaluators
from hvla import losses
from hvla.losses import pyramid
from hvla.models import resnet

# Train-time views [recon]: the global view barely crops, the local view crops more.
GLOBAL_CROP_SCALE = (0.9, 1.0)
LOCAL_CROP_SCALE = (0.5, 1.0)
PATCH_EMBEDDING = r"^img/embedding/"  # The ViT's patch embedding kernel, for freezing.


def get_pyramid_config(arg, *, patch_size=None):
  """PyramidCLIP with a ViT-B/`patch_size` image tower, or CLIP's RN50 when None."""
  vit = patch_size is not None
  spec = dict(runlocal=False, evals=True, batch=0, steps=0, data="", roi="boxes",
              alpha=0.2, lam=1 / 3, mu=1 / 3, siglip=0.0)
  if vit:
    spec.update(leff=True, freeze_patch_embed=True)
  arg = common.parse_arg(arg, **spec)

  config = common.yfcc_recipe()
  model = config.model
  model.text.pooling = "max"  # [paper]
  model.pyramid.roi.source = arg.roi
  if vit:
    model.image.patch_size = patch_size
    model.pyramid.leff = arg.leff
    if arg.freeze_patch_embed:
      config.optimizer.freeze = (PATCH_EMBEDDING,)
  else:
    model.image = resnet.default_rn50_config()
    model.embed_dim = 1024

  data = config.data
  data.dataset = common.YFCC
  data.views = {"global": dict(crop_scale=GLOBAL_CROP_SCALE, size=224),
                "local": dict(crop_scale=LOCAL_CROP_SCALE, size=224)}
  data.box_view = "global"  # The objective's regions are those of the global view.
  data.text.fields = ("caption", "summary", "tags")
  data.text.max_len = model.text.max_len = 77
  data.rois.max_regions = 10  # [paper]

  config.objective.terms = pyramid.terms(alpha=arg.alpha, lam=arg.lam, mu=arg.mu)
  if arg.siglip:
    config.objective.terms.siglip = losses.term_config(
        "clip", weight=arg.siglip, loss="sigmoid", image_view="local", text_field="caption")
  if arg.runlocal:
    runlocal(config, vit)
  return common.apply_run_args(config, arg, eval_view="global",
                               eval_every=RUNLOCAL_STEPS if arg.runlocal else None)


# A PyramidCLIP step runs the image tower on two views and the text tower on three texts:
# runlocal trains fewer steps than CLIP's and evaluates once, at the end, to stay within
# minutes on a laptop CPU.
RUNLOCAL_STEPS = 200


def runlocal(config, vit):
  """`common.runlocal`'s tiny towers and hvla_shapes for RUNLOCAL_STEPS steps, evaluated
  on the global view at the end."""
  common.runlocal(config)
  config.total_steps = RUNLOCAL_STEPS
  if not vit:
    config.model.image = ml_collections.ConfigDict(dict(
        name="resnet", image_size=64, layers=(1, 1, 1, 1), width=16, heads=8,
        output_dim=128, norm_groups=8))
  config.evals = shapes_evals(every_steps=RUNLOCAL_STEPS, view="global")


def shapes_evals(every_steps, view):
  """common.shapes_evals on `view`, plus phrase grounding."""
  evals = common.shapes_evals(every_steps)
  for ev in evals.values():
    ev.view = view
  evals.grounding = evaluators.default_eval_config(
      "grounding", every_steps=every_steps, split="validation", view=view)
  return evals
