"""make_loader: batch layout, sharding, resumption, evaluation padding, bad records."""
import io
import os
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from hvla.data import ops
from hvla.data import pipeline
from hvla.data import tokenizer as tokenizer_lib
from hvla.data import writer

N = 37  # Records of the indexed dataset: label i is record i.


def _png(i, size=(20, 16)):
  buf = io.BytesIO()
  Image.new('RGB', size, (i * 6 % 256, 255 - i * 5 % 256, i * 11 % 256)).save(buf, 'PNG')
  return buf.getvalue()


def _record(i, image=None, caption=None):
  return dict(image=_png(i) if image is None else image,
              caption=f'record number {i}' if caption is None else caption,
              captions=[], summary='', tags='', concepts=[],
              rois=dict(boxes=np.array([[0.1, 0.1, 0.6, 0.9]], np.float32), labels=['x']),
              phrases=np.zeros((0, 2), np.int32), phrase_boxes=np.zeros((0, 4), np.float32),
              label=i)


def _features(num_classes):
  return tfds.features.FeaturesDict({
      **writer.record_features(),
      'label': tfds.features.ClassLabel(num_classes=num_classes)})


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  tok = tokenizer_lib.train_tokenizer(
      [f'record number {i}' for i in range(100)], root / 'tok.model', vocab_size=64)
  indexed = writer.write_dataset(str(root / 'indexed'), 'indexed', _features(N),
                                 {'train': [_record(i) for i in range(N)]}, shard_size=10)
  # A dataset with bad records at known places, plus one record whose bytes are garbage.
  bad_jpeg = _png(0)[:40]
  broken = [_record(i) for i in range(24)]
  broken[3] = _record(3, image=b'\xff\xd8 not a jpeg')
  broken[7] = _record(7, image=bad_jpeg)
  broken[11] = _record(11, caption='  ')
  broken[15] = _record(15, image=_png(15, size=(3, 40)))
  features = _features(24)
  broken_dir = str(root / 'broken')
  os.makedirs(broken_dir)
  path = writer.shard_path(broken_dir, 'broken', 'train', 0, 1)
  w = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  for i, r in enumerate(broken):
    w.write(b'\x00garbage' if i == 19 else features.serialize_example(r))
  w.close()
  writer.write_info(broken_dir, 'broken', features, {'train': [24]})
  shapes_config = pipeline.default_data_config()
  shapes_config.data_dir = str(root / 'tfds')
  shapes_config.shapes.update(image_size=32, num_train=48, num_validation=12, num_test=4)
  return dict(tokenizer=tok.model_path, indexed=indexed, broken=broken_dir,
              shapes=shapes_config)


def _config(data, dataset='indexed', **views):
  c = pipeline.default_data_config()
  c.dataset = data[dataset]
  c.text.tokenizer = data['tokenizer']
  c.text.max_len = 8
  c.labels = ('label',)
  c.views = views or dict(image=dict(size=16))
  return c


def _loader(config, **kw):
  kw = dict(dict(split='train', global_batch_size=8, train=True, seed=0, process_index=0,
                 process_count=1), **kw)
  return pipeline.make_loader(config, **kw)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# -------------------------------------------------------------------------------------
