"""Ingestion of the three input formats, bad images, sidecars and resumption."""
import csv
import dataclasses
import io
import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from hvla.data import ingest
from hvla.data import pipeline


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _images():
  """name -> (bytes, expected outcome: None if kept, else the skip reason)."""
  rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8))
  rgba = Image.new('RGBA', (32, 24), (255, 0, 0, 0))
  good_jpeg = _encode(rgb, 'JPEG')
  return {
      'rgb_jpeg': (good_jpeg, None),
      'rgba_png': (_encode(rgba, 'PNG'), None),
      'gray_png': (_encode(rgb.convert('L'), 'PNG'), None),
      'cmyk_jpeg': (_encode(rgb.convert('CMYK'), 'JPEG'), None),
      'palette_gif': (_encode(rgb.convert('P'), 'GIF'), None),
      'deep_png': (_encode(Image.fromarray(
          np.full((20, 20), 40000, np.uint16)), 'PNG'), None),
      'truncated': (good_jpeg[:len(good_jpeg) // 2], 'undecodable'),
      'garbage': (b'not an image at all', 'undecodable'),
      'tiny': (_encode(Image.new('RGB', (4, 4)), 'PNG'), 'too_small'),
      'sliver': (_encode(Image.new('RGB', (400, 10)), 'PNG'), 'bad_aspect'),
  }


def _expected(images):
  kept = sum(reason is None for _, reason in images.values())
  skipped = {}
  for _, reason in images.values():
    if reason:
      skipped[reason] = skipped.get(reason, 0) + 1
  return kept, skipped


def _read_split(out_dir, split='train'):
  builder = tfds.builder_from_directory(out_dir)
  source = builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


def _check_images_are_rgb(records):
  for r in records:
    assert Image.open(io.BytesIO(r['image'])).convert('RGB').size[0] >= 8
    assert Image.open(io.BytesIO(r['image'])).mode == 'RGB'


def test_rows_jsonl_with_inline_fields_and_bad_images(tmp_path):
  images = _images()
  (tmp_path / 'imgs').mkdir()
  rows = []
  for name, (data, _) in images.items():
    (tmp_path / 'imgs' / f'{name}.img').write_bytes(data)
    rows.append({'image': f'{name}.img', 'caption': f'a picture called {name}'})
  rows[0].update(summary='a picture', tags=['picture', 'noise'], concepts=['noise'],
                 rois={'boxes': [[0.1, 0.2, 0.5, 0.9]], 'labels': ['blob']},
                 phrases=[[0, 9]], phrase_boxes=[[0.1, 0.2, 0.5, 0.9]])
  rows.append({'image': 'missing.img', 'caption': 'nothing here'})
  for name in ('blank', 'badbox'):  # Rows naming one image would be one record.
    (tmp_path / 'imgs' / f'{name}.img').write_bytes(images['rgb_jpeg'][0])
  rows.append({'image': 'blank.img', 'caption': '   '})
  rows.append({'image': 'badbox.img', 'caption': 'bad box', 'key': 'badbox',
               'rois': {'boxes': [[0.5, 0.5, 0.2, 0.2]]}})
  jsonl = tmp_path / 'rows.jsonl'
  jsonl.write_text('\n'.join(json.dumps(r) for r in rows))
  out = str(tmp_path / 'out')
  opts = ingest.Options(out_dir=out, name='mini', image_dir=str(tmp_path / 'imgs'))
  report = ingest.build([str(jsonl)], opts, shard_size=4, progress=False)

  kept, skipped = _expected(images)
  skipped.update(missing_image=1, empty_caption=1, malformed=1)
  assert report['written'] == kept
  assert report['skipped'] == skipped
  assert report['examples']['malformed'] == ['badbox']
  assert len(report['shard_lengths']) == 4  # 13 rows in shards of 4.
  records = _read_split(out)
  assert len(records) == kept
  _check_images_are_rgb(records)
  first = records[0]
  assert first['caption'] == b'a picture called rgb_jpeg'
  assert first['tags'] == b'picture, noise' and first['summary'] == b'a picture'
  np.testing.assert_allclose(first['rois']['boxes'], [[0.1, 0.2, 0.5, 0.9]])
  np.testing.assert_array_equal(first['phrases'], [[0, 9]])
  assert records[1]['rois']['boxes'].shape == (0, 4)  # Absent: empty.
  # Transparent pixels became white.
  rgba = next(r for r in records if r['caption'].endswith(b'rgba_png'))
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rgba['image'])))[0, 0],
                                [255, 255, 255])


