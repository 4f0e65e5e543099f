"""hvla_shapes: determinism, consistency of captions / boxes / labels, the tfds build."""
import io
import os
import threading

import numpy as np
import pytest
from PIL import Image

from hvla.data import pipeline
from hvla.data.datasets import shapes


def _example(i, size=48, textures=True):
  return shapes.make_example(np.random.default_rng([7, 0, i]), size, textures)


def test_examples_are_deterministic():
  a, b = _example(3), _example(3)
  assert a['image'] == b['image'] and a['caption'] == b['caption']
  np.testing.assert_array_equal(a['rois']['boxes'], b['rois']['boxes'])
  assert _example(4)['image'] != a['image']


def test_phrases_name_the_regions_in_caption_order():
  for i in range(50):
    ex = _example(i)
    n = len(ex['rois']['labels'])
    assert 1 <= n <= 4 and ex['count'] == n - 1
    assert ex['phrases'].shape == (n, 2)
    np.testing.assert_array_equal(ex['phrase_boxes'], ex['rois']['boxes'])
    for (s, e), label in zip(ex['phrases'], ex['rois']['labels']):
      phrase = ex['caption'][s:e]
      assert phrase.startswith(('a ', 'an ')) and phrase.endswith(' '.join(label.split()[-2:]))
      assert set(phrase.split()[1:]) <= set(label.split())
    assert ex['tags'] == ', '.join(ex['rois']['labels'])
    assert all(label.split()[-1] in ex['summary'] for label in ex['rois']['labels'])
    assert set(ex['concepts']) >= {label.split()[-1] for label in ex['rois']['labels']}


def test_boxes_are_tight_and_disjoint():
  for i in range(30):
    ex = _example(i, size=96)
    pixels = np.asarray(Image.open(io.BytesIO(ex['image'])), np.int32)
    size = pixels.shape[0]
    boxes = ex['rois']['boxes']
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] > boxes[:, :2])
    for a in range(len(boxes)):
      for b in range(a + 1, len(boxes)):
        overlap = np.minimum(boxes[a, 2:], boxes[b, 2:]) - np.maximum(boxes[a, :2],
                                                                      boxes[b, :2])
        assert np.any(overlap <= 0)
    # Everything outside the (1-pixel grown) boxes is the flat background.
    outside = np.ones((size, size), bool)
    for x0, y0, x1, y1 in np.round(boxes * size).astype(int):
      outside[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = False
    background = pixels[outside]
    assert np.all(np.abs(background - background[0]).max(axis=1) <= 1)
    # And the object inside each box reaches all four sides, within a pixel.
    for x0, y0, x1, y1 in np.round(boxes * size).astype(int):
      ys, xs = np.nonzero(np.abs(pixels[y0:y1, x0:x1] - background[0]).max(axis=-1) > 2)
      assert ys.min() <= 1 and xs.min() <= 1
      assert ys.max() >= y1 - y0 - 2 and xs.max() >= x1 - x0 - 2


def test_labels_are_those_of_the_largest_object():
  for i in range(30):
    objs = shapes.sample_scene(np.random.default_rng([7, 0, i]))
    largest = max(objs, key=lambda o: o.side)
    ex = _example(i)
    assert shapes.SHAPES[ex['shape']] == largest.shape
    assert list(shapes.COLORS)[ex['color']] == largest.color


def test_relations_agree_with_positions():
  checked = 0
  for i in range(200):
    ex = _example(i)
    boxes, spans = ex['rois']['boxes'], ex['phrases']
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    for k in range(0, len(spans) - 1, 2):
      between = ex['caption'][spans[k][1]:spans[k + 1][0]]
      (ax, ay), (bx, by) = centres[k], centres[k + 1]
      expected = {' to the left of ': ax < bx, ' to the right of ': ax > bx,
                  ' above ': ay < by, ' below ': ay > by}
      assert expected[between], (ex['caption'], between)
      checked += 1
  assert checked > 100


def test_config_names_and_validation():
  assert shapes.shapes_config(64, 10, 2, 3, seed=1).name == '64px_10_2_3_seed1'
  assert shapes.shapes_config(textures=False).name.endswith('_plain')
  with pytest.raises(ValueError, match='image_size'):
    shapes.shapes_config(image_size=8)
  with pytest.raises(ValueError, match='num_validation'):
    shapes.shapes_config(num_validation=0)


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  c = pipeline.default_data_config()
  c.data_dir = str(tmp_path_factory.mktemp('tfds'))
  c.shapes.update(image_size=32, num_train=64, num_validation=16, num_test=8, seed=3)
  return c


def test_build_splits_tokenizer_and_class_names(config):
  # Two concurrent callers: one builds, the other waits on the lock and reuses it.
  dirs = []
  threads = [threading.Thread(target=lambda: dirs.append(pipeline.ensure_dataset(config)))
             for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(dirs) == 2 and dirs[0] == dirs[1]
  builder = pipeline.sources.dataset_builder(config)
  assert {s: builder.info.splits[s].num_examples for s in shapes.SPLITS} == {
      'train': 64, 'validation': 16, 'test': 8}
  stamp = os.path.getmtime(os.path.join(dirs[0], 'dataset_info.json'))
  assert pipeline.ensure_dataset(config) == dirs[0]
  assert os.path.getmtime(os.path.join(dirs[0], 'dataset_info.json')) == stamp

  tok = pipeline.tokenizer_for(config)
  assert tok.model_path.startswith(dirs[0])
  assert tok.vocab_size <= shapes.SHAPES_VOCAB_SIZE
  captions = [shapes.make_example(np.random.default_rng([3, 1, i]), 32)['caption']
              for i in range(16)]
  tokens = tok.encode(captions, 64)
  assert not np.any(tokens == 1)  # No unknown pieces on held-out captions.
  assert tok.decode(tokens) == captions

  assert pipeline.class_names(config, 'shape') == list(shapes.SHAPES)
  assert pipeline.class_names(config, 'color') == list(shapes.COLORS)
  assert pipeline.class_names(config, 'count') == list(shapes.COUNTS)
  with pytest.raises(ValueError, match='no feature'):
    pipeline.class_names(config, 'texture')
  with pytest.raises(ValueError, match='not a ClassLabel'):
    pipeline.class_names(config, 'caption')
