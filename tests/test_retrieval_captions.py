"""Several captions per image, end to end: a COCO-style dataset built by
`python -m hvla.tools.build_dataset`, read in evaluation ([C, L] caption rows) and in
training (one caption drawn per example), then retrieval under the any-caption-in-top-K
rule against a NumPy reference."""
import collections
import io
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from hvla import evaluators, sharding
from hvla.data import pipeline, sources, writer
from hvla.data import tokenizer as tokenizer_lib
from hvla.evaluators import common
from hvla.losses import Encoders

NAMES = ('red', 'green', 'blue', 'yellow', 'cyan', 'magenta')
COLOURS = ((220, 20, 20), (20, 200, 40), (30, 40, 210), (230, 220, 30), (30, 210, 220),
           (200, 30, 190))
COUNTS = (1, 5, 3, 6, 2, 4)  # Captions of each image; the yellow one has one too many.
NUMBERS = ('one', 'two', 'three', 'four', 'five', 'six')
CAPTIONS = [[f'a {NAMES[i]} photo number {NUMBERS[j]}' for j in range(n)]
            for i, n in enumerate(COUNTS)]
PER_IMAGE, TEXT_LEN = 5, 16


def _rows():
  """One row per caption, interleaved across images, except two JSON `captions` lists:
  green's five in one row, yellow's six in two rows. Images first appear in order."""
  rows = [{'image': f'{NAMES[i]}.png', 'caption': CAPTIONS[i][0]} for i in range(6)]
  rows[1] = {'image': 'green.png', 'captions': CAPTIONS[1]}
  rows[3] = {'image': 'yellow.png', 'captions': CAPTIONS[3][:3]}
  for j in range(1, max(COUNTS)):
    for i in reversed(range(6)):
      if j < COUNTS[i] and i not in (1, 3):
        rows.append({'image': f'{NAMES[i]}.png', 'caption': CAPTIONS[i][j]})
    if j == 2:
      rows.append({'image': 'yellow.png', 'captions': CAPTIONS[3][3:]})
  return rows


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('coco_like')
  for name, colour in zip(NAMES, COLOURS):
    buf = io.BytesIO()
    Image.new('RGB', (20, 16), colour).save(buf, 'PNG')
    (root / f'{name}.png').write_bytes(buf.getvalue())
  (root / 'rows.jsonl').write_text('\n'.join(json.dumps(r) for r in _rows()))
  out = root / 'dataset'
  subprocess.run([sys.executable, '-m', 'hvla.tools.build_dataset',
                  f'--inputs={root}/rows.jsonl', f'--out_dir={out}', '--shard_size=4',
                  '--workers=1'], check=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                 timeout=300, capture_output=True)
  builder = tfds.builder_from_directory(str(out))
  texts = list(sources.dataset_texts(builder, 'train', ('caption',)))
  tok = tokenizer_lib.train_tokenizer(texts, root / 'tok.model', vocab_size=64)
  return dict(dataset=str(out), tokenizer=tok, texts=texts, root=root)


def _config(data, **text):
  c = pipeline.default_data_config()
  c.dataset, c.text.tokenizer = data['dataset'], data['tokenizer'].model_path
  c.views = dict(image=dict(size=8, crop_scale=(0.5, 1.0)))
  c.text.update(max_len=TEXT_LEN, **text)
  return c


def _loader(config, **kw):
  kw = dict(dict(split='train', global_batch_size=6, train=True, seed=0, process_index=0,
                 process_count=1), **kw)
  return pipeline.make_loader(config, **kw)


def _eval_rows(config, field='caption'):
  batches = list(_loader(config, train=False, global_batch_size=4))
  valid = np.concatenate([b['valid'] for b in batches])
  tokens = np.concatenate([b['tokens'][field] for b in batches])
  assert not tokens[~valid].any()  # The padding of the last batch.
  return tokens[valid], batches


