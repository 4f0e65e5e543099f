"""Derived text fields and the rule-based phrase chunker."""
import numpy as np

from hvla.data import text


def test_summary_is_first_clause_cut_to_twelve_words():
  assert text.summary('a red circle, and a blue star') == 'a red circle'
  long = ' '.join(f'w{i}' for i in range(20)) + '. more'
  assert text.summary(long) == ' '.join(f'w{i}' for i in range(12))
  assert text.summary(', odd') == ', odd'  # Nothing before the comma: keep the caption.


def test_tags_and_concepts_prefer_region_labels():
  assert text.tags('a dog', ['dog', 'red ball']) == 'dog, red ball'
  assert text.tags('a dog', []) == 'a dog'
  assert text.concepts('x', ['dog', 'ball', 'dog']) == ['dog', 'ball']
  assert text.concepts('A dog and the dog with a Ball', []) == ['dog', 'ball']


def test_sample_concepts():
  words = ['dog', 'ball', 'grass']
  assert text.sample_concepts(words, 2) == 'dog ball'
  drawn = text.sample_concepts(words, 50, np.random.default_rng(0)).split()
  assert len(drawn) == 50 and set(drawn) == set(words)  # With replacement.
  assert text.sample_concepts([], 4, np.random.default_rng(0)) == ''


def test_chunker_finds_noun_phrases():
  caption = 'a large red circle to the left of a small blue star, and an old dog.'
  spans = text.chunk_phrases(caption)
  assert spans.dtype == np.int32 and spans.shape == (3, 2)
  assert [caption[s:e] for s, e in spans] == ['a large red circle', 'a small blue star',
                                              'an old dog']
  short = 'two cats a dog'
  assert [short[s:e] for s, e in text.chunk_phrases(short)] == ['two cats', 'a dog']
  assert text.chunk_phrases('of the and').shape == (0, 2)
