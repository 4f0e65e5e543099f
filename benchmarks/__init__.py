r"""Speed references: hvla's train step against other codebases' trainers.

Not part of the installed `hvla` package (setup.py installs `hvla` only), since these
modules run other codebases (transformers' Flax CLIP, a big_vision checkout). Run them
from the repository root:

  pip install -e ".[reference]"
  python -m benchmarks.reference --config=configs/clip_vitb16.py --batch=8

`reference` is the driver; `reference_transformers` and `reference_big_vision` build
each reference's step. hvla's own measurements (`--aot`, `--largest_batch`, variants)
are `python -m hvla.tools.benchmark`.
"""
