"""configs/clip_vitb16.py:runlocal with the test-only momentum term (tests/momentum_term.py)
in place of CLIP's; it registers the term, so a separate `hvla.main` process can run it."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs import clip_vitb16  # noqa: E402
import momentum_term  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg=None):
  config = clip_vitb16.get_config(arg)
  config.objective.terms = {"momentum": dict(type=momentum_term.TYPE,
                                             embed_dim=config.model.embed_dim)}
  return config