def test_shapes_batch_layout(data):
  c = data['shapes']
  c.views = dict(global_=dict(size=32), local=dict(size=24, crop_scale=(0.5, 1.0),
                                                   color_jitter=0.4, blur_p=0.5))
  c.text.fields = ('caption', 'summary', 'tags', 'concepts')
  c.labels = ('shape', 'color')
  loader = _loader(c, global_batch_size=6)
  batch = next(iter(loader))
  expected = {
      'images': {'global_': ((6, 32, 32, 3), np.float32), 'local': ((6, 24, 24, 3), np.float32)},
      'augs': {'global_': ((6, 11), np.float32), 'local': ((6, 11), np.float32)},
      'tokens': {f: ((6, 40), np.int32) for f in c.text.fields},
      'rois': {'boxes': ((6, 10, 4), np.float32), 'mask': ((6, 10), np.bool_)},
      'phrases': {'spans': ((6, 8, 2), np.int32), 'mask': ((6, 8), np.bool_),
                  'boxes': ((6, 8, 4), np.float32)},
      'labels': {'shape': ((6,), np.int32), 'color': ((6,), np.int32)},
      'valid': ((6,), np.bool_),
  }

  def check(tree, spec):
    assert set(tree) == set(spec)
    for k in spec:
      if isinstance(spec[k], dict):
        check(tree[k], spec[k])
      else:
        assert (tree[k].shape, tree[k].dtype) == (spec[k][0], np.dtype(spec[k][1])), k

  check(batch, expected)
  assert batch['valid'].all()
  for tokens in batch['tokens'].values():  # EOS ends every text, padding follows.
    for row in tokens:
      n = np.count_nonzero(row)
      assert row[n - 1] == tokenizer_lib.EOS and not row[n:].any()
  # Each real phrase spans tokens of the caption and has a box in the global_ view.
  tok = pipeline.tokenizer_for(c)
  phrases = batch['phrases']
  assert phrases['mask'].any(axis=1).all()
  for row in range(6):
    caption = tok.decode(batch['tokens']['caption'][row:row + 1])[0]
    for (s, e), real, box in zip(phrases['spans'][row], phrases['mask'][row],
                                 phrases['boxes'][row]):
      if real:
        words = tok.decode(batch['tokens']['caption'][row:row + 1, s:e])[0].split()
        assert words[0] in ('a', 'an') and ' '.join(words) in caption
        assert box[2] > box[0] and box[3] > box[1]
  assert batch['rois']['mask'].sum(axis=1).max() <= 4
  assert np.all(batch['labels']['shape'] < 8) and np.all(batch['labels']['color'] < 8)
  # A view with colour jitter records non-neutral factors; global_ stays neutral.
  assert np.all(batch['augs']['global_'][:, 5:] == ops.identity_augs()[5:])


def test_images_are_the_recorded_augmentations_of_the_record(data):
  c = _config(data, image=dict(size=12, crop_scale=(0.3, 0.9), flip=True, color_jitter=0.8,
                               grayscale_p=0.5, blur_p=0.5))
  batch = next(iter(_loader(c)))
  source = tfds.builder_from_directory(data['indexed']).as_data_source(
      'train', decoders={'image': tfds.decode.SkipDecoding()})
  for label, augs, image in zip(batch['labels']['label'], batch['augs']['image'],
                                batch['images']['image']):
    img = ops.decode_image(source[int(label)]['image'])
    np.testing.assert_allclose(ops.normalize(ops.apply_augs(img, augs, 12)), image,
                               atol=1e-6)


