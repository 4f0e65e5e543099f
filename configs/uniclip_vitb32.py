r"""UniCLIP, ViT-B/32 image tower + 12x512 text transformer: MP-NCE over two augmented
views and the caption of every image, domain-dependent temperatures and offsets, and
the augmentation-aware embedding; docs/unified.md explains every switch.

Run (a laptop CPU, minutes, the built-in hvla_shapes data):
  python -m hvla.main --config=configs/uniclip_vitb32.py:runlocal --workdir=/tmp/uniclip_b32

Run (accelerators; data built with hvla.tools.build_dataset):
  python -m hvla.main --config=configs/uniclip_vitb32.py:data=yfcc15m_v2 \
      --workdir=gs://.../uniclip_b32

Against the CLIP baseline at equal steps and data:
  python -m hvla.tools.compare --configs=clip_vitb32,uniclip_vitb32 --workdir=/tmp/compare

Arguments: runlocal, evals=false, batch=N, steps=N, data=TFDS_NAME_OR_DIR,
aware=true|false (the augmentation-aware embedding; false: the towers' own),
image_image=true|false and text_text=true|false (score those domain pairs).

Recipe [ours]: the schedule of hvla's CLIP baselines (32 epochs of YFCC15M-V2 at batch
4096, common.yfcc_recipe), so that the two compare at equal data; UniCLIP's own runs
used other corpora. Views [ours]: SimCLR's kinds of augmentation (crop, flip, colour
jitter, grayscale, blur), the crop no smaller than 40% of the image because captions
describe the whole of it. runlocal keeps flips off (hvla_shapes captions say "left of")
and the colour jitter mild (they name colours).

runlocal trains 300 steps at batch 64 and evaluates at the end: about 5 minutes of
training and 1 of evaluation on a busy 2-core CPU. Measured by hvla with
`hvla.tools.compare --configs=clip_vitb32,uniclip_vitb32 --steps=300` (the same 300
steps, hvla_shapes validation, 2026-12-02; CLIP at 300 steps in brackets): zero-shot
shape top-1 19.6% (18.2%), colour 72.1% (70.9%), retrieval R@1 image->text 32.0%
(37.3%) and text->image 26.7% (37.1%), grounding pointing 22.3% (18.0%). README "Results" has the full table.
"""
from configs import common
from hvla import losses

AUG_MLP_WIDTH = 256  # [ours]
VIEWS = ("view1", "view2")
# Two image views per step: runlocal trains half CLIP's steps and evaluates at the end, to
# stay within minutes on a laptop CPU.
RUNLOCAL_STEPS = 300
TRAIN_VIEW = dict(size=224, crop_scale=(0.4, 1.0), flip=True, color_jitter=0.4,
                  color_jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0))
RUNLOCAL_VIEW = dict(crop_scale=(0.5, 1.0), flip=False, color_jitter=0.2, color_jitter_p=0.8,
                     grayscale_p=0.05, blur_p=0.2, blur_sigma=(0.1, 1.0))


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, evals=True, batch=0, steps=0,
                         data="", aware=True, image_image=True, text_text=True)
  config = common.yfcc_recipe()
  config.model.image.patch_size = 32
  config.model.aug_mlp_width = AUG_MLP_WIDTH if arg.aware else 0
  config.data.dataset = common.YFCC
  config.data.views = {v: dict(TRAIN_VIEW) for v in VIEWS}
  config.data.text.max_len = config.model.text.max_len
  pairs = [p for p, on in (("image_image", arg.image_image), ("image_text", True),
                           ("text_text", arg.text_text)) if on]
  config.objective.terms = {"unified": losses.term_config(
      "unified", views=VIEWS, pairs=tuple(pairs), augmentation_aware=arg.aware)}
  if arg.runlocal:
    common.runlocal(config)
    config.total_steps = RUNLOCAL_STEPS
    config.evals = common.shapes_evals(every_steps=RUNLOCAL_STEPS)
    for view in config.data.views.values():
      view.update(RUNLOCAL_VIEW)
    for ev in config.evals.values():
      ev.view = VIEWS[0]  # Evaluated without augmentation (resize and centre crop).
  return common.apply_run_args(config, arg, eval_view=VIEWS[0],
                               eval_every=RUNLOCAL_STEPS if arg.runlocal else None)