@pytest.mark.parametrize('delimiter,suffix', [(',', 'csv'), ('\t', 'tsv')])
def test_rows_csv_tsv_with_sidecar(tmp_path, delimiter, suffix):
  images = {k: v for k, v in _images().items() if k in ('rgb_jpeg', 'gray_png', 'garbage')}
  for name, (data, _) in images.items():
    (tmp_path / f'{name}.png').write_bytes(data)
  path = tmp_path / f'rows.{suffix}'
  with open(path, 'w', newline='') as f:
    w = csv.writer(f, delimiter=delimiter)
    w.writerow(['file', 'text'])
    for name in images:
      w.writerow([f'{name}.png', f'caption of {name}'])
  sidecar = tmp_path / 'side.jsonl'
  sidecar.write_text(json.dumps({'key': 'gray_png', 'summary': 'gray', 'concepts': ['x']}))
  out = str(tmp_path / 'out')
  opts = ingest.Options(out_dir=out, name='mini', image_key='file', caption_key='text',
                        sidecar=str(sidecar))
  report = ingest.build([str(path)], opts, progress=False)
  assert report['written'] == 2 and report['skipped'] == {'undecodable': 1}
  records = {r['caption']: r for r in _read_split(out)}
  assert records[b'caption of gray_png']['summary'] == b'gray'
  assert list(records[b'caption of gray_png']['concepts']) == [b'x']
  assert records[b'caption of rgb_jpeg']['summary'] == b''


def _write_tar(path, samples):
  with tarfile.open(path, 'w') as tar:
    for name, data in samples:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_in_parallel_and_resume(tmp_path):
  images = _images()
  names = list(images)
  shards = []
  for s in range(2):
    samples = []
    for i, name in enumerate(names[s::2]):
      key = f'{s:03d}{i:04d}'
      samples.append((f'{key}.jpg', images[name][0]))
      if i % 2:
        samples.append((f'{key}.json', json.dumps(
            {'caption': f'json caption {name}', 'tags': 'a, b'}).encode()))
      else:
        samples.append((f'{key}.txt', f'txt caption {name}'.encode()))
    samples.append(('{:03d}9999.txt'.format(s), b'a caption without image'))
    shards.append(str(tmp_path / f'{s:05d}.tar'))
    _write_tar(shards[-1], samples)
  out = str(tmp_path / 'out')
  opts = ingest.Options(out_dir=out, name='wds')
  report = ingest.build(shards, opts, workers=2, progress=False)
  kept, skipped = _expected(images)
  skipped['missing_image'] = 2
  assert report['written'] == kept and report['skipped'] == skipped
  assert report['shards_built'] == 2
  records = _read_split(out)
  assert len(records) == kept
  assert any(r['tags'] == b'a, b' for r in records)
  _check_images_are_rgb(records)

  # An interruption loses shard 1 (its report is the completion marker): only it is redone.
  os.remove(os.path.join(out, 'wds-train.array_record-00001-of-00002.report.json'))
  os.remove(os.path.join(out, 'dataset_info.json'))
  report = ingest.build(shards, opts, progress=False)
  assert report['shards_built'] == 1 and report['written'] == kept
  assert [r['caption'] for r in _read_split(out)] == [r['caption'] for r in records]


