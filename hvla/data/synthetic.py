"""Batches shaped exactly like the pipeline's for a data config, made of random values.

`batch_spec(config.data, batch_size)` is the shape and dtype of every field of the host
batches that `pipeline.make_loader(config.data, ..., train=True)` yields from a dataset
of hvla's record schema (`writer.record_features`, whose fields the built-in hvla_shapes
has too), worked out from the config alone: no dataset is opened. `batch(spec,
vocab_size)` fills such a spec with random values that the towers and objectives accept.
The benchmarks and the ahead-of-time memory check compile and run the train step on them.
"""
import jax
import numpy as np

from hvla.data import config as data_config_lib
from hvla.data import examples
from hvla.data import tokenizer
from hvla.data import writer


def batch_spec(data_config, batch_size):
  """jax.ShapeDtypeStructs of a host batch of `batch_size` training examples."""
  views = data_config_lib.validate_data_config(data_config)
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct((batch_size,) + s[0], s[1]),
      examples.layout(data_config, views, features=writer.record_features()),
      is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple))


def batch(spec, vocab_size, seed=0):
  """Random host arrays for a batch spec: tokens in the vocabulary, EOS-terminated."""
  rng = np.random.default_rng(seed)

  def make(path, s):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.startswith("tokens/"):
      tokens = rng.integers(tokenizer.EOS + 1, vocab_size, s.shape).astype(s.dtype)
      tokens[..., -1] = tokenizer.EOS
      return tokens
    if s.dtype == np.bool_:
      return np.ones(s.shape, bool)
    if np.issubdtype(s.dtype, np.integer):
      return np.zeros(s.shape, s.dtype)
    if name.startswith("rois/boxes") or name.startswith("phrases/boxes"):
      return np.tile(np.array([0.1, 0.1, 0.6, 0.6], s.dtype), s.shape[:-1] + (1,))
    return rng.standard_normal(s.shape).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(make, spec)
