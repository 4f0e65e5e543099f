"""Synthetic batches have the fields, shapes and dtypes of the pipeline's real ones."""
import jax
import numpy as np
import pytest

from configs import clip_vitb16
from configs import pyramid_vitb16
from hvla.data import pipeline
from hvla.data import synthetic
from hvla.data import tokenizer


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def structure(tree):
  """{'a/b': (shape, dtype)} of a tree of arrays or of jax.ShapeDtypeStructs."""
  return {jax.tree_util.keystr(path, simple=True, separator='/'): (x.shape, np.dtype(x.dtype))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('config_module', [clip_vitb16, pyramid_vitb16],
                         ids=['clip', 'pyramid'])
def test_synthetic_batch_matches_the_pipeline_batch(config_module, data_dir):
  config = config_module.get_config('runlocal').data
  config.data_dir = str(data_dir)  # the built-in hvla_shapes, small
  config.shapes.update(image_size=32, num_train=16, num_validation=8, num_test=8)
  loader = pipeline.make_loader(config, split='train', global_batch_size=4, train=True,
                                seed=0, process_index=0, process_count=1)
  real = structure(next(iter(loader)))
  spec = synthetic.batch_spec(config, 4)
  assert structure(spec) == real
  vocab_size = 64
  batch = synthetic.batch(spec, vocab_size)
  assert structure(batch) == real
  for tokens in batch['tokens'].values():
    assert np.all(tokens[:, -1] == tokenizer.EOS)
    assert np.all((tokens[:, :-1] > tokenizer.EOS) & (tokens[:, :-1] < vocab_size))
  assert batch['valid'].all() and batch['rois']['mask'].all()
  x0, y0, x1, y1 = np.moveaxis(batch['rois']['boxes'], -1, 0)
  assert np.all((0 <= x0) & (x0 < x1) & (x1 <= 1) & (0 <= y0) & (y0 < y1) & (y1 <= 1))
  again = synthetic.batch(spec, vocab_size)
  jax.tree.map(np.testing.assert_array_equal, batch, again)  # the seed fixes the values
