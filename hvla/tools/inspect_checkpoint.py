r"""Prints a checkpoint's step, parameter count and parameter checksum.

  python -m hvla.tools.inspect_checkpoint WORKDIR_OR_CHECKPOINT_DIR

Two runs whose checksums agree have bit-identical parameters.
"""
import sys

import jax
import numpy as np

from hvla import checkpointing


def describe(path):
  params, step = checkpointing.load_params(path)
  leaves = jax.tree.leaves(params)
  return {
      "step": step,
      "parameters": int(sum(np.size(x) for x in leaves)),
      "checksum": checkpointing.param_checksum(params),
      "sum": float(sum(np.sum(np.asarray(x, np.float64)) for x in leaves)),
  }


def main(argv):
  if len(argv) != 2:
    sys.exit("usage: python -m hvla.tools.inspect_checkpoint DIR")
  try:
    info = describe(argv[1])
  except FileNotFoundError as e:
    sys.exit(str(e))
  print(f"step        {info['step']}")
  print(f"parameters  {info['parameters']:,}")
  print(f"checksum    {info['checksum']}")
  print(f"sum         {info['sum']:.10g}")


if __name__ == "__main__":
  main(sys.argv)
