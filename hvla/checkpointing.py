"""Asynchronous orbax checkpoints of the train state and the data-iterator position.

A checkpoint is a step directory under `<workdir>/checkpoints` holding two items:
`state` (params, optimizer state, step, rng as sharded global arrays) and `data` (one
JSON file per process with its grain iterator state). Orbax finalises a step directory
only once every item is written, so a killed process never leaves a checkpoint that
`latest_step` would pick up half-written.
"""
import hashlib
import os

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


def absolute(path):
  """An absolute local path; remote URLs (gs://...) as given."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def checkpoint_dir(workdir):
  return os.path.join(absolute(workdir), "checkpoints")


def make_manager(workdir, *, keep=3, with_data=True, read_only=False):
  handlers = {"state": ocp.StandardCheckpointHandler()}
  if with_data:
    handlers["data"] = grain.checkpoint.CheckpointHandler()
  return ocp.CheckpointManager(
      checkpoint_dir(workdir),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=not read_only, read_only=read_only,
          enable_async_checkpointing=not read_only),
      item_handlers=handlers)


def save(manager, step, state, data_iterator=None):
  """Starts an asynchronous save; returns at once (the data state is taken now)."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items))


def restore(manager, step, abstract_state, data_iterator=None):
  """Restores `state` into the shardings of `abstract_state` and rewinds the iterator."""
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def find_checkpoint(path):
  """(directory of a checkpoints tree, step) for a workdir, a checkpoints dir or a step dir."""
  path = absolute(path)
  for root in (checkpoint_dir(path), path):
    if epath.Path(root).is_dir():
      steps = ocp.utils.checkpoint_steps(root)
      if steps:
        return root, max(steps)
  parent, name = os.path.split(path)
  if name.isdigit() and (epath.Path(path) / "state").is_dir():
    return parent, int(name)
  raise FileNotFoundError(f"No complete checkpoint found at {path}.")


def load_tree(state_dir):
  """A checkpoint's `state` item as host numpy arrays: independent of the device
  topology it was written on."""
  # The item's own handler: a Checkpointer would look for step metadata in the item
  # directory and warn that it is missing.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    state_dir = epath.Path(state_dir)
    tree = handler.metadata(state_dir).tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return handler.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  finally:
    handler.close()


def load_params(path):
  """The parameters of the newest checkpoint at `path`, as host numpy arrays."""
  root, step = find_checkpoint(path)
  return load_tree(os.path.join(root, str(step), "state"))["params"], step


def param_checksum(params):
  """SHA-256 over every parameter's bytes in path order: equal iff parameters are equal."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in leaves:
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()
