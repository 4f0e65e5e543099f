"""The trainer: sharded steps equal the single-device step; kill + resume is bit-exact."""
import os
import sys

import jax
import numpy as np
import kill_resume
import pytest
import tiny

from configs import clip_vitb16
from hvla import checkpointing
from hvla import sharding
from hvla import train
from hvla.data import pipeline
from hvla.data import synthetic


def tiny_config(data_dir):
  config = tiny.shrink(clip_vitb16.get_config("runlocal"))
  config.total_steps = 3
  config.schedule.warmup_steps = 1
  config.data.data_dir = str(data_dir)
  config.data.shapes.update(image_size=32, num_train=256, num_validation=64, num_test=64)
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def run_steps(config, devices, batches):
  setup = train.Setup(config, devices=devices)
  state = setup.init_state()
  step = setup.compile_train_step(train.global_batch_spec(batches[0]))
  for host_batch in batches:
    state, metrics = step(state, sharding.make_global_batch(host_batch, setup.mesh))
  return jax.device_get(state["params"]), jax.device_get(metrics)


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1, model=1), dict(data=1, fsdp=8, model=1),
                                  dict(data=4, fsdp=1, model=2), dict(data=2, fsdp=2, model=2)])
def test_sharded_step_equals_single_device(data_dir, mesh):
  config = tiny_config(data_dir)
  pipeline.ensure_dataset(config.data)
  loader = pipeline.make_loader(config.data, split="train", global_batch_size=16,
                                train=True, seed=0, process_index=0, process_count=1)
  it = iter(loader)
  batches = [next(it) for _ in range(3)]
  # Adam turns float-rounding noise in near-zero gradients into full-size sign flips of
  # the update; a larger epsilon keeps the comparison about sharding, not about that.
  config.optimizer.eps = 1e-3
  config.mesh.update(data=1, fsdp=1, model=1)
  single, single_metrics = run_steps(config, jax.devices()[:1], batches)
  config.mesh.update(mesh)
  sharded, sharded_metrics = run_steps(config, jax.devices(), batches)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               single, sharded)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(single_metrics[key], sharded_metrics[key], rtol=1e-5)


def test_state_is_created_sharded(data_dir):
  config = tiny_config(data_dir)
  config.mesh.update(data=2, fsdp=4, model=1)
  setup = train.Setup(config)
  state = setup.init_state()
  kernels = [x for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
             if x.ndim == 2 and x.shape[0] % 4 == 0 and x.shape[1] % 4 == 0]
  assert kernels and any(not x.sharding.is_fully_replicated for x in kernels)


def hvla_main(workdir, *overrides):
  return [sys.executable, "-m", "hvla.main", "--config=configs/clip_vitb16.py:runlocal,evals=false",
          f"--workdir={workdir}", "--config.total_steps=8", "--config.checkpoint_every=4",
          "--config.log_every=2", "--config.batch_size=16", "--config.schedule.warmup_steps=2",
          "--config.model.image.depth=1", "--config.model.text.depth=1",
          *overrides]


def checksum(workdir):
  params, step = checkpointing.load_params(workdir)
  return step, checkpointing.param_checksum(params)


def test_kill_and_resume_is_bit_exact(tmp_path, data_dir):
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir))
  data = f"--config.data.data_dir={data_dir}"
  straight, killed = kill_resume.straight_and_resumed(
      lambda workdir: hvla_main(workdir, data), tmp_path, env)
  assert checksum(killed) == checksum(straight)
  assert checksum(straight)[0] == 8


def test_frozen_parameters_stay_put_on_a_sharded_mesh(data_dir):
  config = tiny_config(data_dir)
  config.optimizer.freeze = (r"^img/embedding/",)
  config.mesh.update(data=2, fsdp=4, model=1)
  pipeline.ensure_dataset(config.data)
  loader = pipeline.make_loader(config.data, split="train", global_batch_size=16,
                                train=True, seed=0, process_index=0, process_count=1)
  batch = next(iter(loader))
  setup = train.Setup(config)
  state = setup.init_state()
  before = jax.device_get(state["params"])
  step = setup.compile_train_step(train.global_batch_spec(batch))
  state, _ = step(state, sharding.make_global_batch(batch, setup.mesh))
  after = jax.device_get(state["params"])
  np.testing.assert_array_equal(after["img"]["embedding"]["kernel"],
                                before["img"]["embedding"]["kernel"])
  assert not np.array_equal(after["img"]["pos_embedding"], before["img"]["pos_embedding"])


def test_sharding_like_params_matches_by_path_and_shape():
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  split, whole = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(s))
                  for s in ("fsdp", None))
  params = {"a": {"w": np.zeros(8)}, "b": np.zeros(3)}
  tree = {"count": np.zeros(()), "mu": {"a": {"w": np.zeros(8)}, "b": np.zeros(3)},
          "other": {"w": np.zeros(5)}}
  out = sharding.like_params(tree, params, {"a": {"w": split}, "b": whole}, whole)
  assert out["mu"]["a"]["w"] is split and out["mu"]["b"] is whole
  assert out["count"] is whole and out["other"]["w"] is whole


def lowered_step_text(config, devices):
  setup = train.Setup(config, devices=devices)
  spec = train.global_batch_spec(synthetic.batch_spec(config.data, config.batch_size))
  return setup.lower_train_step(spec).as_text()


def test_activation_constraints_reach_the_lowered_step(data_dir):
  """The models' logical constraints are active under the trainer's mesh (one per block
  and attention at least), and left out on a one-device mesh, where they are no-ops."""
  config = tiny_config(data_dir)
  config.mesh.update(data=4, fsdp=1, model=2)
  blocks = config.model.image.depth + config.model.text.depth
  assert lowered_step_text(config, jax.devices()).count("sharding_constraint") >= 4 * blocks
  config.mesh.update(data=1, fsdp=1, model=1)
  assert "sharding_constraint" not in lowered_step_text(config, jax.devices()[:1])
