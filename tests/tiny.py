"""Tiny towers for the trainer-level tests: a runlocal config shrunk to 32 px images,
width-32 towers and 16-token texts, so that a train step compiles in seconds."""


def shrink(config, *, image_depth=2, text_depth=2, batch_size=16):
  """`config` (a runlocal config) with tiny towers and data of matching sizes."""
  config.batch_size = batch_size
  config.model.image.update(image_size=32, patch_size=8, width=32, depth=image_depth,
                            heads=2)
  config.model.text.update(width=32, depth=text_depth, heads=2, max_len=16)
  config.model.embed_dim = 32
  config.data.text.max_len = 16
  for view in config.data.views.values():
    view.size = 32
  config.evals = {}
  return config
