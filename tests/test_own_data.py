"""One's own data end to end: a JSONL corpus with class labels through build_dataset and
train_tokenizer, `runlocal,data=DIR` training and evaluating on it, and every mismatch
between the data and the towers caught before anything compiles."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from configs import clip_vitb16
from hvla import evaluators
from hvla import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220)}
SHAPES = ("square", "disc")


def run_module(*args, check=True):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, check=check)


def write_corpus(root, split, count):
  """`count` 32 px images of a coloured shape, captions naming both, `colour` and `shape`
  labels as strings, and a column hvla does not use."""
  (root / "images").mkdir(exist_ok=True)
  rows = []
  for i in range(count):
    colour, shape = list(COLOURS)[i % 3], SHAPES[i % 2]
    image = Image.new("RGB", (32, 32), (10, 10, 10))
    pixels = image.load()
    for x in range(8, 24):
      for y in range(8, 24):
        if shape == "square" or (x - 15.5) ** 2 + (y - 15.5) ** 2 < 64:
          pixels[x, y] = COLOURS[colour]
    name = f"{split}_{i}.png"
    image.save(root / "images" / name)
    rows.append({"image": f"images/{name}", "caption": f"a {colour} {shape} number {i}",
                 "colour": colour, "shape": shape, "photographer": "me"})
  path = root / f"{split}.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  train_rows, val_rows = write_corpus(root, "train", 24), write_corpus(root, "val", 12)
  out = root / "mine"
  result = run_module("hvla.tools.build_dataset",
                      f"--inputs=train={train_rows},validation={val_rows}",
                      f"--out_dir={out}", "--labels=colour,shape", "--workers=1")
  reports = [json.loads(part) for part in result.stdout.replace("}\n{", "}\0{").split("\0")]
  assert [r["split"] for r in reports] == ["train", "validation"]
  assert reports[0]["columns"]["ignored"] == ["photographer"]
  assert reports[0]["labels"] == {"colour": 3, "shape": 2}
  assert "--labels=COLUMN" in result.stderr
  run_module("hvla.tools.train_tokenizer", f"--dataset={out}", "--vocab_size=100")
  return str(out)


TINY = ("--config.total_steps=2", "--config.log_every=1", "--config.batch_size=8",
        "--config.schedule.warmup_steps=1", "--config.model.image.depth=1",
        "--config.model.text.depth=1", "--config.model.image.image_size=32",
        "--config.data.views.image.size=32")


def test_runlocal_data_dir_trains_and_evaluates_on_its_labels(dataset, tmp_path):
  workdir = tmp_path / "run"
  result = run_module("hvla.main", f"--config=configs/clip_vitb16.py:runlocal,data={dataset}",
                      f"--workdir={workdir}", "--eval=-linear_probe_shape", *TINY)
  lines = [json.loads(line) for line in (workdir / "eval_results.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [2]
  results = lines[0]["results"]
  for key in ("zeroshot_colour/top1", "zeroshot_shape/top1", "retrieval/i2t_r1",
              "retrieval/t2i_r1_ceiling", "linear_probe_colour/top1"):
    assert 0.0 <= results[key] <= 1.0, key
  assert not any(k.startswith(("zeroshot_color/", "linear_probe_shape/")) for k in results)
  assert json.loads((workdir / "config.json").read_text())["data"]["dataset"] == dataset
  assert "Traceback" not in result.stderr


def tiny_config(dataset):
  config = clip_vitb16.get_config(f"runlocal,data={dataset}")
  config.total_steps, config.batch_size, config.schedule.warmup_steps = 2, 8, 1
  config.model.image.update(image_size=32, depth=1)
  config.model.text.depth = 1
  config.data.views.image.size = 32
  return config


def never_compile(*args):
  raise AssertionError("the train step compiled before the check failed")


@pytest.mark.parametrize("change, key", [
    (lambda c: setattr(c.evals.zeroshot_colour, "label", "mood"),
     "config.evals.zeroshot_colour.label"),
    (lambda c: setattr(c.evals.retrieval, "split", "test"), "config.evals.retrieval.split"),
    (lambda c: setattr(c.evals.linear_probe_shape, "train_split", "extra"),
     "config.evals.linear_probe_shape.train_split"),
    (lambda c: setattr(c.model.text, "vocab_size", 8), "config.data.text.tokenizer"),
    (lambda c: setattr(c.data.views.image, "size", 36), "config.data.views.image.size"),
    (lambda c: c.evals.retrieval.update(data=dict(views=dict(image=dict(size=20)))),
     "config.evals.retrieval.data.views.image.size"),
    (lambda c: c.evals.retrieval.update(data=dict(text=dict(max_len=64))),
     "config.evals.retrieval.data.text.max_len"),
    (lambda c: c.evals.update(grounding=evaluators.default_eval_config(
        "grounding", data=dict(phrases=dict(max_phrases=0)))), "config.evals.grounding"),
])
def test_mismatch_fails_before_compiling_naming_the_key(dataset, tmp_path, monkeypatch,
                                                        change, key):
  monkeypatch.setattr(train.Setup, "compile_train_step", never_compile)
  config = tiny_config(dataset)
  change(config)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    train.train(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_eval_mode_checks_too(dataset, tmp_path):
  config = tiny_config(dataset)
  config.model.text.vocab_size = 8
  with pytest.raises(ValueError, match="has .* pieces, more than .*vocab_size=8"):
    train.evaluate(config, str(tmp_path))


def test_evaluations_tokenise_with_the_training_tokenizer(dataset):
  """Every evaluation's batches and prompts use the training tokenizer (the one checked
  against the text tower), whatever dataset it reads, unless it names its own."""
  config = tiny_config(dataset)
  setup = train.Setup(config)
  assert train.make_evaluators(setup)
  evals = train.make_evaluators(setup)
  expected = os.path.join(dataset, "tokenizer.model")
  assert {ev.tokenizer.model_path for ev in evals.values()} == {expected}
  assert {ev.source.config.text.tokenizer for ev in evals.values()} == {expected}
