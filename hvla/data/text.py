"""Text fields a record may lack, derived from what it has; all rules here are [ours]."""
import re

import numpy as np

# Words that end a noun phrase: prepositions, conjunctions, common verbs, relation words.
_BOUNDARY = frozenset("""
  about above across after against along among and around as at before behind below
  beneath beside besides between beyond but by down during for from has have in inside
  into is are was were be being been near next of off on onto or out outside over
  past since than that the their there these this those through to toward towards under
  underneath until up upon while who which with within without left right top bottom
  middle centre center front back side corner showing shows holding sitting standing
  """.split())
_ARTICLES = frozenset("a an".split())
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*")
_CLAUSE_END = re.compile(r"[,;:.!?]")


def as_str(value):
  """tfds returns text as bytes."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_captions(record):
  """An image's non-empty captions in order: its `captions` list, else its one `caption`.

  Records written without `captions` (or with it empty) have only `caption`; ingested
  records have `caption == captions[0]`.
  """
  listed = [as_str(c).strip() for c in record.get("captions", ())]
  listed = [c for c in listed if c]
  return listed or [c for c in (as_str(record.get("caption", b"")).strip(),) if c]


def summary(caption, max_words=12):
  """The caption's first clause cut to `max_words` words (PyramidCLIP's T_s stand-in)."""
  first = _CLAUSE_END.split(caption, maxsplit=1)[0]
  return " ".join(first.split()[:max_words]) or caption.strip()


def tags(caption, roi_labels):
  """Object/attribute tags: the region labels comma-joined, else the caption."""
  return ", ".join(roi_labels) if len(roi_labels) else caption


def concepts(caption, roi_labels):
  """Concept words: the region labels, else the caption's content words (deduplicated)."""
  if len(roi_labels):
    return list(dict.fromkeys(roi_labels))
  words = [w.lower() for w in _WORD.findall(caption)]
  return list(dict.fromkeys(
      w for w in words if len(w) > 2 and w not in _BOUNDARY and w not in _ARTICLES))


def sample_concepts(words, k, rng=None):
  """ViCHA's concept text: k words drawn with replacement [paper]; the first k without
  an rng (evaluation, [ours])."""
  if not len(words):
    return ""
  if rng is None:
    return " ".join(words[:k])
  return " ".join(words[i] for i in rng.integers(0, len(words), k))


def chunk_phrases(caption):
  """Rule-based noun-phrase chunker: maximal runs of words between boundary words.

  Returns int32 [P, 2] character spans [start, end) into `caption`, leading articles
  included ("a red circle"), runs made only of articles dropped.
  """
  spans, start, end, content = [], None, None, False

  def close():
    if start is not None and content:
      spans.append((start, end))

  for m in re.finditer(r"[A-Za-z0-9][A-Za-z0-9'\-]*|[^\sA-Za-z0-9]", caption):
    word = m.group().lower()
    if word in _BOUNDARY or not word[0].isalnum():
      close()
      start, content = None, False
      continue
    if start is None:
      start = m.start()
    elif word in _ARTICLES:  # "a" inside a run starts a new phrase.
      close()
      start, content = m.start(), False
    end = m.end()
    content = content or word not in _ARTICLES
  close()
  return np.asarray(spans, np.int32).reshape(-1, 2)