def test_tfrecord_and_a_second_split(tmp_path):
  import tensorflow as tf
  images = _images()
  path = str(tmp_path / 'data.tfrecord')
  with tf.io.TFRecordWriter(path) as w:
    for name, (data, _) in images.items():
      ex = tf.train.Example(features=tf.train.Features(feature={
          'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
          'caption': tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[f'record {name}'.encode()])),
          'key': tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
      }))
      w.write(ex.SerializeToString())
  sidecar = tmp_path / 'side.jsonl'
  sidecar.write_text(json.dumps({'key': 'rgb_jpeg', 'rois': {
      'boxes': [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], 'labels': ['a', 'b']}}))
  out = str(tmp_path / 'out')
  for split in ('train', 'validation'):
    opts = ingest.Options(out_dir=out, name='tfr', split=split, sidecar=str(sidecar))
    report = ingest.build([path], opts, progress=False)
    kept, skipped = _expected(images)
    assert report['written'] == kept and report['skipped'] == skipped
  builder = tfds.builder_from_directory(out)
  assert set(builder.info.splits) == {'train', 'validation'}
  records = _read_split(out, 'validation')
  first = next(r for r in records if r['caption'] == b'record rgb_jpeg')
  assert [x.decode() for x in first['rois']['labels']] == ['a', 'b']

  # The built dataset feeds the pipeline with its regions in the eval view.
  config = pipeline.default_data_config()
  config.dataset, config.text.fields = out, ()
  config.views = dict(image=dict(size=16))
  batches = list(pipeline.make_loader(config, split='validation', global_batch_size=4,
                                      train=False, seed=0, process_index=0,
                                      process_count=1))
  valid = np.concatenate([b['valid'] for b in batches])
  assert valid.sum() == kept
  masks = np.concatenate([b['rois']['mask'] for b in batches])[valid]
  assert masks.sum() == 2  # Both boxes of rgb_jpeg are mostly inside its centre crop.


