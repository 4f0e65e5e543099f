"""Evaluators: every metric on hand-computed cases, whole evaluators against naive NumPy
references with a tiny stand-in model, 1 versus 8 devices, chance and oracle levels."""
import argparse
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

from hvla import config as hvla_config
from hvla import evaluators, models, sharding
from hvla.data import pipeline
from hvla.evaluators import common, grounding, linear_probe, retrieval, templates, zeroshot
from hvla.losses import Encoders

COLOURS = ("red", "green", "blue")
PLACES = ("top-left", "top-right", "bottom-left", "bottom-right")
TEXT_LEN = 12


# ----------------------------------------------------------------------------------------
# Stand-ins: a two-tower model with the documented outputs, a tokenizer, a data source.
# ----------------------------------------------------------------------------------------
class StandInTowers(nn.Module):
  """Patch tokens are a linear map of each 4x4 patch's pixels; text tokens an embedding."""
  dim: int = 3
  patch: int = 4
  vocab: int = 16

  def setup(self):
    self.patch_embed = nn.Dense(self.dim, use_bias=False)
    self.token_embed = nn.Embed(self.vocab, self.dim)

  def encode_image(self, images, *, train=False):
    b, s, p = images.shape[0], images.shape[1], self.patch
    g = s // p
    patches = images.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    tokens = self.patch_embed(patches)
    pooled = tokens.mean(axis=1)
    return {"embedding": common.normalize(pooled), "pooled": pooled,
            "token_embeddings": common.normalize(tokens), "grid": (g, g)}

  def encode_text(self, tokens, *, train=False):
    x = self.token_embed(tokens) * (tokens != 0)[..., None]
    pooled = x.sum(axis=1)
    return {"embedding": common.normalize(pooled), "pooled": pooled,
            "token_embeddings": common.normalize(x)}

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)


class WordTokenizer:
  """One id per known word (4, 5, ...), 1 for unknown words, then EOS 3, zero padded."""

  def __init__(self, words):
    self.ids = {w: 4 + i for i, w in enumerate(words)}

  def encode(self, texts, max_len):
    out = np.zeros((len(texts), max_len), np.int32)
    for row, text in zip(out, texts):
      ids = [self.ids.get(w.strip("."), 1) for w in text.split()][:max_len - 1] + [3]
      row[:len(ids)] = ids
    return out


TOKENIZER = WordTokenizer(COLOURS + PLACES)


class ArraySource:
  def __init__(self, splits, batch_size):
    self.splits, self.batch_size, self.text_len = splits, batch_size, TEXT_LEN

  def batches(self, split):
    return common.host_batches(self.splits[split or "test"], self.batch_size)

  def class_names(self, label):
    return {"colour": list(COLOURS), "place": list(PLACES)}[label]


def shapes(n, seed, informative=True):
  """8x8 images, one lit 4x4 quadrant in one colour; caption '<colour> <place>'; the
  colour word is a phrase whose box is the lit quadrant. Uninformative: noise images."""
  rng = np.random.default_rng(seed)
  colour, place = rng.integers(3, size=n), rng.integers(4, size=n)
  images = np.zeros((n, 8, 8, 3), np.float32)
  row, col = place // 2, place % 2
  for i in range(n):
    images[i, 4 * row[i]:4 * row[i] + 4, 4 * col[i]:4 * col[i] + 4, colour[i]] = 1.0
  if not informative:
    images = rng.normal(size=images.shape).astype(np.float32)
  tokens = TOKENIZER.encode([f"{COLOURS[c]} {PLACES[p]}" for c, p in zip(colour, place)],
                            TEXT_LEN)
  boxes = np.zeros((n, 2, 4), np.float32)
  boxes[:, 0] = np.stack([col / 2, row / 2, (col + 1) / 2, (row + 1) / 2], axis=1)
  return {"images": {"image": images}, "tokens": {"caption": tokens},
          "labels": {"colour": colour.astype(np.int32), "place": place.astype(np.int32)},
          "phrases": {"spans": np.tile(np.array([[0, 1], [0, 0]], np.int32), (n, 1, 1)),
                      "boxes": boxes, "mask": np.tile(np.array([True, False]), (n, 1))}}


MODEL = StandInTowers()
ENCODERS = Encoders.of_towers(MODEL)


