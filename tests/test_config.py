"""Config parsing and validation: bad configs fail early, naming the key."""
import importlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import common
from hvla import config as config_lib
from hvla.data import writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_arg_types_and_flags():
  arg = common.parse_arg("runlocal,batch=64,loss=sigmoid,lr=0.5", runlocal=False, batch=256,
                         loss="softmax", lr=1.0, data=None)
  assert arg.runlocal is True and arg.batch == 64 and arg.loss == "sigmoid"
  assert arg.lr == 0.5 and arg.data is None
  assert common.parse_arg(None, runlocal=False).runlocal is False
  assert common.parse_arg("runlocal=false", runlocal=True).runlocal is False


@pytest.mark.parametrize("arg, message", [
    ("bogus", "Unknown config argument 'bogus'"),
    ("batch=abc", "expects int"),
    ("batch", "needs a value"),
    ("runlocal=maybe", "is boolean"),
])
def test_parse_arg_errors(arg, message):
  with pytest.raises(ValueError, match=message):
    common.parse_arg(arg, runlocal=False, batch=256)


def valid_config():
  from configs import clip_vitb16
  return clip_vitb16.get_config("runlocal")


def test_runlocal_config_is_valid():
  config_lib.validate(valid_config())


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c.unlock().__setitem__("bogus_key", 1), "bogus_key"),
    (lambda c: c.optimizer.unlock().__setitem__("learning_rate", 1.0), "learning_rate"),
    (lambda c: setattr(c, "batch_size", 0), "batch_size"),
    (lambda c: setattr(c.optimizer, "lr", -1.0), "optimizer.lr"),
    (lambda c: setattr(c.schedule, "name", "triangle"), "schedule.name"),
    (lambda c: setattr(c, "total_epochs", 3.0), "total_steps"),
    (lambda c: setattr(c.mesh, "fsdp", 0), "mesh.fsdp"),
    (lambda c: setattr(c.optimizer, "freeze", ("img/(",)), "optimizer.freeze"),
])
def test_validate_names_the_key(mutate, key):
  config = valid_config()
  mutate(config)
  with pytest.raises(ValueError, match=key.replace("(", r"\(")):
    config_lib.validate(config)


def test_wrong_override_on_command_line_fails_with_its_name(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "hvla.main", "--config=configs/clip_vitb16.py:runlocal",
       f"--workdir={tmp_path}", "--config.optimizer.learning_rate=0.1"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "learning_rate" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def parse_config_flags(*args):
  """The config of a command line `--config=... --config.key=value ...`."""
  from absl import flags
  from ml_collections import config_flags
  argv = [sys.argv[0], *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("name", ["clip_vitb16", "pyramid_vitb16", "uniclip_vitb32"])
def test_contrastive_strategy_is_set_from_the_command_line(name):
  from hvla import losses
  config = f"--config=configs/{name}.py:runlocal"
  objective = losses.get_objective(parse_config_flags(config).objective)
  assert {(t.strategy, t.block_size) for t in objective.terms.values()} == {("dense", None)}
  objective = losses.get_objective(parse_config_flags(
      config, "--config.objective.strategy=chunked",
      "--config.objective.block_size=128").objective)
  assert {(t.strategy, t.block_size) for t in objective.terms.values()} == {("chunked", 128)}


RUN_CONFIGS = sorted(
    name[:-3] for name in os.listdir(os.path.join(REPO, "configs"))
    if name.endswith(".py") and "def get_config" in open(os.path.join(REPO, "configs", name)).read())


def labelled_dataset(path, splits):
  """A two-record dataset of hvla's schema with a `kind` class label, for config tests."""
  features = writer.record_features(classes={"kind": ["cat", "dog"]})
  image = np.zeros((8, 8, 3), np.uint8)
  record = dict(image=image, caption="a cat", captions=["a cat"], summary="", tags="",
                concepts=[], rois=dict(boxes=np.zeros((0, 4), np.float32), labels=[]),
                phrases=np.zeros((0, 2), np.int32), phrase_boxes=np.zeros((0, 4), np.float32),
                kind=0)
  return writer.write_dataset(str(path), "mine", features,
                              {split: [record, record] for split in splits})


@pytest.mark.parametrize("name", RUN_CONFIGS)
@pytest.mark.parametrize("runlocal", ["runlocal,", ""])
def test_data_dir_trains_and_evaluates_on_it_for_every_config(name, runlocal, tmp_path):
  """`data=DIR` wins over runlocal's hvla_shapes, and the evals are DIR's: zero-shot on
  its class label, retrieval, a linear probe, on its only evaluation split `test`."""
  data = labelled_dataset(tmp_path / "mine", ("train", "test"))
  config = importlib.import_module(f"configs.{name}").get_config(f"{runlocal}data={data}")
  assert config.data.dataset == data and config.data.eval_split == "test"
  assert set(config.evals) == {"zeroshot_kind", "retrieval", "linear_probe_kind"}
  views = {ev.view for ev in config.evals.values()}
  assert len(views) == 1 and views <= set(config.data.views)
  config_lib.validate(config)
  assert not importlib.import_module(f"configs.{name}").get_config(
      f"{runlocal}data={data},evals=false").evals


def test_data_dir_without_an_evaluation_split_has_no_evals(tmp_path):
  from configs import clip_vitb16
  data = labelled_dataset(tmp_path / "mine", ("train",))
  assert not clip_vitb16.get_config(f"runlocal,data={data}").evals


def test_eval_flags_add_replace_and_remove():
  config = valid_config()
  config.lock()
  config_lib.apply_eval_flags(config, [
      "probe=linear_probe,label=count,shots=(1, 5),data={'labels': ('shape',)}",
      "-retrieval", "zeroshot_shape=zeroshot,label=shape,split=test,templates=none"])
  assert set(config.evals) == {"probe", "zeroshot_shape", "zeroshot_color"}
  assert tuple(config.evals.probe.shots) == (1, 5) and config.evals.probe.label == "count"
  assert config.evals.probe.data.labels == ("shape",)
  assert config.evals.zeroshot_shape.split == "test"
  assert config.evals.zeroshot_shape.templates == "none"
  config_lib.validate(config)


@pytest.mark.parametrize("spec, message", [
    ("-nothing", "no config.evals.nothing to remove"),
    ("probe", "expected NAME=TYPE"),
    ("probe=linear_probe,shots", "'shots' is not KEY=VALUE"),
    ("probe=linear_prob", "Unknown evaluator type 'linear_prob'"),
    ("probe=linear_probe,lable=x", r"unknown keys \['lable'\]"),
])
def test_eval_flags_errors_name_the_flag(spec, message):
  with pytest.raises(ValueError, match=f"--eval={re.escape(spec)}: .*{message}"):
    config_lib.apply_eval_flags(valid_config(), [spec])


def test_eval_flag_on_the_command_line_fails_before_training(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "hvla.main", "--config=configs/clip_vitb16.py:runlocal",
       f"--workdir={tmp_path}", "--eval=probe=linear_probe,lable=count"],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode != 0 and "lable" in result.stderr
  assert not (tmp_path / "config.json").exists()