def test_region_features_and_downscaling(tmp_path):
  big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 90, 3), np.uint8))
  (tmp_path / 'big.jpg').write_bytes(_encode(big, 'JPEG'))
  feats = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
  rows = [{'image': 'big.jpg', 'caption': 'two regions', 'key': 'ok',
           'rois': {'boxes': [[0.3, 0.1, 0.5, 0.5], [0.4, 0.5, 0.7, 0.9]],
                    'labels': ['a', 'b'], 'features': feats}},
          {'image': 'big.jpg', 'caption': 'ragged', 'key': 'ragged',
           'rois': {'boxes': [[0.1, 0.1, 0.2, 0.2]], 'features': [[1.0, 2.0]]}}]
  (tmp_path / 'rows.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
  out = str(tmp_path / 'out')
  opts = ingest.Options(out_dir=out, name='feat', roi_feature_dim=3, max_side=45)
  report = ingest.build([str(tmp_path / 'rows.jsonl')], opts, progress=False)
  assert report['written'] == 1 and report['examples'] == {'malformed': ['ragged']}
  record = _read_split(out)[0]
  assert Image.open(io.BytesIO(record['image'])).size == (45, 30)
  assert record['rois']['features'].dtype == np.float16

  config = pipeline.default_data_config()
  config.dataset, config.text.fields = out, ()
  config.views, config.rois.max_regions = dict(image=dict(size=16)), 3
  batch = next(iter(pipeline.make_loader(config, split='train', global_batch_size=1,
                                         train=False, seed=0, process_index=0,
                                         process_count=1)))
  np.testing.assert_array_equal(batch['rois']['mask'][0], [True, True, False])
  np.testing.assert_array_equal(batch['rois']['features'][0], feats + [[0, 0, 0]])
  # The centre crop of the 3:2 image keeps x in [1/6, 5/6]: boxes move accordingly.
  np.testing.assert_allclose(batch['rois']['boxes'][0, 0], [0.2, 0.1, 0.5, 0.5], atol=1e-6)


def test_plan_and_format_detection(tmp_path):
  assert ingest.detect_format('a/b.TSV') == 'rows'
  assert ingest.detect_format('x-00001.tar') == 'webdataset'
  assert ingest.detect_format('train.tfrecord-00001-of-00010') == 'tfrecord'
  with pytest.raises(ValueError, match='cannot tell the format'):
    ingest.detect_format('data.parquet')
  rows = tmp_path / 'r.jsonl'
  rows.write_text('\n'.join(json.dumps({'image': f'{i}.jpg', 'caption': 'c'})
                            for i in range(7)))
  tasks = ingest.plan([str(rows)], shard_size=3)
  assert [len(t.rows) for t in tasks] == [3, 3, 1]
  assert [(t.index, t.count) for t in tasks] == [(0, 3), (1, 3), (2, 3)]


# -------------------------------------------------------------------------------------
# Several captions per image.
# -------------------------------------------------------------------------------------
def _captions_by_key(out):
  return {r['caption']: [c.decode() for c in r['captions']] for r in _read_split(out)}


def test_rows_naming_one_image_or_a_captions_list_make_one_record(tmp_path):
  good = _images()['rgb_jpeg'][0]
  for name in 'abcde':
    (tmp_path / f'{name}.jpg').write_bytes(good)
  rows = [
      {'image': 'a.jpg', 'caption': 'a one', 'summary': 'first row wins'},
      {'image': 'b.jpg', 'captions': ['b one', ' ', 'b two', 'b three']},
      {'image': 'a.jpg', 'caption': 'a two', 'summary': 'ignored'},
      {'image': 'c.jpg', 'caption': '  '},  # An empty first row: the next row's caption.
      {'image': 'a.jpg', 'captions': ['a three', 'a four']},
      {'image': 'c.jpg', 'caption': 'c one'},
      {'image': 'd.jpg', 'caption': 'not used', 'captions': ['d one', 'd two']},
      {'image': 'e.jpg', 'caption': 'e region one', 'key': 'e1'},  # Distinct keys:
      {'image': 'e.jpg', 'caption': 'e region two', 'key': 'e2'},  # distinct samples.
      {'image': 'missing.jpg', 'caption': 'gone'},
      {'image': 'missing.jpg', 'caption': 'gone too'},
  ]
  path = tmp_path / 'rows.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in rows))
  tasks = ingest.plan([str(path)], shard_size=2)
  assert [[len(sample) for sample in t.rows] for t in tasks] == [[3, 1], [2, 1], [1, 1], [2]]
  out = str(tmp_path / 'out')
  report = ingest.build([str(path)], ingest.Options(out_dir=out, name='multi'),
                        shard_size=2, progress=False)
  assert report['written'] == 6 and report['skipped'] == {'missing_image': 1}
  assert _captions_by_key(out) == {
      b'a one': ['a one', 'a two', 'a three', 'a four'],
      b'b one': ['b one', 'b two', 'b three'],
      b'c one': ['c one'],
      b'd one': ['d one', 'd two'],
      b'e region one': ['e region one'],
      b'e region two': ['e region two']}
  assert _read_split(out)[0]['summary'] == b'first row wins'


def test_csv_rows_grouped_by_image_with_a_sidecar_list(tmp_path):
  good = _images()['gray_png'][0]
  for name in ('x', 'y', 'z'):
    (tmp_path / f'{name}.png').write_bytes(good)
  path = tmp_path / 'results.csv'  # Flickr30k's layout: one row per caption.
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['image_name', 'comment'])
    for row in [('y.png', 'y 0'), ('x.png', 'x 0'), ('y.png', 'y 1'), ('x.png', 'x 1'),
                ('y.png', 'y 2'), ('z.png', 'z 0')]:
      w.writerow(row)
  sidecar = tmp_path / 'side.jsonl'  # A sidecar list replaces the rows' captions.
  sidecar.write_text(json.dumps({'key': 'z', 'captions': ['z new', 'z newer']}))
  out = str(tmp_path / 'out')
  opts = ingest.Options(out_dir=out, name='flickr', image_key='image_name',
                        caption_key='comment', sidecar=str(sidecar))
  assert ingest.build([str(path)], opts, progress=False)['written'] == 3
  assert _captions_by_key(out) == {b'y 0': ['y 0', 'y 1', 'y 2'], b'x 0': ['x 0', 'x 1'],
                                   b'z new': ['z new', 'z newer']}


def test_webdataset_json_and_tfrecord_lists_of_captions(tmp_path):
  import tensorflow as tf
  good = _images()['rgb_jpeg'][0]
  tar = str(tmp_path / '00000.tar')
  _write_tar(tar, [('k1.jpg', good), ('k1.txt', b'txt caption'),
                   ('k1.json', json.dumps({'captions': ['json one', 'json two']}).encode()),
                   ('k2.jpg', good), ('k2.txt', b'only txt')])
  out = str(tmp_path / 'wds')
  ingest.build([tar], ingest.Options(out_dir=out, name='wds'), progress=False)
  assert _captions_by_key(out) == {b'json one': ['json one', 'json two'],
                                   b'only txt': ['only txt']}

  path = str(tmp_path / 'data.tfrecord')
  with tf.io.TFRecordWriter(path) as w:
    for texts in ([b'first', b'second', b'third'], [b'alone']):
      w.write(tf.train.Example(features=tf.train.Features(feature={
          'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(value=[good])),
          'caption': tf.train.Feature(bytes_list=tf.train.BytesList(value=texts)),
      })).SerializeToString())
  out = str(tmp_path / 'tfr')
  ingest.build([path], ingest.Options(out_dir=out, name='tfr'), progress=False)
  assert _captions_by_key(out) == {b'first': ['first', 'second', 'third'],
                                   b'alone': ['alone']}


