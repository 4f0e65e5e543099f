"""SentencePiece tokenizer with hvla's fixed special ids: pad 0, unk 1, bos 2, eos 3.

`encode` returns pieces then EOS, truncated so that EOS is always kept, zero padded: a
text tower pooling at the last non-pad position always reads EOS.
"""
import os

import numpy as np
import sentencepiece as spm

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class Tokenizer:
  """A SentencePiece model trained with hvla's special ids (see train_tokenizer)."""

  def __init__(self, model_path):
    self.model_path = os.fspath(model_path)
    if not os.path.exists(self.model_path):
      raise FileNotFoundError(f"tokenizer model {self.model_path!r} does not exist")
    with open(self.model_path, "rb") as f:
      self._proto = f.read()
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
    if ids != (PAD, UNK, BOS, EOS):
      raise ValueError(f"tokenizer {self.model_path!r} has (pad, unk, bos, eos) ids {ids}, "
                       f"hvla needs {(PAD, UNK, BOS, EOS)}: retrain it with "
                       "python -m hvla.tools.train_tokenizer")

  def __getstate__(self):  # Pickled into grain worker processes.
    return {"model_path": self.model_path, "proto": self._proto}

  def __setstate__(self, state):
    self.model_path, self._proto = state["model_path"], state["proto"]
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

  @property
  def vocab_size(self):
    return self._sp.vocab_size()

  def encode(self, texts, max_len):
    """list of str -> int32 [N, max_len]."""
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = np.zeros((len(texts), max_len), np.int32)
    for row, ids in zip(out, self._sp.encode(list(texts))):
      ids = ids[:max_len - 1] + [EOS]
      row[:len(ids)] = ids
    return out

  def encode_with_spans(self, text, char_spans, max_len):
    """Encodes one text and maps character spans [P, 2] to token spans.

    Returns (tokens int32 [max_len], token spans int32 [P, 2] as [start, end), and a
    bool [P] mask of spans that keep at least one token after truncation).
    """
    proto = self._sp.encode(text, return_type="proto")
    pieces = proto.pieces[:max_len - 1]
    tokens = np.zeros(max_len, np.int32)
    tokens[:len(pieces)] = [p.id for p in pieces]
    tokens[len(pieces)] = EOS
    # Piece offsets are in UTF-8 bytes; spans are in characters.
    char_to_byte = np.cumsum([0] + [len(c.encode()) for c in text])
    begins = np.array([p.begin for p in pieces], np.int64)
    ends = np.array([p.end for p in pieces], np.int64)
    char_spans = np.asarray(char_spans, np.int64).reshape(-1, 2)
    spans = np.zeros((len(char_spans), 2), np.int32)
    mask = np.zeros(len(char_spans), bool)
    for i, (cs, ce) in enumerate(np.clip(char_spans, 0, len(text))):
      b0, b1 = char_to_byte[cs], char_to_byte[ce]
      hit = np.flatnonzero((begins < b1) & (ends > b0) & (ends > begins))
      if len(hit) and b1 > b0:
        spans[i], mask[i] = (hit[0], hit[-1] + 1), True
    return tokens, spans, mask

  def decode(self, tokens):
    """int [N, L] -> list of str, stopping at EOS and dropping padding."""
    texts = []
    for row in np.asarray(tokens).reshape(-1, np.shape(tokens)[-1]):
      row = [int(t) for t in row]
      row = row[:row.index(EOS)] if EOS in row else row
      texts.append(self._sp.decode([t for t in row if t != PAD]))
    return texts


def train_tokenizer(texts, model_path, *, vocab_size, model_type="bpe",
                    max_sentences=2_000_000):
  """Trains a SentencePiece model on an iterable of str and writes it atomically.

  `vocab_size` is an upper bound: a small corpus (hvla_shapes) gets fewer pieces.
  BPE by default [ours]: on a small corpus SentencePiece's unigram model collapses to
  near-characters when the vocabulary limit is soft, BPE keeps whole words.
  """
  model_path = os.fspath(model_path)
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("no non-empty text to train a tokenizer on")
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  tmp = f"{model_path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=f, vocab_size=vocab_size,
        model_type=model_type, hard_vocab_limit=False, character_coverage=0.9995,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, minloglevel=2,
        num_threads=os.cpu_count() or 1)
  os.replace(tmp, model_path)
  return Tokenizer(model_path)