def test_host_shards_are_disjoint_and_cover_each_epoch(data):
  c = _config(data, image=dict(size=8))
  per_host = []
  for host in range(2):
    it = iter(_loader(c, global_batch_size=8, process_index=host, process_count=2))
    labels = np.concatenate([b['labels']['label'] for b in _take(it, 9)])  # 72 = 2 epochs - 2.
    per_host.append(labels)
  stream = np.stack(per_host, axis=1).reshape(-1)  # Global order: position g on host g % 2.
  assert sorted(stream[:N]) == list(range(N))  # Epoch 1: every record exactly once,
  assert not set(per_host[0][:N // 2]) & set(per_host[1][:N // 2])  # split between hosts.
  assert len(set(stream[N:2 * N - 2])) == N - 2  # Epoch 2: no repeats...
  assert list(stream[N:2 * N]) != list(stream[:N])  # ...in a new order.


def test_seeds_and_epochs(data):
  c = _config(data, image=dict(size=8))
  first = lambda **kw: next(iter(_loader(c, **kw)))['labels']['label']
  np.testing.assert_array_equal(first(seed=1), first(seed=1))
  assert list(first(seed=1)) != list(first(seed=2))
  before = first(seed=1)
  c.shuffle_seed = 5
  assert list(first(seed=1)) != list(before)
  loader = _loader(c, num_epochs=2)
  assert loader.num_batches == 2 * N // 8 == len(loader)
  assert len(list(loader)) == loader.num_batches


def test_resume_in_a_fresh_process_continues_exactly(data, tmp_path):
  c = _config(data, image=dict(size=8, crop_scale=(0.2, 1.0), color_jitter=0.5))
  it = iter(_loader(c, global_batch_size=6))
  _take(it, 4)
  state = it.get_state()
  expected = _take(it, 3)
  script = f"""
import json, sys, numpy as np, ml_collections
from hvla.data import pipeline
config = ml_collections.ConfigDict(json.loads({c.to_json()!r}))
it = iter(pipeline.make_loader(config, split='train', global_batch_size=6, train=True,
                               seed=0, process_index=0, process_count=1))
it.set_state(open({str(tmp_path / 'state')!r}, 'rb').read())
batches = [next(it) for _ in range(3)]
np.savez({str(tmp_path / 'out.npz')!r}, **{{
    f'{{i}}/{{k}}/{{n}}': v for i, b in enumerate(batches)
    for k, d in b.items() if isinstance(d, dict) for n, v in d.items()}},
    **{{f'{{i}}/valid': b['valid'] for i, b in enumerate(batches)}})
"""
  (tmp_path / 'state').write_bytes(state)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', script], check=True, env=env, timeout=300)
  restored = np.load(tmp_path / 'out.npz')
  for i, batch in enumerate(expected):
    np.testing.assert_array_equal(restored[f'{i}/valid'], batch['valid'])
    for key in ('images', 'augs', 'tokens', 'rois', 'labels'):
      for name, value in batch[key].items():
        np.testing.assert_array_equal(restored[f'{i}/{key}/{name}'], value)


def test_orbax_checkpoint_of_the_iterator(data, tmp_path):
  c = _config(data, image=dict(size=8))
  loader = _loader(c)
  it = iter(loader)
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data',)) as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = next(it)
    fresh = iter(loader)
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(next(fresh)['labels']['label'], expected['labels']['label'])


def test_eval_is_one_ordered_pass_padded_to_whole_batches(data):
  c = _config(data, image=dict(size=8, crop_scale=(0.1, 0.2), color_jitter=1.0))
  hosts = []
  for host in range(2):
    loader = _loader(c, train=False, global_batch_size=8, process_index=host,
                     process_count=2)
    batches = list(loader)
    assert len(batches) == loader.num_batches == 5  # ceil(37 / 8), on both hosts.
    assert all(len(b['valid']) == 4 for b in batches)
    hosts.append(batches)
  valid = [np.concatenate([b['valid'] for b in h]) for h in hosts]
  labels = [np.concatenate([b['labels']['label'] for b in h]) for h in hosts]
  assert sum(v.sum() for v in valid) == N
  got = np.concatenate([l[v] for l, v in zip(labels, valid)])
  assert sorted(got) == list(range(N))
  assert all(np.all(np.diff(l[v]) > 0) for l, v in zip(labels, valid))  # In order.
  # No random op: the eval view is the centre crop, recorded as such.
  augs = hosts[0][0]['augs']['image']
  np.testing.assert_allclose(augs, np.tile(ops.identity_augs(ops.center_crop_box(20, 16)),
                                           (4, 1)))


def test_bad_records_are_skipped_in_training_and_masked_in_eval(data):
  c = _config(data, 'broken', image=dict(size=8))
  it = iter(_loader(c, global_batch_size=6))
  labels = np.concatenate([b['labels']['label'] for b in _take(it, 12)])  # Several epochs.
  assert not set(labels) & {3, 7, 11, 15, 19}
  assert set(labels) == set(range(24)) - {3, 7, 11, 15, 19}
  counts = it.bad_records()
  assert counts['undecodable'] >= 2 and counts['empty_caption'] >= 1
  assert counts['too_small'] >= 1 and counts['unreadable'] >= 1
  metrics = it.metrics()
  assert metrics['data/bad_records'] == sum(counts.values())
  # The counters travel with the iterator state.
  fresh = iter(_loader(c, global_batch_size=6))
  fresh.set_state(it.get_state())
  assert fresh.bad_records() == counts

  loader = _loader(c, train=False, global_batch_size=8)
  it = iter(loader)
  batches = list(it)
  valid = np.concatenate([b['valid'] for b in batches])
  assert np.flatnonzero(~valid[:24]).tolist() == [3, 7, 11, 15, 19]
  assert it.bad_records() == {'unreadable': 1, 'malformed': 0, 'undecodable': 2,
                              'too_small': 1, 'too_large': 0, 'bad_aspect': 0,
                              'empty_caption': 1}
  bad_rows = batches[0]['images']['image'][3]
  assert not bad_rows.any()


def test_a_dataset_of_only_bad_records_fails_loudly(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline._DropBadRecords, 'max_consecutive', 20)
  features = _features(4)
  out = writer.write_dataset(str(tmp_path / 'bad'), 'bad', features,
                             {'train': [_record(i, image=b'junk') for i in range(4)]})
  c = pipeline.default_data_config()
  c.dataset, c.text.fields, c.views = out, (), dict(image=dict(size=8))
  with pytest.raises(RuntimeError, match='bad records in a row'):
    next(iter(_loader(c)))


def test_classification_dataset_without_text(data, tmp_path):
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.ClassLabel(names=['cat', 'dog', 'eel'])})
  out = writer.write_dataset(str(tmp_path / 'cls'), 'cls', features,
                             {'test': [dict(image=_png(i), label=i % 3) for i in range(5)]})
  c = pipeline.default_data_config()
  c.dataset, c.text.fields, c.labels = out, (), ('label',)
  batches = list(_loader(c, split='test', train=False, global_batch_size=4))
  assert [b['labels']['label'].tolist() for b in batches] == [[0, 1, 2, 0], [1, 0, 0, 0]]
  assert 'tokens' not in batches[0] and 'phrases' not in batches[0]
  assert not batches[0]['rois']['mask'].any()
  assert pipeline.class_names(c, 'label') == ['cat', 'dog', 'eel']
  c.text.fields = ('caption',)
  with pytest.raises(ValueError, match='text.fields'):
    _loader(c, split='test')


