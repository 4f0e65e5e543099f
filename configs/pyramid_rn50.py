r"""PyramidCLIP, CLIP's modified ResNet-50 image tower (f1 = trunk, f2 = attention pool)
+ 12x512 text transformer with max pooling, joint width 1024.

Run (a laptop CPU, minutes, the built-in hvla_shapes data; 200 steps, evaluated at the
end):
  python -m hvla.main --config=configs/pyramid_rn50.py:runlocal --workdir=/tmp/pyramid_rn50

Run (accelerators; data built with hvla.tools.build_dataset):
  python -m hvla.main --config=configs/pyramid_rn50.py:data=yfcc15m_v2 \
      --workdir=gs://.../pyramid_rn50

Arguments: runlocal, evals=false, batch=N, steps=N, data=TFDS_NAME_OR_DIR (trains on it
and evaluates with its own evals, docs/data.md),
roi=boxes|features, alpha=, lam=, mu=, siglip=W
(adds a SigLIP term of weight W on the local view and the caption).

Expected: ImageNet zero-shot top-1 47.8% after 32 epochs of YFCC15M-V2 at batch 4096
(CLIP at equal data: 37.2%) [paper]. runlocal (a 1-1-1-1 block ResNet of width 16 at
64 px), measured by hvla on a 2-core CPU with
`hvla.tools.compare --configs=pyramid_rn50 --steps=300` (300 steps at batch 64,
hvla_shapes validation, 2026-12-02): zero-shot shape top-1 20.1%, colour top-1 75.0%,
retrieval R@1 image->text 28.2% and text->image 29.4%, grounding pointing 6.2% (on the
2x2 grid of the trunk's output).
"""
from configs import pyramid


def get_config(arg=None):
  return pyramid.get_pyramid_config(arg)
