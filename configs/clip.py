"""Shared body of the CLIP baseline configs (clip_vitb16.py, clip_vitb32.py)."""
import math

from configs import common
from hvla import losses


def get_clip_config(arg, patch_size):
  """CLIP with a ViT-B/`patch_size` image tower, as in the PyramidCLIP baselines."""
  arg = common.parse_arg(arg, runlocal=False, evals=True, loss="softmax", batch=0,
                         steps=0, data="")
  config = common.yfcc_recipe()
  config.model.image.patch_size = patch_size
  config.data.dataset = common.YFCC
  config.data.views.image.size = config.model.image.image_size
  config.data.text.max_len = config.model.text.max_len
  config.objective.terms = {"clip": losses.term_config("clip", loss=arg.loss)}
  if arg.loss == "sigmoid":  # SigLIP: logit scale ln 10, bias -10 (the term's bias_init).
    config.model.logit_scale_init = math.log(10.0)
  if arg.runlocal:
    common.runlocal(config)
  return common.apply_run_args(config, arg, eval_view="image")
