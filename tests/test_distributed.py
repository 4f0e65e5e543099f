"""Two processes x four devices (jax.distributed on localhost) equal one process x eight."""
import os
import subprocess
import sys

import jax
import numpy as np

from hvla import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_args(workdir, data_dir):
  return ["--config=configs/clip_vitb16.py:runlocal,evals=false", f"--workdir={workdir}",
          "--config.total_steps=4", "--config.checkpoint_every=4", "--config.log_every=2",
          "--config.batch_size=16", "--config.schedule.warmup_steps=2",
          "--config.model.image.depth=1", "--config.model.text.depth=1",
          "--config.mesh.fsdp=2", f"--config.data.data_dir={data_dir}",
          "--config.data.shapes.image_size=32", "--config.data.shapes.num_train=256",
          "--config.data.shapes.num_validation=64", "--config.data.shapes.num_test=64",
          "--config.model.image.image_size=32", "--config.data.views.image.size=32",
          # See test_train: keeps Adam from amplifying float-rounding noise.
          "--config.optimizer.eps=1e-3"]


def test_two_processes_equal_one(tmp_path):
  data_dir = tmp_path / "tfds"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  one = tmp_path / "one"
  subprocess.run([sys.executable, "-m", "hvla.main", *train_args(one, data_dir)], cwd=REPO,
                 env=env, check=True, timeout=600, capture_output=True)
  two = tmp_path / "two"
  result = subprocess.run(
      [sys.executable, "launch/local.py", "--processes=2", "--devices=4", "--",
       *train_args(two, data_dir)], cwd=REPO, env=env, timeout=600, capture_output=True,
      text=True)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  params_one, step_one = checkpointing.load_params(one)
  params_two, step_two = checkpointing.load_params(two)
  assert step_one == step_two == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params_one, params_two)
