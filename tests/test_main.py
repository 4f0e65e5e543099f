"""The entry point: multi-process arguments, config files anywhere, Ctrl-C."""
import os
import signal
import subprocess
import sys
import time

import pytest

from hvla import checkpointing
from hvla import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_distributed_arguments_means_single_process():
  assert main.distributed_arguments(None, None, None, {}) is None


def test_flags_win_over_environment():
  env = {"HVLA_COORDINATOR": "a:1", "HVLA_NUM_PROCESSES": "4", "HVLA_PROCESS_ID": "3"}
  assert main.distributed_arguments("b:2", 2, 1, env) == dict(
      coordinator_address="b:2", num_processes=2, process_id=1)
  assert main.distributed_arguments(None, None, None, env) == dict(
      coordinator_address="a:1", num_processes=4, process_id=3)


def test_partial_arguments_fail():
  with pytest.raises(ValueError, match="coordinator_address"):
    main.distributed_arguments("a:1", None, None, {})


def test_cluster_detection():
  assert main.cluster_detected({"SLURM_NTASKS": "8"})
  assert not main.cluster_detected({"SLURM_NTASKS": "1"})
  assert main.cluster_detected({"TPU_WORKER_HOSTNAMES": "w0,w1"})
  assert not main.cluster_detected({})


def test_config_file_dir_from_either_flag_form():
  assert main.config_file_dir(["x", "--config=/a/b/c.py:runlocal,batch=8"]) == "/a/b"
  assert main.config_file_dir(["x", "--workdir=w", "--config", "/a/c.py"]) == "/a"
  assert main.config_file_dir(["x", "--workdir=w"]) is None


def test_a_config_file_outside_configs_imports_its_neighbours(tmp_path):
  (tmp_path / "my_helpers.py").write_text("STEPS = 0\n")
  (tmp_path / "mine.py").write_text(
      "import my_helpers\nfrom configs import clip_vitb16\n\n\n"
      "def get_config(arg=None):\n  config = clip_vitb16.get_config(arg)\n"
      "  config.total_steps = my_helpers.STEPS\n  return config\n")
  result = subprocess.run([sys.executable, "-m", "hvla.main", f"--config={tmp_path}/mine.py:runlocal",
                           f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0 and "config.total_steps: must be positive" in result.stderr


def test_ctrl_c_says_where_the_checkpoint_is_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "hvla.main",
             "--config=configs/clip_vitb16.py:runlocal,evals=false", f"--workdir={workdir}",
             "--config.total_steps=100000", "--config.checkpoint_every=2",
             "--config.log_every=1", "--config.batch_size=16",
             "--config.schedule.warmup_steps=1", "--config.model.image.depth=1",
             "--config.model.text.depth=1", f"--config.data.data_dir={tmp_path / 'tfds'}",
             "--config.data.shapes.num_train=64", "--config.data.shapes.num_validation=16",
             "--config.data.shapes.num_test=16"]
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  for line in proc.stderr:  # Runs until a checkpoint is complete and training goes on.
    assert time.time() < deadline
    if " step 5/" in line:
      break
  proc.send_signal(signal.SIGINT)
  tail = proc.stderr.read().strip().splitlines()
  assert proc.wait(timeout=120) == 130
  step = checkpointing.find_checkpoint(str(workdir))[1]
  assert tail[-1] == (f"Interrupted: the last checkpoint is step {step} in "
                      f"{workdir / 'checkpoints'}; the same command resumes from it.")
  assert step >= 4 and not any("Traceback" in line for line in tail)
