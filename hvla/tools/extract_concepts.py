r"""Writes ViCHA's visual concepts into a dataset: each image's 15 most similar nouns.

  python -m hvla.tools.extract_concepts --config=configs/clip_vitb16.py:data=DATASET_DIR \
      --checkpoint=WORKDIR_OR_CHECKPOINT --output=DATASET_DIR_WITH_CONCEPTS

ViCHA's offline step [paper]: a noun vocabulary mined from the corpus' captions (nouns
seen at least twice), then every image scored against it by a CLIP-type model, the top
15 words kept as the image's `concepts`. Here the scorer is an hvla checkpoint [ours]:
the model of `--config` (its dataset, tokenizer and image size too) with the parameters
of `--checkpoint`, through the objective's inference embedding; each word is embedded
alone, as the official script does.

Nouns [ours]: ViCHA parses captions with a spaCy scene-graph parser; no tagger model can
be downloaded here, so `caption_nouns` uses rules over the `lemminflect` lexicon (a
package that ships its word lists): a caption splits into runs of words at function
words, punctuation and participles ('riding', 'parked'; not after a determiner or an
adjective: 'a tall building'); a run's last word is a
noun if the lexicon knows it as one or does not know it at all ('frisbee'), an earlier
word if the lexicon knows it only as a noun ('tennis racket'); a lone adjective after a
copula ('is blue') or before a conjunction ('red and blue') is not. Words are kept as
written, lower-cased (the official vocabulary holds the parser's head words).

Output: a copy of every split in `--output` with `concepts` set, the vocabulary in
`concept_vocabulary.json` and the source's tokenizer. Shards are written atomically and
one that exists is skipped, so a killed run resumes where it stopped; a progress bar
counts the images.
"""
import collections
import json
import os
import re
import shutil
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import lemminflect  # noqa: E402
import numpy as np  # noqa: E402

FLAGS = flags.FLAGS
TOP_K = 15  # [paper]
MIN_COUNT = 2  # nouns seen at least twice [paper]
VOCABULARY_FILE = "concept_vocabulary.json"

# Words that never name a concept and end a run: articles, determiners, pronouns,
# numbers, prepositions, conjunctions, auxiliaries, and place words.
_FUNCTION = frozenset("""
  a an the this that these those some any each every all both either neither no another
  other such what which who whom whose there here it its it's they them their theirs he
  him his she her hers we us our you your i me my one two three four five six seven eight
  nine ten several many much few lots lot of to in on at by for from with without into
  onto over under above below beneath behind beside besides between among around near
  next through across along against toward towards up down off out inside outside upon
  within about after before during while as than and or but nor so yet if then when
  where is are was were be been being am has have had do does did can could will
  would shall should may might must not very too also just only top bottom left right
  front back side middle center centre corner edge part piece kind type sort view image
  picture photo photograph shot close closeup
  """.split())
_COPULAS = frozenset("is are was were be been being am looks look seems seem".split())
_CONJUNCTIONS = frozenset("and or".split())
_TOKEN = re.compile(r"[a-z][a-z'\-]*|[^\sa-z]")


def _upos(word):
  return set(lemminflect.getAllLemmas(word))


_DETERMINERS = frozenset("a an the this that these those some any each every another "
                         "his her its their our my your".split())


def _is_verb_form(word, upos, previous):
  """A participle ('riding', 'parked') ends a run, unless a determiner or an adjective
  stands before it ('a building', 'a tall building', 'a parked car')."""
  if "VERB" not in upos or not (word.endswith("ing") or word.endswith("ed")):
    return False
  return not (previous in _DETERMINERS or (previous and _upos(previous) == {"ADJ"}))


