r"""PyramidCLIP, ViT-B/32 image tower (LeFF in f1, frozen patch embedding) + 12x512
text transformer with max pooling (~150M parameters).

Run (a laptop CPU, minutes, the built-in hvla_shapes data; 200 steps, evaluated at the
end):
  python -m hvla.main --config=configs/pyramid_vitb32.py:runlocal --workdir=/tmp/pyramid_b32

Run (accelerators; data built with hvla.tools.build_dataset):
  python -m hvla.main --config=configs/pyramid_vitb32.py:data=yfcc15m_v2 \
      --workdir=gs://.../pyramid_b32

Against the CLIP baseline at equal steps, data and towers:
  python -m hvla.tools.compare --configs=clip_vitb32,pyramid_vitb32 --workdir=/tmp/compare

Arguments: runlocal, evals=false, batch=N, steps=N, data=TFDS_NAME_OR_DIR (trains on it
and evaluates with its own evals, docs/data.md),
roi=boxes|features, leff=true|false, freeze_patch_embed=true|false, alpha=, lam=, mu=, siglip=W
(adds a SigLIP term of weight W on the local view and the caption).

Expected: ImageNet zero-shot top-1 46.0% after 32 epochs of YFCC15M-V2 at batch 4096
(CLIP at equal data: 32.8%) [paper]. runlocal shrinks the towers to those of
pyramid_vitb16's runlocal (8 px patches), so its measured numbers are the ones in
configs/pyramid_vitb16.py and README "Results" (its runlocal time too).
"""
from configs import pyramid


def get_config(arg=None):
  return pyramid.get_pyramid_config(arg, patch_size=32)
