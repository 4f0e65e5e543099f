"""`--mode=eval` on a workdir's checkpoint, and inspect_checkpoint's report."""
import json
import os
import re
import subprocess
import sys

from hvla import checkpointing
from hvla.tools import inspect_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(workdir, data_dir, *extra):
  return [sys.executable, "-m", "hvla.main", "--config=configs/clip_vitb16.py:runlocal",
          f"--workdir={workdir}", "--config.total_steps=2", "--config.log_every=1",
          "--config.batch_size=16", "--config.schedule.warmup_steps=1",
          "--config.model.image.depth=1", "--config.model.text.depth=1",
          "--config.model.image.image_size=32", "--config.data.views.image.size=32",
          f"--config.data.data_dir={data_dir}", "--config.data.shapes.image_size=32",
          "--config.data.shapes.num_train=64", "--config.data.shapes.num_validation=32",
          "--config.data.shapes.num_test=32", *extra]


def library_warnings(stderr):
  """Console lines that are not hvla's: warnings (absl's W/E lines, TensorFlow's C++
  notices), tfds' download banner."""
  return [line for line in stderr.splitlines()
          if re.match(r"[WE]\d{4} |WARNING|I0000 |Downloading|Dataset .* prepared", line)]


def test_train_then_eval_mode_writes_results(tmp_path):
  workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
  trained = subprocess.run(main_command(workdir, data_dir), cwd=REPO, check=True,
                           timeout=600, capture_output=True, text=True)
  assert list(workdir.glob("events.out.tfevents.*"))
  evaluated = subprocess.run(main_command(workdir, data_dir, "--mode=eval"), cwd=REPO,
                             check=True, timeout=600, capture_output=True, text=True)
  assert library_warnings(trained.stderr) == library_warnings(evaluated.stderr) == []
  results = json.loads((workdir / "eval_results_step2.json").read_text())
  assert results["step"] == 2
  for key in ("zeroshot_shape/top1", "zeroshot_color/top1", "retrieval/i2t_r1"):
    assert 0.0 <= results["results"][key] <= 1.0
  # Training appended its one evaluation (the last step's); --mode=eval kept its file.
  [line] = (workdir / "eval_results.jsonl").read_text().splitlines()
  assert json.loads(line)["step"] == 2
  assert set(json.loads(line)["results"]) == set(results["results"])

  info = inspect_checkpoint.describe(str(workdir))
  params, step = checkpointing.load_params(str(workdir))
  assert info["step"] == step == 2
  assert info["checksum"] == checkpointing.param_checksum(params)
  assert info["parameters"] > 0
  printed = subprocess.run([sys.executable, "-m", "hvla.tools.inspect_checkpoint",
                            str(workdir)], cwd=REPO, check=True, capture_output=True,
                           text=True).stdout
  assert info["checksum"] in printed and "step        2" in printed


def test_inspect_checkpoint_missing_directory(tmp_path):
  result = subprocess.run([sys.executable, "-m", "hvla.tools.inspect_checkpoint",
                           str(tmp_path / "nothing")], cwd=REPO, capture_output=True,
                          text=True)
  assert result.returncode != 0 and "No complete checkpoint" in result.stderr
