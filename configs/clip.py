"""Shared body of the CLIP baseline configs (clip_vitb16.py, clip_vitb32.py)."""
import math

from configs import common
from hvla import config as config_lib


def get_clip_config(arg, patch_size):
  """CLIP with a ViT-B/`patch_size` image tower, as in the PyramidCLIP baselines."""
  arg = common.parse_arg(arg, runlocal=False, evals=True, loss="softmax", batch=0,
                         steps=0, data="yfcc15m_v2")
  config = config_lib.base_config()
  config.batch_size = 4096
  config.total_epochs = 32.0
  config.schedule.warmup_epochs = 1.0
  config.optimizer.lr = 5e-4
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.1
  config.model.image.patch_size = patch_size
  config.model.dtype = "bfloat16"
  config.data.dataset = arg.data
  config.data.views.image.size = config.model.image.image_size
  config.data.text.max_len = config.model.text.max_len
  config.objective.name = "clip"
  config.objective.loss = arg.loss
  common.contrastive_execution(config.objective)
  if arg.loss == "sigmoid":  # SigLIP: logit scale ln 10, bias -10.
    config.model.logit_scale_init = math.log(10.0)
    config.model.logit_bias_init = -10.0
  config.log_every = 100
  config.checkpoint_every = 2000
  if arg.runlocal:
    common.runlocal(config)
  if not arg.evals:
    config.evals = {}
  if arg.batch:
    config.batch_size = arg.batch
  if arg.steps:
    config.total_steps, config.total_epochs = arg.steps, None
  return config
