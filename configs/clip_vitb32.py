r"""CLIP baseline, ViT-B/32 image tower + 12x512 text transformer (~150M parameters).

Run (a laptop CPU, minutes, the built-in hvla_shapes data):
  python -m hvla.main --config=configs/clip_vitb32.py:runlocal --workdir=/tmp/clip_b32

Run (accelerators; data built with hvla.tools.build_dataset):
  python -m hvla.main --config=configs/clip_vitb32.py:data=yfcc15m_v2 --workdir=gs://.../clip_b32

Arguments: runlocal, evals=false, loss=softmax|sigmoid, batch=N, steps=N, data=TFDS_NAME_OR_DIR
(with or without runlocal: trains on it and evaluates with its own evals, docs/data.md).

Expected: ImageNet zero-shot top-1 32.8% after 32 epochs of YFCC15M-V2 at batch 4096
(the CLIP baseline reported with PyramidCLIP). runlocal: see README "Results" (measured).
"""
from configs import clip


def get_config(arg=None):
  return clip.get_clip_config(arg, patch_size=32)
