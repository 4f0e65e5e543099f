"""The device mesh, logical-to-mesh sharding rules, and global batches.

Parameters and activations carry logical axis names (see docs/design.md); the rules in
`config.sharding.rules` map them onto the mesh axes ('data', 'fsdp', 'model'). The same
code runs on one CPU, eight fake CPU devices, several processes and a pod.
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, device_count):
  """Resolves the mesh axes (-1 = the rest of the devices) for `device_count` devices."""
  sizes = {a: mesh_config[a] for a in AXES}
  known = math.prod(s for s in sizes.values() if s != -1)
  for axis, size in sizes.items():
    if size == -1:
      if device_count % known:
        raise ValueError(
            f"config.mesh: {device_count} devices are not divisible by the fixed axes {sizes}.")
      sizes[axis] = device_count // known
  if math.prod(sizes.values()) != device_count:
    raise ValueError(f"config.mesh: {sizes} needs {math.prod(sizes.values())} devices, "
                     f"{device_count} are present.")
  return sizes


def make_mesh(mesh_config, devices=None):
  """A mesh over `devices` (default: all) shaped by `config.mesh`."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
      tuple(sizes[a] for a in AXES), AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def rules(config):
  """The logical axis rules as the tuple of pairs flax expects."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.sharding.rules)


def logical_shardings(boxed_tree, mesh, logical_rules):
  """NamedShardings for a tree holding flax `Partitioned` boxes (abstract or concrete).

  Leaves without logical names are replicated.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules)


def like_params(tree, params, param_shardings, default):
  """Shardings for a tree holding copies of the parameters (an optimizer state).

  A leaf whose key path ends with a parameter's path and has its shape gets that
  parameter's sharding (Adam's moments); anything else (counts, masked-out entries of
  frozen parameters) gets `default`.
  """
  by_path = {}
  for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(param_shardings)):
    by_path[_keys(path)] = (p.shape, s)

  def pick(path, leaf):
    keys = _keys(path)
    for start in range(len(keys)):
      shape, s = by_path.get(keys[start:], (None, None))
      if s is not None and shape == leaf.shape:
        return s
    return default
  return jax.tree_util.tree_map_with_path(pick, tree)


def _keys(path):
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def batch_sharding(mesh):
  """Leading axis over the batch axes of the mesh, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def make_global_batch(host_batch, mesh):
  """Assembles this host's numpy slice of every field into global jax Arrays.

  Each process passes its own rows; the global batch is their concatenation in process
  order, sharded over the mesh's batch axes.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)


def local_batch_size(global_batch_size):
  """This process's share of the global batch; it must divide evenly."""
  if global_batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes.")
  return global_batch_size // jax.process_count()