def random_params(seed=0):
  return MODEL.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)),
                    jnp.zeros((1, TEXT_LEN), jnp.int32))["params"]


def oracle_params():
  """Patch channel c -> axis c; colour word c -> axis c; everything else -> 0."""
  kernel = np.zeros((48, 3), np.float32)
  kernel[np.arange(48), np.arange(48) % 3] = 1.0
  table = np.zeros((16, 3), np.float32)
  for c, word in enumerate(COLOURS):
    table[TOKENIZER.ids[word], c] = 1.0
  return {"patch_embed": {"kernel": jnp.asarray(kernel)},
          "token_embed": {"embedding": jnp.asarray(table)}}


def mesh_of(num_devices):
  shape = dict(data=-1, fsdp=1, model=1) if num_devices == 1 else dict(data=4, fsdp=2, model=1)
  return sharding.make_mesh(ml_collections.ConfigDict(shape), jax.devices()[:num_devices])


def make(type_name, data, num_devices=8, batch_size=8, **overrides):
  config = evaluators.default_eval_config(type_name, batch_size=batch_size, **overrides)
  cls = common.registered(type_name)
  return cls(type_name, config, encoders=ENCODERS, mesh=mesh_of(num_devices),
             source=ArraySource(data, batch_size), tokenizer=TOKENIZER)


def apply(params, method, x):
  return jax.tree.map(np.asarray, MODEL.apply({"params": params}, jnp.asarray(x), method=method))


