r"""PyramidCLIP, ViT-B/16 image tower (LeFF in f1, frozen patch embedding) + 12x512
text transformer with max pooling (~150M parameters).

Run (a laptop CPU, minutes, the built-in hvla_shapes data; 200 steps, evaluated at the
end):
  python -m hvla.main --config=configs/pyramid_vitb16.py:runlocal --workdir=/tmp/pyramid_b16

Run (accelerators; data built with hvla.tools.build_dataset):
  python -m hvla.main --config=configs/pyramid_vitb16.py:data=yfcc15m_v2 \
      --workdir=gs://.../pyramid_b16

Against the CLIP baseline at equal steps, data and towers:
  python -m hvla.tools.compare --configs=clip_vitb16,pyramid_vitb16 --workdir=/tmp/compare

Arguments: runlocal, evals=false, batch=N, steps=N, data=TFDS_NAME_OR_DIR (trains on it
and evaluates with its own evals, docs/data.md),
roi=boxes|features, leff=true|false, freeze_patch_embed=true|false, alpha=, lam=, mu=,
siglip=W (adds a SigLIP term of weight W on the local view and the caption).

Expected: ImageNet zero-shot top-1 50.7% after 32 epochs of YFCC15M-V2 at batch 4096
(CLIP at equal data: 40.7%) [paper]. runlocal, measured by hvla on a 2-core CPU with
`hvla.tools.compare --configs=clip_vitb16,pyramid_vitb16 --steps=300` (300 steps at
batch 64, hvla_shapes validation, 2026-12-02; CLIP in brackets): zero-shot shape top-1
22.7% (18.2%), colour top-1 62.9% (70.9%), retrieval R@1 image->text 43.8% (37.3%) and
text->image 41.1% (37.1%), grounding pointing 6.1% (18.0%). README "Results" has the
full table. runlocal itself (200 steps at batch 64), measured 2026-12-02 on a 2-core CPU
that was running a test suite at the same time: 9 min 32 s from start to the final
evaluation; zero-shot shape top-1 20.5%, colour top-1 63.1%, retrieval R@1 image->text
35.5% and text->image 32.5%, grounding pointing 6.4%.
"""
from configs import pyramid


def get_config(arg=None):
  return pyramid.get_pyramid_config(arg, patch_size=16)
