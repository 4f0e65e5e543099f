"""A tiny entry point for tests/test_launch.py, run by launch/local.py in every process.

It joins jax.distributed from the flags local.py passes, then sums a global array over
all devices of all processes with an explicit psum: device d holds d + 1, so every rank
must print psum=(n * (n + 1) / 2) for n global devices, which only the cross-process
collective can produce. With --fail_rank=R, rank R dies right after joining and the
others hang, so that the launcher has to stop them.
"""
import argparse
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator_address", required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--fail_rank", type=int, default=None)
  parser.add_argument("--tag", default="", help="echoed back, to check argument passing")
  flags = parser.parse_args()

  print(f"rank={flags.process_id} pid={os.getpid()} tag={flags.tag}", flush=True)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(flags.coordinator_address, flags.num_processes, flags.process_id)
  if flags.fail_rank is not None:
    if flags.process_id == flags.fail_rank:
      os._exit(3)  # A crash: no atexit, no distributed shutdown barrier.
    time.sleep(600)

  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  values = np.arange(1, jax.device_count() + 1, dtype=np.float32)
  x = jax.make_array_from_callback(values.shape, NamedSharding(mesh, P("d")),
                                   lambda index: values[index])
  total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"),
                                out_specs=P()))(x)
  print(f"rank={jax.process_index()} processes={jax.process_count()} "
        f"devices={jax.device_count()} local={jax.local_device_count()} "
        f"psum={float(total.addressable_data(0)[0])}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
