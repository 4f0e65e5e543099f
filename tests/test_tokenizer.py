"""The SentencePiece wrapper: special ids, padding, EOS, truncation, span mapping."""
import io
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from hvla.data import tokenizer as tokenizer_lib

CORPUS = [
    'a large red circle to the left of a small blue star',
    'an orange square above a green triangle',
    'a café with a striped awning next to a bakery',
    'two dogs play with a ball on the grass',
] * 50


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'sp.model'
  return tokenizer_lib.train_tokenizer(CORPUS, path, vocab_size=200)


def test_special_ids_and_vocab(tok):
  sp = spm.SentencePieceProcessor(model_file=tok.model_path)
  assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
  assert 10 < tok.vocab_size <= 200


def test_encode_pads_and_ends_with_eos(tok):
  texts = ['a red circle', 'two dogs play with a ball on the grass', '']
  out = tok.encode(texts, 8)
  assert out.shape == (3, 8) and out.dtype == np.int32
  for row, text in zip(out, texts):
    pieces = spm.SentencePieceProcessor(model_file=tok.model_path).encode(text)
    n = min(len(pieces), 7)
    np.testing.assert_array_equal(row[:n], pieces[:n])  # Truncated keeps the prefix...
    assert row[n] == tokenizer_lib.EOS  # ...and EOS right after it...
    assert np.all(row[n + 1:] == tokenizer_lib.PAD)  # ...then padding.
  assert tok.decode(out[:1]) == ['a red circle']
  with pytest.raises(ValueError, match='max_len'):
    tok.encode(['x'], 0)


def test_spans_cover_exactly_the_phrase_tokens(tok):
  text = 'a café with a striped awning next to a bakery'
  phrases = ['a café', 'a striped awning', 'bakery']
  char_spans = [(text.index(p), text.index(p) + len(p)) for p in phrases]
  tokens, spans, mask = tok.encode_with_spans(text, char_spans, 32)
  np.testing.assert_array_equal(tokens, tok.encode([text], 32)[0])
  assert mask.all()
  for (s, e), phrase in zip(spans, phrases):
    assert tok.decode(tokens[None, s:e])[0].strip() == phrase
  # Truncation drops the phrases that no longer have a token.
  tokens, spans, mask = tok.encode_with_spans(text, char_spans, 4)
  assert tokens[-1] == tokenizer_lib.EOS
  np.testing.assert_array_equal(mask, [True, False, False])
  assert spans[0, 1] <= 3
  # Empty or out-of-range spans are masked.
  _, _, mask = tok.encode_with_spans(text, [(3, 3), (200, 300)], 32)
  assert not mask.any()


def test_pickles_for_worker_processes(tok):
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode(CORPUS[:3], 16), tok.encode(CORPUS[:3], 16))


def test_rejects_models_with_other_special_ids(tmp_path):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model,
                                 vocab_size=40, minloglevel=2)
  path = tmp_path / 'default_ids.model'
  path.write_bytes(model.getvalue())
  with pytest.raises(ValueError, match='retrain'):
    tokenizer_lib.Tokenizer(path)
  with pytest.raises(FileNotFoundError):
    tokenizer_lib.Tokenizer(tmp_path / 'missing.model')
  with pytest.raises(ValueError, match='no non-empty text'):
    tokenizer_lib.train_tokenizer(['', '  '], tmp_path / 'x.model', vocab_size=50)