def caption_nouns(caption):
  """The nouns of one caption, in order, lower-cased (see the module docstring)."""
  tokens = _TOKEN.findall(caption.lower())
  nouns, run = [], []
  after_copula = False

  def close(next_token):
    if run:
      for i, word in enumerate(run):
        upos = _upos(word)
        if i < len(run) - 1:
          if upos == {"NOUN"}:
            nouns.append(word)
          continue
        adjective = "ADJ" in upos and (
            (after_copula and len(run) == 1) or next_token in _CONJUNCTIONS or
            next_token == ",")
        if not adjective and ("NOUN" in upos or (not upos and len(word) > 2)):
          nouns.append(word)
    run.clear()

  for index, token in enumerate(tokens):
    following = tokens[index + 1] if index + 1 < len(tokens) else None
    previous = tokens[index - 1] if index else None
    if (not token[0].isalpha() or token in _FUNCTION or
        _is_verb_form(token, _upos(token), previous)):
      close(token)
      after_copula = token in _COPULAS
      continue
    run.append(token.strip("'-"))
    if following is None:
      close(None)
  close(None)
  return nouns


def noun_vocabulary(captions, min_count=MIN_COUNT):
  """{noun: count} of the nouns seen at least `min_count` times, most frequent first
  (ties alphabetical)."""
  counts = collections.Counter(n for caption in captions for n in caption_nouns(caption))
  kept = [(n, c) for n, c in counts.items() if c >= min_count]
  return dict(sorted(kept, key=lambda item: (-item[1], item[0])))


def top_concepts(image_embeddings, word_embeddings, words, k=TOP_K):
  """Each image's k most similar words, most similar first: [[word, ...], ...]."""
  sims = np.asarray(image_embeddings, np.float32) @ np.asarray(word_embeddings, np.float32).T
  k = min(k, len(words))
  order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  return [[words[j] for j in row] for row in order]


# ----------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------
def define_flags():
  """Defined only when run as a program: importing this module (tests) adds no flags."""
  flags.DEFINE_string("config", None, "The scorer's config file[:args]: its model, "
                      "dataset (config.data.dataset), tokenizer and image size.")
  flags.DEFINE_string("checkpoint", None, "A workdir or checkpoint of that config.")
  flags.DEFINE_string("output", None, "The new dataset directory.")
  flags.DEFINE_list("splits", None, "Splits to write (default: all of the dataset's).")
  flags.DEFINE_integer("top_k", TOP_K, "Concepts kept per image.")
  flags.DEFINE_integer("min_count", MIN_COUNT, "A noun joins the vocabulary when seen "
                       "this often in the train split's captions.")
  flags.DEFINE_integer("batch", 64, "Images embedded at once.")
  flags.DEFINE_integer("shard_size", 1000, "Records per output shard.")


class Scorer:
  """The checkpoint's inference embedding of images (the eval transform: resize and
  centre crop) and of words."""

  def __init__(self, config, checkpoint):
    import jax  # pylint: disable=g-import-not-at-top
    from hvla import checkpointing, train  # pylint: disable=g-import-not-at-top
    from hvla.data import examples, pipeline  # pylint: disable=g-import-not-at-top
    config.evals = {}
    self.setup = train.Setup(config)
    params, step = checkpointing.load_params(checkpoint)
    logging.info("Scoring with %s (step %d).", checkpoint, step)
    self.params = self.setup.put_params(self.setup.init_state(), params)["params"]
    data = config.data.copy_and_resolve_references()
    data.text.fields, data.labels = (), ()
    data.rois.max_regions = data.phrases.max_phrases = 0
    size = config.model.image.image_size
    data.views = {"image": dict(size=size)}
    views = pipeline.validate_data_config(data)
    self.features = pipeline.dataset_features(data)
    self._builder = examples.ExampleBuilder(data, views, None, self.features, train=False)
    self.tokenizer = train.training_tokenizer(config.data)
    self._max_len = config.data.text.max_len
    encoders = self.setup.encoders
    self._image = jax.jit(lambda p, x: encoders.image(p, x)["embedding"])
    self._text = jax.jit(lambda p, x: encoders.text(p, x)["embedding"])

  def images(self, records):
    """[N, D] embeddings of the records' images (an unreadable one gets zeros)."""
    pixels = np.stack([self._builder.random_map({"record": r}, None)["images"]["image"]
                       for r in records])
    return np.asarray(self._image(self.params, pixels))

  def words(self, words, batch=256):
    out = [np.asarray(self._text(self.params, self.tokenizer.encode(
        words[i:i + batch], self._max_len))) for i in range(0, len(words), batch)]
    return np.concatenate(out)