@pytest.mark.parametrize('change,key', [
    (lambda c: c.update(colour='x'), 'colour'),
    (lambda c: c.views.image.update(zoom=2), 'views.image.zoom'),
    (lambda c: c.views.image.update(crop_scale=(0.0, 1.0)), 'views.image.crop_scale'),
    (lambda c: c.views.image.update(crop_scale=(0.5, 1.5)), 'views.image.crop_scale'),
    (lambda c: c.views.image.update(grayscale_p=2.0), 'views.image.grayscale_p'),
    (lambda c: c.update(box_view='local'), 'box_view'),
    (lambda c: c.text.update(fields=('title',)), 'text.fields'),
    (lambda c: c.text.update(max_len=1), 'text.max_len'),
    (lambda c: c.text.update(captions_per_image=0), 'text.captions_per_image'),
    (lambda c: c.text.update(captions_per_image=5, fields=('summary',)),
     'text.captions_per_image'),
    (lambda c: c.rois.update(max_regions=-1), 'rois.max_regions'),
    (lambda c: c.shapes.update(size=3), 'shapes.size'),
    (lambda c: c.shapes.update(image_size=4), 'shapes.image_size'),
])
def test_config_errors_name_the_key(change, key):
  c = pipeline.default_data_config()
  change(c)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    pipeline.validate_data_config(c)


def test_loader_argument_errors(data):
  c = _config(data)
  with pytest.raises(ValueError, match='multiple of process_count'):
    _loader(c, global_batch_size=7, process_count=2)
  with pytest.raises(ValueError, match='less than one global batch'):
    _loader(c, global_batch_size=64, num_epochs=1)
  with pytest.raises(ValueError, match='seed'):
    _loader(c, seed=-1)
  c.labels = ('species',)
  with pytest.raises(ValueError, match='species'):
    _loader(c)


def test_dataset_resolution_errors(data, tmp_path):
  c = _config(data)
  c.dataset = 'no_such_dataset_anywhere'
  with pytest.raises(ValueError, match='config.data.dataset'):
    _loader(c)
  c.dataset = str(tmp_path)
  with pytest.raises(ValueError, match='dataset_info.json'):
    _loader(c)
  c.dataset, c.text.tokenizer = data['indexed'], None  # No tokenizer.model stored with it.
  with pytest.raises(ValueError, match='train_tokenizer'):
    pipeline.tokenizer_for(c)
  c.text.tokenizer = data['tokenizer']
  with pytest.raises(ValueError, match="split 'validation'"):
    _loader(c, split='validation')


def test_stored_phrases_follow_only_their_caption(data, tmp_path):
  """Training draws among `captions`; the stored phrases and boxes index `caption` only,
  another drawn caption gets chunked phrases without boxes."""
  record = _record(0, caption='record number 1')
  record.update(captions=['record number 1', 'record number 2'],
                phrases=np.array([[0, 6]], np.int32),
                phrase_boxes=np.array([[0.2, 0.2, 0.8, 0.8]], np.float32))
  c = _config(data, image=dict(size=8))
  c.dataset = writer.write_dataset(str(tmp_path / 'two'), 'two', _features(1),
                                   {'train': [record]})
  tok = tokenizer_lib.Tokenizer(data['tokenizer'])
  first, second = tok.encode(['record number 1', 'record number 2'], 8)
  batch = next(iter(_loader(c, global_batch_size=16)))  # 16 epochs of the one record.
  is_first = (batch['tokens']['caption'] == first).all(axis=1)
  assert is_first.any() and ((batch['tokens']['caption'] == second).all(axis=1)
                             == ~is_first).all()
  phrases = batch['phrases']
  np.testing.assert_array_equal(phrases['spans'][is_first, 0], [[0, 1]] * is_first.sum())
  assert phrases['boxes'][is_first, 0].all() and not phrases['boxes'][~is_first].any()
  assert phrases['mask'][~is_first, 0].all()  # Chunked from the drawn caption.