# -------------------------------------------------------------------------------------
def test_ingested_records_keep_every_caption_in_order(data):
  source = tfds.builder_from_directory(data['dataset']).as_data_source('train')
  records = [source[i] for i in range(len(source))]
  assert [[c.decode() for c in r['captions']] for r in records] == CAPTIONS
  assert [r['caption'].decode() for r in records] == [c[0] for c in CAPTIONS]
  assert data['texts'] == [c for caps in CAPTIONS for c in caps]  # Tokenizer corpus.


def test_eval_rows_are_the_first_captions_then_zero_rows(data):
  config = _config(data, captions_per_image=PER_IMAGE)
  tokens, batches = _eval_rows(config)
  assert _loader(config, train=False).spec['tokens']['caption'] == (
      (PER_IMAGE, TEXT_LEN), np.int32)
  assert tokens.shape == (6, PER_IMAGE, TEXT_LEN) and tokens.dtype == np.int32
  assert batches[0]['tokens']['caption'].shape == (4, PER_IMAGE, TEXT_LEN)
  tok = data['tokenizer']
  for row, captions in zip(tokens, CAPTIONS):
    n = min(len(captions), PER_IMAGE)
    assert tok.decode(row[:n]) == captions[:n]
    assert not row[n:].any()
  # Phrases are spans into the first caption's row.
  spans, mask = (np.concatenate([b['phrases'][k] for b in batches])[:6]
                 for k in ('spans', 'mask'))
  for row, row_spans, row_mask, captions in zip(tokens, spans, mask, CAPTIONS):
    phrases = [tok.decode(row[0:1, s:e])[0] for (s, e), m in zip(row_spans, row_mask) if m]
    assert phrases and all(p in captions[0] for p in phrases)
  # One caption per image (the default): the first, [L] as before.
  first, _ = _eval_rows(_config(data))
  np.testing.assert_array_equal(first, tokens[:, 0])


def test_training_draws_one_caption_per_image_uniformly_and_reproducibly(data):
  config = _config(data, captions_per_image=PER_IMAGE, fields=('caption', 'summary'))
  tok = data['tokenizer']
  epochs = 40  # One global batch of 6 is one epoch.

  def drawn(seed, epochs):
    it = iter(_loader(config, seed=seed))
    batches = [next(it) for _ in range(epochs)]
    return batches, [tok.decode(b['tokens']['caption']) for b in batches]

  batches, texts = drawn(0, epochs)
  assert batches[0]['tokens']['caption'].shape == (6, TEXT_LEN)  # Training: one caption.
  assert texts[:4] == drawn(0, 4)[1]
  assert texts[:4] != drawn(1, 4)[1]
  counts = [collections.Counter() for _ in NAMES]
  for batch, epoch in zip(batches, texts):
    images = [NAMES.index(t.split()[1]) for t in epoch]
    assert sorted(images) == list(range(6))  # Every image once per epoch.
    for i, text in zip(images, epoch):
      counts[i][text] += 1
    # The derived summary follows the drawn caption (here the whole caption).
    np.testing.assert_array_equal(batch['tokens']['summary'], batch['tokens']['caption'])
  for count, captions in zip(counts, CAPTIONS):
    assert set(count) == set(captions)  # Every caption is drawn, and only those...
    expected = epochs / len(captions)  # ...about equally often.
    assert all(abs(n - expected) <= 4 * np.sqrt(expected) for n in count.values()), count
  # Resuming from a saved state draws the same captions.
  it = iter(_loader(config))
  for _ in range(3):
    next(it)
  fresh = iter(_loader(config))
  fresh.set_state(it.get_state())
  for _ in range(3):
    np.testing.assert_array_equal(next(fresh)['tokens']['caption'],
                                  next(it)['tokens']['caption'])


def test_several_captions_need_a_dataset_with_captions(data, tmp_path):
  features = tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(None, None, 3)),
                                         'caption': tfds.features.Text()})
  png = (data['root'] / 'red.png').read_bytes()
  config = _config(data, captions_per_image=2)
  config.dataset = writer.write_dataset(str(tmp_path / 'single'), 'single', features,
                                        {'train': [dict(image=png, caption='one only')]})
  with pytest.raises(ValueError, match='captions_per_image=2 .* no captions feature'):
    _loader(config, train=False, global_batch_size=1)