def extract(config, checkpoint, output, *, splits=None, top_k=TOP_K, min_count=MIN_COUNT,
            batch=64, shard_size=1000, progress=True):
  """Writes the dataset of `config.data.dataset` with concepts to `output`; returns the
  vocabulary. Resumable: existing shards and vocabulary are kept."""
  import tqdm  # pylint: disable=g-import-not-at-top
  from hvla.data import sources, writer  # pylint: disable=g-import-not-at-top
  from hvla.data.text import record_captions  # pylint: disable=g-import-not-at-top
  builder = sources.dataset_builder(config.data)
  splits = list(splits or builder.info.splits)
  os.makedirs(output, exist_ok=True)
  vocabulary_path = os.path.join(output, VOCABULARY_FILE)
  if os.path.exists(vocabulary_path):
    with open(vocabulary_path) as f:
      vocabulary = json.load(f)
  else:
    train_split = config.data.train_split
    source = sources.data_source(builder, train_split)
    captions = (c for i in tqdm.tqdm(range(len(source)), desc="nouns", disable=not progress)
                for c in record_captions(source[i]))
    vocabulary = noun_vocabulary(captions, min_count)
    if not vocabulary:
      raise ValueError(f"no noun is seen {min_count} times in the {train_split!r} captions")
    with open(vocabulary_path + ".tmp", "w") as f:
      json.dump(vocabulary, f, indent=1)
    os.replace(vocabulary_path + ".tmp", vocabulary_path)
  logging.info("%d concept words, e.g. %s", len(vocabulary), list(vocabulary)[:10])
  scorer = Scorer(config, checkpoint)
  words = list(vocabulary)
  word_embeddings = scorer.words(words)
  tokenizer_path = os.path.join(os.fspath(builder.data_dir), sources.TOKENIZER_FILE)
  if os.path.exists(tokenizer_path):
    shutil.copy(tokenizer_path, os.path.join(output, sources.TOKENIZER_FILE))
  name, features = builder.info.name, builder.info.features
  shard_lengths = {}
  for split in splits:
    source = sources.data_source(builder, split)
    total = len(source)
    count = max(1, -(-total // shard_size))
    shard_lengths[split] = []
    bar = tqdm.tqdm(total=total, desc=f"concepts {split}", disable=not progress)
    for index in range(count):
      start, stop = index * shard_size, min(total, (index + 1) * shard_size)
      shard_lengths[split].append(stop - start)
      path = writer.shard_path(output, name, split, index, count)
      if not os.path.exists(path):
        records = []
        for first in range(start, stop, batch):
          chunk = [source[i] for i in range(first, min(stop, first + batch))]
          for record, concepts in zip(chunk, top_concepts(
              scorer.images(chunk), word_embeddings, words, top_k)):
            records.append(dict(record, concepts=concepts))
        writer.write_shard(path, features, records)
      bar.update(stop - start)
    bar.close()
  writer.write_info(output, name, features, shard_lengths,
                    description=f"{builder.info.description}\nConcepts: {checkpoint}.")
  return vocabulary


def main(argv):
  del argv
  if not (FLAGS.config and FLAGS.checkpoint and FLAGS.output):
    raise app.UsageError("--config, --checkpoint and --output are required.")
  from hvla.tools import benchmark  # pylint: disable=g-import-not-at-top
  config = benchmark.load_config_file(FLAGS.config)
  extract(config, FLAGS.checkpoint, FLAGS.output, splits=FLAGS.splits, top_k=FLAGS.top_k,
          min_count=FLAGS.min_count, batch=FLAGS.batch, shard_size=FLAGS.shard_size)
  logging.info("Wrote %s", FLAGS.output)


if __name__ == "__main__":
  define_flags()
  app.run(main)
