"""Config parsing and validation: bad configs fail early, naming the key."""
import subprocess
import sys

import pytest

from configs import common
from hvla import config as config_lib


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