# ----------------------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------------------
def test_first_positive_rank_hand_case():
  scores = np.array([[0.1, 0.9, 0.5, 0.9],   # Positive 2: behind 1 and 3.
                     [0.3, 0.3, 0.3, 0.3],   # Positive 2 ties with all: behind 0 and 1.
                     [0.2, 0.8, 0.8, 0.1],   # Positives 1, 2 tie at the top: position 0.
                     [0.5, 0.4, 0.3, 0.2]])  # No positive: never a hit.
  positives = np.array([[0, 0, 1, 0], [0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(common.first_positive_rank(scores, positives), [2, 2, 0, 4])


def test_top_k_accuracy_drops_trivial_k():
  ranks = np.array([0, 1, 4, 5, 0])
  assert common.top_k_accuracy(ranks, 10) == {"top1": 0.4, "top5": 0.8}
  assert common.top_k_accuracy(ranks, 5) == {"top1": 0.4}


def test_host_batches_pad_and_split_over_processes():
  x = np.arange(5)
  one = list(common.host_batches({"x": x}, 4, process_index=0, process_count=1))
  np.testing.assert_array_equal(one[1]["x"], [4, 4, 4, 4])
  np.testing.assert_array_equal(one[1]["valid"], [True, False, False, False])
  second = list(common.host_batches({"x": x}, 4, process_index=1, process_count=2))
  np.testing.assert_array_equal([b["x"] for b in second], [[2, 3], [4, 4]])
  np.testing.assert_array_equal([b["valid"] for b in second], [[True, True], [False, False]])
  with pytest.raises(ValueError, match="zero examples"):
    next(common.host_batches({"x": x[:0]}, 4))


def test_collect_drops_padding_and_names_missing_fields():
  mesh = mesh_of(8)
  step = common.per_example_step(lambda batch: {"double": 2 * batch["x"]}, mesh)
  out = common.collect(step, common.host_batches({"x": np.arange(11)}, 8), mesh, ("x",))
  np.testing.assert_array_equal(out["double"], 2 * np.arange(11))
  with pytest.raises(KeyError, match="lack 'y'; they have \\['valid', 'x'\\]"):
    common.collect(step, common.host_batches({"x": np.arange(8)}, 8), mesh, ("y",))


def test_templates():
  assert len(templates.CLIP80) == 80 == len(set(templates.CLIP80))
  assert all(t.count("{}") == 1 for t in templates.CLIP80 + templates.SHORT)
  assert set(templates.SHORT) <= set(templates.CLIP80)
  assert templates.get_templates("none") == ("{}",)
  assert templates.prompts(["cat", "dog"], ("a {}.", "the {}")) == [
      "a cat.", "the cat", "a dog.", "the dog"]
  with pytest.raises(ValueError, match="Unknown prompt template set"):
    templates.get_templates("clip81")
  with pytest.raises(ValueError, match="exactly once"):
    templates.get_templates(["no slot"])


def test_registry_and_config_errors():
  assert set(common.types()) == {"zeroshot", "retrieval", "grounding", "linear_probe"}
  config = evaluators.default_eval_config("zeroshot", label="colour", templates=["a {}"])
  assert config.type == "zeroshot" and config.label == "colour"
  assert list(config.templates) == ["a {}"]
  with pytest.raises(ValueError, match="unknown keys \\['lable'\\]"):
    evaluators.default_eval_config("zeroshot", lable="colour")
  with pytest.raises(ValueError, match="Unknown evaluator type 'zero'"):
    evaluators.get_evaluator("x", ml_collections.ConfigDict({"type": "zero"}), encoders=ENCODERS,
                             mesh=mesh_of(1), data_config=ml_collections.ConfigDict())
  with pytest.raises(ValueError, match="needs a `type`"):
    evaluators.get_evaluator("x", ml_collections.ConfigDict(), encoders=ENCODERS, mesh=mesh_of(1),
                             data_config=ml_collections.ConfigDict())
  with pytest.raises(ValueError, match="batch_size=6 must be divisible"):
    make("retrieval", {"test": shapes(4, 0)}, batch_size=6)


def test_dataset_source_keeps_the_view_and_adds_labels():
  data = pipeline.default_data_config()
  data.views = {"global": {"size": 32}, "local": {"size": 32}}
  source = common.DatasetSource(data, {"labels": ("count",)}, 8, view="local",
                                labels=("shape",))
  assert list(source.config.views) == ["local"] and source.config.box_view == "local"
  assert tuple(source.config.labels) == ("count", "shape")
  assert source.text_len == data.text.max_len
  with pytest.raises(ValueError, match="view 'image' is not in config.data.views"):
    common.DatasetSource(data, {}, 8, view="image")


# ----------------------------------------------------------------------------------------
# Zero-shot classification.
# ----------------------------------------------------------------------------------------
def test_class_embeddings_average_then_renormalise():
  prompts = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], np.float32)  # 2 classes x 2 prompts.
  s = np.sqrt(0.5)
  np.testing.assert_allclose(zeroshot.class_embeddings(prompts, 2), [[s, s], [1, 0]], atol=1e-6)


def test_class_names_from_dataset_list_or_file(tmp_path):
  source = ArraySource({}, 8)
  assert zeroshot.resolve_class_names(None, source, "place")[0] == "top-left"
  assert zeroshot.resolve_class_names(["aquarium_fish"], source, "x") == ["aquarium fish"]
  path = tmp_path / "names.txt"
  path.write_text("tench\n\ngoldfish\n")
  assert zeroshot.resolve_class_names(str(path), source, "label") == ["tench", "goldfish"]
  with pytest.raises(ValueError, match="WordNet ids"):
    zeroshot.resolve_class_names(["n01440764", "n01443537"], source, "label")


def zeroshot_reference(params, data, label, names, template_set):
  """Loops and argsort: class = mean of its prompt embeddings, renormalised."""
  temps = templates.get_templates(template_set)
  classes = []
  for name in names:
    emb = apply(params, MODEL.encode_text,
                TOKENIZER.encode([t.format(name) for t in temps], TEXT_LEN))["embedding"]
    mean = emb.mean(axis=0)
    classes.append(mean / np.linalg.norm(mean))
  images = apply(params, MODEL.encode_image, data["images"]["image"])["embedding"]
  hits = [np.argsort(-(np.stack(classes) @ image), kind="stable")[0] == y
          for image, y in zip(images, data["labels"][label])]
  return float(np.mean(hits))


def test_zeroshot_matches_reference_on_1_and_8_devices():
  data = {"test": shapes(21, 1)}
  params = random_params(1)
  results = [make("zeroshot", data, n, label="place", templates="short").run(params)
             for n in (1, 8)]
  assert results[0] == results[1]
  scalars, images = results[0]
  assert images == {} and set(scalars) == {"zeroshot/top1"}
  expected = zeroshot_reference(params, data["test"], "place", PLACES, "short")
  assert scalars["zeroshot/top1"] == pytest.approx(expected, abs=1e-9)


def test_zeroshot_oracle_is_perfect_and_noise_is_at_chance():
  oracle = make("zeroshot", {"test": shapes(30, 2)}, label="colour", templates="clip80")
  assert oracle.run(oracle_params())[0] == {"zeroshot/top1": 1.0}
  noise = make("zeroshot", {"test": shapes(600, 3, informative=False)}, batch_size=64,
               label="colour", templates="none")
  assert abs(noise.run(random_params(3))[0]["zeroshot/top1"] - 1 / 3) < 0.07


def test_zeroshot_rejects_labels_beyond_the_class_names():
  evaluator = make("zeroshot", {"test": shapes(8, 4)}, label="place", class_names=["a", "b"])
  with pytest.raises(ValueError, match="2 class names"):
    evaluator.run(random_params())


# ----------------------------------------------------------------------------------------
# Retrieval.
# ----------------------------------------------------------------------------------------
def test_retrieval_ranks_hand_case():
  # 2 images; captions 0, 1 belong to image 0, caption 2 to image 1.
  images = np.array([[1, 0], [0, 1]], np.float32)
  texts = np.array([[0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], np.float32)
  image_ranks, text_ranks = retrieval.retrieval_ranks(images, texts, np.array([0, 0, 1]))
  # Image 0 scores (.6, .8, 0): its caption 1 is first. Image 1 scores (.8, .6, 1): its
  # caption 2 is first. Caption 0 scores (.6, .8): image 0 second. Caption 1: image 0 first.
  np.testing.assert_array_equal(image_ranks, [0, 0])
  np.testing.assert_array_equal(text_ranks, [1, 0, 0])
  metrics = retrieval.recalls(np.array([0, 3, 12]), np.array([1, 0, 5, 9]))
  assert metrics["i2t_r1"] == pytest.approx(1 / 3) and metrics["i2t_r5"] == pytest.approx(2 / 3)
  assert metrics["i2t_r10"] == pytest.approx(2 / 3) and metrics["t2i_r1"] == 0.25
  assert metrics["t2i_r5"] == 0.5 and metrics["t2i_r10"] == 1.0


def retrieval_reference(params, images, captions):
  """captions [N, C, L] with all-pad rows absent; loops over rows with stable argsort."""
  img = apply(params, MODEL.encode_image, images)["embedding"]
  present = captions.any(axis=-1)
  owner = np.nonzero(present)[0]
  txt = apply(params, MODEL.encode_text, captions[present])["embedding"]
  sim = img @ txt.T
  i2t = [min(list(np.argsort(-sim[i], kind="stable")).index(t) for t in np.nonzero(owner == i)[0])
         for i in range(len(img))]
  t2i = [list(np.argsort(-sim[:, t], kind="stable")).index(owner[t]) for t in range(len(txt))]
  return {**retrieval.recalls(np.array(i2t), np.array(t2i)),
          **ceilings_reference(captions[present], owner, len(img))}


def ceilings_reference(tokens, owner, num_images):
  """R@1 ceilings by loops: per group of equal captions, the most captions of one image
  (text->image) and the image of its first caption (image->text)."""
  groups = {}
  for index, row in enumerate(tokens):
    groups.setdefault(tuple(row), []).append(index)
  t2i = sum(max(np.bincount(owner[members])) for members in groups.values())
  i2t = len({owner[members[0]] for members in groups.values()})
  return {"i2t_r1_ceiling": i2t / num_images, "t2i_r1_ceiling": t2i / len(tokens)}


def test_r1_ceilings_hand_case():
  # Captions 0 and 1 are equal but belong to images 0 and 1; image 2 has captions 2, 3.
  tokens = np.array([[5, 3], [5, 3], [6, 3], [7, 3]])
  ceilings = retrieval.r1_ceilings(tokens, np.array([0, 1, 2, 2]), 3)
  assert ceilings == {"i2t_r1_ceiling": 2 / 3, "t2i_r1_ceiling": 3 / 4}
  assert retrieval.r1_ceilings(tokens[2:], np.array([0, 1]), 2) == {
      "i2t_r1_ceiling": 1.0, "t2i_r1_ceiling": 1.0}


def test_recall_at_1_never_passes_its_ceiling():
  """Templated captions ('<colour> <place>', 12 texts for 40 images) cap R@1 far below 1,
  for every model: the oracle (colour only) and random ones alike."""
  data = {"test": shapes(40, 9)}
  for params in (oracle_params(), random_params(9), random_params(10)):
    scalars, _ = make("retrieval", data).run(params)
    assert scalars["retrieval/i2t_r1_ceiling"] <= 12 / 40
    for direction in ("i2t", "t2i"):
      assert scalars[f"retrieval/{direction}_r1"] <= scalars[f"retrieval/{direction}_r1_ceiling"]


def test_retrieval_several_captions_matches_reference_on_1_and_8_devices():
  data = shapes(19, 5)
  rng = np.random.default_rng(5)
  captions = rng.integers(1, 16, size=(19, 3, TEXT_LEN)).astype(np.int32)
  captions[rng.random((19, 3)) < 0.3] = 0  # Some images have fewer captions.
  captions[:, 0] = data["tokens"]["caption"]  # Every image has at least one.
  data = {"test": {"images": data["images"], "tokens": {"caption": captions}}}
  params = random_params(5)
  results = [make("retrieval", data, n).run(params) for n in (1, 8)]
  assert results[0] == results[1]
  expected = retrieval_reference(params, data["test"]["images"]["image"], captions)
  assert results[0][0] == pytest.approx({f"retrieval/{k}": v for k, v in expected.items()})


def test_retrieval_one_caption_per_image():
  data = shapes(13, 6)
  params = random_params(6)
  scalars, _ = make("retrieval", {"test": data}).run(params)
  expected = retrieval_reference(params, data["images"]["image"], data["tokens"]["caption"][:, None])
  assert scalars == pytest.approx({f"retrieval/{k}": v for k, v in expected.items()})


# ----------------------------------------------------------------------------------------
# Grounding.
# ----------------------------------------------------------------------------------------
def test_pointing_and_box_rules_hand_case():
  maps = np.array([[[0.0, 0.2, 0.1],
                    [0.1, 0.9, 0.8],
                    [0.0, 0.1, 0.0]]], np.float32)  # 3x3 grid, max at row 1, col 1.
  hits = grounding.pointing_hits(maps, np.array([[0.3, 0.3, 0.5, 0.5], [0.0, 0.0, 0.3, 0.3]]))
  np.testing.assert_array_equal(hits, [True, False])  # Centre (0.5, 0.5) is on the edge.
  # Scaled by 1/0.9: cells >= 0.5 are (1,1) and (1,2): box x 1/3..1, y 1/3..2/3.
  np.testing.assert_allclose(grounding.map_boxes(maps, 0.5), [[1 / 3, 1 / 3, 1, 2 / 3]])
  np.testing.assert_allclose(grounding.map_boxes(np.ones((1, 2, 2)), 0.5), [[0, 0, 1, 1]])
  ious = grounding.box_iou(np.array([[0, 0, 0.5, 0.5], [0, 0, 1, 1], [0, 0, 0, 0]]),
                           np.array([[0.25, 0.25, 0.75, 0.75], [0, 0, 0.5, 1], [0, 0, 0, 0]]))
  np.testing.assert_allclose(ious, [0.0625 / 0.4375, 0.5, 0.0])


def test_phrase_maps_mean_over_span():
  rng = np.random.default_rng(7)
  image_tokens = rng.normal(size=(2, 6, 4)).astype(np.float32)
  text_tokens = rng.normal(size=(2, 5, 4)).astype(np.float32)
  spans = np.array([[[1, 3], [4, 5]], [[0, 5], [2, 3]]])
  maps = grounding.phrase_maps(image_tokens, (2, 3), text_tokens, spans)
  for b in range(2):
    for p in range(2):
      phrase = text_tokens[b, spans[b, p, 0]:spans[b, p, 1]].mean(axis=0)
      expected = (image_tokens[b] @ (phrase / np.linalg.norm(phrase))).reshape(2, 3)
      np.testing.assert_allclose(maps[b, p], expected, rtol=1e-5, atol=1e-6)


def grounding_reference(params, data):
  img = apply(params, MODEL.encode_image, data["images"]["image"])["token_embeddings"]
  txt = apply(params, MODEL.encode_text, data["tokens"]["caption"])["token_embeddings"]
  point, box = [], []
  for b, p in zip(*np.nonzero(data["phrases"]["mask"])):
    start, end = data["phrases"]["spans"][b, p]
    phrase = txt[b, start:end].mean(axis=0)
    heat = (img[b] @ (phrase / np.linalg.norm(phrase))).reshape(2, 2)
    x0, y0, x1, y1 = data["phrases"]["boxes"][b, p]
    r, c = divmod(int(np.argmax(heat)), 2)
    point.append(x0 <= (c + 0.5) / 2 <= x1 and y0 <= (r + 0.5) / 2 <= y1)
    scaled = (heat - heat.min()) / (heat.max() - heat.min())
    rows, cols = np.nonzero(scaled >= 0.5)
    pred = (cols.min() / 2, rows.min() / 2, (cols.max() + 1) / 2, (rows.max() + 1) / 2)
    inter = (max(0, min(x1, pred[2]) - max(x0, pred[0])) *
             max(0, min(y1, pred[3]) - max(y0, pred[1])))
    union = (x1 - x0) * (y1 - y0) + (pred[2] - pred[0]) * (pred[3] - pred[1]) - inter
    box.append(inter / union >= 0.5)
  return {"grounding/pointing": np.mean(point), "grounding/box_acc": np.mean(box)}


def test_grounding_matches_reference_on_1_and_8_devices():
  data = shapes(23, 8)
  data["images"]["image"] += np.random.default_rng(8).normal(
      scale=0.3, size=data["images"]["image"].shape).astype(np.float32)
  params = random_params(8)
  results = [make("grounding", {"test": data}, n, num_images=3).run(params) for n in (1, 8)]
  assert results[0][0] == results[1][0]
  np.testing.assert_array_equal(results[0][1]["grounding/heatmaps"],
                                results[1][1]["grounding/heatmaps"])
  assert results[0][0] == pytest.approx(grounding_reference(params, data))
  heatmaps = results[0][1]["grounding/heatmaps"]
  assert heatmaps.shape == (3, 8, 8, 3) and heatmaps.dtype == np.uint8


def test_grounding_oracle_is_perfect():
  scalars, _ = make("grounding", {"test": shapes(16, 9)}).run(oracle_params())
  assert scalars == {"grounding/pointing": 1.0, "grounding/box_acc": 1.0}


def test_render_heatmap_draws_boxes():
  image = np.zeros((8, 8, 3))
  heat = np.array([[1.0, 0.0], [0.0, 0.0]])
  out = grounding.render_heatmap(image, heat, (0.5, 0.5, 1.0, 1.0), (0.0, 0.0, 0.5, 0.5))
  assert out.shape == (8, 8, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[1, 1], [153, 0, 0])  # Inside the hot cell: red.
  np.testing.assert_array_equal(out[7, 4], [0, 255, 0])  # Ground-truth box edge: green.
  np.testing.assert_array_equal(out[0, 2], [0, 0, 255])  # Predicted box edge: blue.


# ----------------------------------------------------------------------------------------
# Linear probe / few-shot.
# ----------------------------------------------------------------------------------------
def test_ridge_fit_matches_normal_equations():
  rng = np.random.default_rng(10)
  x = rng.normal(size=(40, 5)).astype(np.float32)
  y = rng.integers(3, size=40)
  weights, bias = linear_probe.ridge_fit(x, y, 3, 0.1)
  xd, t = x.astype(np.float64), np.eye(3)[y]
  design = np.concatenate([xd, np.ones((40, 1))], axis=1)  # Unpenalised bias column.
  penalty = np.diag([0.1 * 40] * 5 + [0.0])
  solution = np.linalg.solve(design.T @ design + penalty, design.T @ t)
  np.testing.assert_allclose(weights, solution[:5], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bias, solution[5], rtol=1e-4, atol=1e-5)


def test_few_shot_indices():
  labels = np.array([0, 1, 1, 2, 0, 1, 0, 0])
  picked = linear_probe.few_shot_indices(labels, 2, seed=0)
  assert sorted(np.bincount(labels[picked])) == [1, 2, 2]  # Class 2 has only one example.
  assert list(picked) == sorted(picked)
  np.testing.assert_array_equal(picked, linear_probe.few_shot_indices(labels, 2, seed=0))


def linear_probe_reference(params, train, test, rows, ridge_lambda):
  features = lambda d: apply(params, MODEL.encode_image, d["images"]["image"])["embedding"]
  x, y = features(train)[rows].astype(np.float64), train["labels"]["place"][rows]
  design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  penalty = np.diag([ridge_lambda * len(x)] * x.shape[1] + [0.0])
  w = np.linalg.solve(design.T @ design + penalty, design.T @ np.eye(4)[y])
  scores = np.concatenate([features(test), np.ones((len(test["labels"]["place"]), 1))], 1) @ w
  return np.mean(np.argmax(scores, axis=1) == test["labels"]["place"])


def test_linear_probe_matches_reference_on_1_and_8_devices():
  data = {"train": shapes(30, 11), "test": shapes(17, 12)}
  params = random_params(11)
  results = [make("linear_probe", data, n, label="place", shots=(2,)).run(params)
             for n in (1, 8)]
  assert results[0] == results[1]
  scalars = results[0][0]
  assert set(scalars) == {"linear_probe/top1", "linear_probe/2shot_top1"}
  rows = linear_probe.few_shot_indices(data["train"]["labels"]["place"], 2, 0)
  for key, subset in (("top1", np.arange(30)), ("2shot_top1", rows)):
    expected = linear_probe_reference(params, data["train"], data["test"], subset, 1e-2)
    assert scalars[f"linear_probe/{key}"] == pytest.approx(expected)


def test_linear_probe_oracle_features_are_perfect():
  data = {"train": shapes(24, 13), "test": shapes(16, 14)}
  scalars, _ = make("linear_probe", data, label="colour", shots=(1,)).run(oracle_params())
  assert scalars == {"linear_probe/top1": 1.0, "linear_probe/1shot_top1": 1.0}


# ----------------------------------------------------------------------------------------
# The real model.
# ----------------------------------------------------------------------------------------
def tiny_model():
  config = models.default_model_config()
  config.embed_dim = 8
  config.image.update(image_size=8, patch_size=4, width=16, depth=1, heads=2)
  config.text.update(vocab_size=16, max_len=TEXT_LEN, width=16, depth=1, heads=2)
  return models.get_model(config)


def test_real_model_sharded_by_logical_rules_on_1_and_8_devices():
  """Zero-shot and grounding with an untrained tiny TwoTowers whose parameters are laid
  out by the default logical rules: equal results on 1 device and on 8 devices with the
  activations constrained by the rules too."""
  model = tiny_model()
  boxed = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                     jnp.zeros((1, TEXT_LEN), jnp.int32))["params"]
  data = {"test": shapes(64, 15)}
  results = []
  for n, rules in ((1, ()), (8, hvla_config.DEFAULT_RULES)):
    mesh = mesh_of(n)
    params = jax.device_put(nn.unbox(boxed), sharding.logical_shardings(
        boxed, mesh, hvla_config.DEFAULT_RULES))
    run = {}
    for type_name, overrides in (("zeroshot", dict(label="place", templates="short")),
                                 ("grounding", {})):
      config = evaluators.default_eval_config(type_name, batch_size=16, **overrides)
      evaluator = common.registered(type_name)(
          type_name, config, encoders=Encoders.of_towers(model), mesh=mesh,
          source=ArraySource(data, 16), tokenizer=TOKENIZER)
      with nn.logical_axis_rules(rules):
        run.update(evaluator.run(params)[0])
    results.append(run)
  assert results[0] == pytest.approx(results[1], abs=1e-9)
  assert set(results[0]) == {"zeroshot/top1", "grounding/pointing", "grounding/box_acc"}


def test_real_pipeline_and_model_untrained_at_chance(tmp_path_factory):
  """Every evaluator through `get_evaluator` on a small hvla_shapes build: the metrics
  exist, and an untrained model is at chance."""
  data = pipeline.default_data_config()
  data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  data.shapes.update(image_size=32, num_train=128, num_validation=512, num_test=16)
  data.views.image.size = 32
  pipeline.ensure_dataset(data)
  config = models.default_model_config()
  config.embed_dim = 16
  config.image.update(image_size=32, patch_size=8, width=32, depth=1, heads=2)
  config.text.update(vocab_size=512, max_len=data.text.max_len, width=32, depth=1, heads=2)
  model = models.get_model(config)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                               jnp.zeros((1, data.text.max_len), jnp.int32))["params"])
  evals = ml_collections.ConfigDict({
      "zs_shape": evaluators.default_eval_config("zeroshot", label="shape", templates="short"),
      "zs_color": evaluators.default_eval_config("zeroshot", label="color"),
      "retrieval": evaluators.default_eval_config("retrieval"),
      "grounding": evaluators.default_eval_config("grounding", num_images=2),
      "probe": evaluators.default_eval_config("linear_probe", label="count", shots=(4,)),
  })
  scalars, images = {}, {}
  for name, ev in evals.items():
    ev.batch_size = 64
    evaluator = evaluators.get_evaluator(name, ev, encoders=Encoders.of_towers(model),
                                         mesh=mesh_of(8), data_config=data,
                                         tokenizer=pipeline.tokenizer_for(data))
    s, i = evaluator.run(params)
    scalars.update(s)
    images.update(i)
  assert set(scalars) == {
      "zs_shape/top1", "zs_shape/top5", "zs_color/top1", "zs_color/top5",
      *(f"retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
      "retrieval/i2t_r1_ceiling", "retrieval/t2i_r1_ceiling",
      "grounding/pointing", "grounding/box_acc", "probe/top1", "probe/4shot_top1"}
  assert abs(scalars["zs_shape/top1"] - 1 / 8) < 0.08
  assert abs(scalars["zs_color/top1"] - 1 / 8) < 0.08
  assert scalars["retrieval/i2t_r10"] < 0.1 and scalars["retrieval/t2i_r10"] < 0.1
  assert images["grounding/heatmaps"].shape == (2, 32, 32, 3)


# ----------------------------------------------------------------------------------------
# Several processes.
# ----------------------------------------------------------------------------------------
def evaluate_everything(mesh):
  """Every evaluator with the stand-in model on the given mesh (each process runs this in
  the two-process test)."""
  data = shapes(21, 16)
  data["images"]["image"] += np.random.default_rng(16).normal(
      scale=0.3, size=data["images"]["image"].shape).astype(np.float32)
  captions = np.stack([data["tokens"]["caption"], data["tokens"]["caption"][::-1]], axis=1)
  captions[::3, 1] = 0
  splits = {"train": shapes(30, 17), "test": data}
  multi = {"test": {"images": data["images"], "tokens": {"caption": captions}}}
  scalars = {}
  for type_name, split_data, overrides in (
      ("zeroshot", splits, dict(label="place", templates="short")),
      ("retrieval", multi, {}), ("grounding", splits, {}),
      ("linear_probe", splits, dict(label="place", shots=(2,)))):
    config = evaluators.default_eval_config(type_name, batch_size=8, **overrides)
    evaluator = common.registered(type_name)(
        type_name, config, encoders=ENCODERS, mesh=mesh, source=ArraySource(split_data, 8),
        tokenizer=TOKENIZER)
    scalars.update(evaluator.run(random_params(16))[0])
  return scalars


def test_two_processes_equal_one_process():
  tests = os.path.dirname(os.path.abspath(__file__))
  repo = os.path.dirname(tests)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [tests, repo, *filter(None, [os.environ.get("PYTHONPATH")])]))
  result = subprocess.run(
      [sys.executable, "-m", "launch.local", "--processes=2", "--devices=4",
       "--module=test_evaluators"], cwd=repo, env=env, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  reported = [json.loads(line.split("scalars=", 1)[1])
              for line in result.stdout.splitlines() if "scalars=" in line]
  expected = evaluate_everything(mesh_of(8))
  assert len(reported) == 2 and len(expected) == 13
  for scalars in reported:
    assert scalars == pytest.approx(expected, abs=1e-12)


if __name__ == "__main__":  # One process of test_two_processes_equal_one_process.
  parser = argparse.ArgumentParser()
  for flag in ("coordinator_address", "num_processes", "process_id"):
    parser.add_argument(f"--{flag}", required=True)
  flags = parser.parse_args()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(flags.coordinator_address, int(flags.num_processes),
                             int(flags.process_id))
  print("scalars=" + json.dumps(evaluate_everything(mesh_of(8))), flush=True)
  jax.distributed.shutdown()
