"""hvla.tools.extract_concepts: nouns of real caption grammar by rules and a packaged
lexicon, the vocabulary threshold, the top-k choice, and the whole tool on a small
dataset with a checkpoint: concepts written into every split, resumed shard by shard."""
import io
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import clip_vitb16
from hvla import checkpointing, train
from hvla.data import tokenizer as tokenizer_lib
from hvla.data import writer
from hvla.tools import extract_concepts
import tiny

CAPTIONS = {  # caption -> its nouns, as a tagger would find them
    "A man riding a wave on top of a surfboard.": ["man", "wave", "surfboard"],
    "Two dogs are playing with a frisbee in the grass.": ["dogs", "frisbee", "grass"],
    "A red double decker bus driving down a street.": ["bus", "street"],
    "A woman holding an umbrella while walking her dog.": ["woman", "umbrella", "dog"],
    "A kitchen with stainless steel appliances and a wooden table.":
        ["kitchen", "appliances", "table"],
    "The sky is blue over the ocean": ["sky", "ocean"],
    "A tall building next to a parked car": ["building", "car"],
    "a red and blue kite flying above the beach": ["kite", "beach"],
    "A tennis player swinging a racket at a ball.": ["tennis", "player", "racket", "ball"],
    "Several giraffes standing near trees at the zoo.": ["giraffes", "trees", "zoo"],
    "people sitting at a table eating pizza": ["people", "table", "pizza"],
    # hvla_shapes' grammar
    "a picture of a small white circle below a medium orange hexagon, and a small red "
    "cross on the right": ["circle", "hexagon", "cross"],
}


@pytest.mark.parametrize("caption", sorted(CAPTIONS))
def test_nouns_of_real_caption_grammar(caption):
  assert extract_concepts.caption_nouns(caption) == CAPTIONS[caption]


def test_the_vocabulary_keeps_nouns_seen_at_least_twice():
  captions = ["a dog on the grass", "a dog and a cat", "the cat on a mat", "a bird"]
  assert extract_concepts.noun_vocabulary(captions) == {"cat": 2, "dog": 2}
  assert extract_concepts.noun_vocabulary(captions, min_count=1) == {
      "cat": 2, "dog": 2, "bird": 1, "grass": 1, "mat": 1}


def test_top_concepts_by_hand():
  images = np.array([[1.0, 0.0], [0.0, 1.0]])
  words = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]])
  assert extract_concepts.top_concepts(images, words, ["a", "b", "c"], k=2) == [
      ["b", "a"], ["a", "b"]]
  assert len(extract_concepts.top_concepts(images, words, ["a", "b", "c"], k=15)[0]) == 3


def small_dataset(root, n=12):
  """A dataset of n coloured squares captioned by colour, and a tokenizer for it."""
  colours = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
  rows = []
  for i in range(n):
    name = list(colours)[i % 3]
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colours[name]).save(buffer, format="PNG")
    rows.append(dict(image=buffer.getvalue(), caption=f"a {name} square on a table",
                     captions=[f"a {name} square on a table"], summary="", tags="",
                     concepts=[], rois=dict(boxes=np.zeros((0, 4), np.float32), labels=[]),
                     phrases=np.zeros((0, 2), np.int32),
                     phrase_boxes=np.zeros((0, 4), np.float32)))
  path = str(root / "squares")
  writer.write_dataset(path, "squares", writer.record_features(),
                       {"train": rows[:8], "validation": rows[8:]}, shard_size=3)
  tokenizer_lib.train_tokenizer([r["caption"] for r in rows] * 20,
                                os.path.join(path, "tokenizer.model"), vocab_size=40)
  return path


def scorer_config(dataset):
  config = clip_vitb16.get_config(f"runlocal,data={dataset}")
  tiny.shrink(config, image_depth=1, text_depth=1)
  config.model.text.vocab_size = 64
  return config


def test_the_tool_writes_concepts_and_resumes(tmp_path, monkeypatch):
  dataset = small_dataset(tmp_path)
  config = scorer_config(dataset)
  setup = train.Setup(config)
  manager = checkpointing.make_manager(str(tmp_path / "scorer"), with_data=False)
  checkpointing.save(manager, 0, setup.init_state())
  manager.wait_until_finished()
  out = str(tmp_path / "with_concepts")
  vocabulary = extract_concepts.extract(config, str(tmp_path / "scorer"), out, top_k=3,
                                        shard_size=3, batch=2, progress=False)
  assert vocabulary == {"square": 8, "table": 8}
  with open(os.path.join(out, extract_concepts.VOCABULARY_FILE)) as f:
    assert json.load(f) == vocabulary
  assert os.path.exists(os.path.join(out, "tokenizer.model"))
  written = tfds.builder_from_directory(out)
  for split, n in (("train", 8), ("validation", 4)):
    source = written.as_data_source(split)
    assert len(source) == n
    for i in range(n):
      concepts = [c.decode() for c in source[i]["concepts"]]
      assert sorted(concepts) == ["square", "table"]  # top 3 of a 2-word vocabulary
      assert source[i]["caption"].decode().startswith("a ")
  # Resume: a missing shard is the only one scored again, and comes back the same.
  shards = sorted(p for p in os.listdir(out) if "-train." in p)
  missing = os.path.join(out, shards[1])
  with open(missing, "rb") as f:
    before = f.read()
  os.remove(missing)
  scored = []
  original = extract_concepts.Scorer.images
  monkeypatch.setattr(extract_concepts.Scorer, "images",
                      lambda self, records: scored.append(len(records)) or
                      original(self, records))
  extract_concepts.extract(config, str(tmp_path / "scorer"), out, top_k=3, shard_size=3,
                           batch=2, progress=False)
  assert sum(scored) == 3
  with open(missing, "rb") as f:
    assert f.read() == before
  jax.clear_caches()