def _label_rows(tmp_path, name, rows):
  """A JSONL of rows, each {'image': ..., 'caption': ..., **row}, with one image each."""
  good = _images()['rgb_jpeg'][0]
  lines = []
  for i, row in enumerate(rows):
    (tmp_path / f'{name}{i}.jpg').write_bytes(good)
    lines.append(json.dumps({'image': f'{name}{i}.jpg', 'caption': f'{name} {i}', **row}))
  path = tmp_path / f'{name}.jsonl'
  path.write_text('\n'.join(lines))
  return str(path)


def test_label_columns_become_class_labels(tmp_path):
  names = tmp_path / 'sizes.txt'
  names.write_text('small\n\nlarge\n')
  train = _label_rows(tmp_path, 'train', [
      {'kind': 'dog', 'size': 1, 'note': 'x'}, {'kind': 'cat', 'size': 'small'},
      {'kind': 'dog', 'size': 0}, {'size': 1}, {'kind': 'eel', 'size': 7}])
  out = str(tmp_path / 'out')
  opts = ingest.Options(out_dir=out, name='lab', labels=('kind', 'size'),
                        label_names=(('size', str(names)),))
  report = ingest.build([train], opts, progress=False)
  assert report['written'] == 3 and report['labels'] == {'kind': 3, 'size': 2}
  assert report['skipped'] == {'missing_label': 1, 'unknown_label': 1}
  assert report['examples']['unknown_label'] == ['train4']
  assert report['columns'] == {'kept': ['caption', 'captions', 'image', 'kind', 'size'],
                               'ignored': ['note']}
  features = tfds.builder_from_directory(out).info.features
  assert features['kind'].names == ['cat', 'dog', 'eel']  # Sorted, eel from a skipped row.
  assert features['size'].names == ['small', 'large']
  records = _read_split(out)
  assert [(r['kind'], r['size']) for r in records] == [(1, 1), (0, 0), (1, 0)]

  # A later split keeps the ids and appends its new class names.
  validation = _label_rows(tmp_path, 'val', [{'kind': 'ant', 'size': 'large'},
                                             {'kind': 'cat', 'size': 0}])
  opts = dataclasses.replace(opts, split='validation')
  ingest.build([validation], opts, progress=False)
  features = tfds.builder_from_directory(out).info.features
  assert features['kind'].names == ['cat', 'dog', 'eel', 'ant']
  assert [r['kind'] for r in _read_split(out, 'validation')] == [3, 0]
  assert [r['kind'] for r in _read_split(out)] == [1, 0, 1]

  config = pipeline.default_data_config()
  config.update(dataset=out, labels=('kind',), text=dict(fields=()))
  assert pipeline.class_names(config, 'kind') == ['cat', 'dog', 'eel', 'ant']
  with pytest.raises(ValueError, match=r"already has the label columns \['kind', 'size'\]"):
    ingest.build([validation], dataclasses.replace(opts, labels=('kind',), label_names=()),
                 progress=False)


@pytest.mark.parametrize('labels, names, message', [
    (('size',), (), r"holds integers \(3\); name their classes with --label_names=size="),
    (('tags',), (), "'tags' is a field of hvla's records"),
    (('kind',), (('size', 'x.txt'),), r"--label_names: \['size'\] are not in --labels"),
    (('colour',), (), "column 'colour' has no value in any sample"),
])
def test_label_options_that_cannot_work_fail_with_the_fix(tmp_path, labels, names, message):
  rows = _label_rows(tmp_path, 'r', [{'kind': 'dog', 'size': 3}])
  opts = ingest.Options(out_dir=str(tmp_path / 'out'), name='x', labels=labels,
                        label_names=names)
  with pytest.raises(ValueError, match=message):
    ingest.build([rows], opts, progress=False)