# -------------------------------------------------------------------------------------
class ColourTowers(nn.Module):
  """Stand-in towers: a linear map of the mean pixel; the sum of the token embeddings."""
  dim: int = 4
  vocab: int = 64

  def setup(self):
    self.image_proj = nn.Dense(self.dim, use_bias=False)
    self.token_embed = nn.Embed(self.vocab, self.dim)

  def encode_image(self, images, *, train=False):
    pooled = self.image_proj(images.mean(axis=(1, 2)))
    return {'embedding': common.normalize(pooled), 'pooled': pooled}

  def encode_text(self, tokens, *, train=False):
    pooled = (self.token_embed(tokens) * (tokens != 0)[..., None]).sum(axis=1)
    return {'embedding': common.normalize(pooled), 'pooled': pooled}

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)


def _reference(image_emb, text_emb, owner, ks=(1, 5, 10)):
  """Loops and stable argsorts: an image is retrieved at K when any of its captions is
  among its K most similar captions, a caption when its image is."""
  sim = image_emb.astype(np.float64) @ text_emb.astype(np.float64).T
  i2t = [min(list(np.argsort(-sim[i], kind='stable')).index(t)
             for t in np.flatnonzero(owner == i)) for i in range(len(image_emb))]
  t2i = [list(np.argsort(-sim[:, t], kind='stable')).index(owner[t])
         for t in range(len(text_emb))]
  return {**{f'coco/i2t_r{k}': np.mean(np.array(i2t) < k) for k in ks},
          **{f'coco/t2i_r{k}': np.mean(np.array(t2i) < k) for k in ks}}


def test_retrieval_over_five_captions_per_image_matches_reference(data):
  model = ColourTowers(vocab=data['tokenizer'].vocab_size)
  params = model.init(jax.random.key(3), jnp.zeros((1, 8, 8, 3)),
                      jnp.zeros((1, TEXT_LEN), jnp.int32))['params']
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)),
                            jax.devices())
  eval_config = evaluators.default_eval_config(
      'retrieval', batch_size=8, split='train',
      data=dict(text=dict(captions_per_image=PER_IMAGE)))
  evaluator = evaluators.get_evaluator('coco', eval_config,
                                       encoders=Encoders.of_towers(model), mesh=mesh,
                                       data_config=_config(data),
                                       tokenizer=data['tokenizer'])
  scalars, images = evaluator.run(params)

  # Independent inputs: the solid colours, normalised, and the first 5 captions tokenised.
  norm = pipeline.default_data_config().normalization
  pixels = ((np.array(COLOURS) - np.multiply(norm.mean, 255)) / np.multiply(norm.std, 255))
  pixels = pixels.astype(np.float32)[:, None, None]  # One pixel: its own mean.
  image_emb = np.asarray(model.apply({'params': params}, pixels,
                                     method=model.encode_image)['embedding'])
  kept = [c[:PER_IMAGE] for c in CAPTIONS]
  owner = np.repeat(np.arange(6), [len(c) for c in kept])
  text_emb = np.asarray(model.apply(
      {'params': params}, data['tokenizer'].encode(sum(kept, []), TEXT_LEN),
      method=model.encode_text)['embedding'])
  expected = _reference(image_emb, text_emb, owner)
  assert images == {} and scalars == {**expected, 'coco/i2t_r1_ceiling': 1.0,
                                     'coco/t2i_r1_ceiling': 1.0}  # Distinct captions.
  # The case tells the rules apart: with only each image's first caption, i2t differs.
  first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
  only_first = _reference(image_emb, text_emb[first], owner[first])
  assert any(only_first[f'coco/i2t_r{k}'] != expected[f'coco/i2t_r{k}'] for k in (1, 5))
