r"""hvla's entry point: train or evaluate a config.

  python -m hvla.main --config=configs/clip_vitb16.py:runlocal --workdir=/tmp/clip
  python -m hvla.main --config=configs/clip_vitb16.py:runlocal --workdir=/tmp/clip \
      --mode=eval

A config file may live anywhere: it imports `configs.*` (the repository's) and the
modules beside it. `--eval` adds, replaces or removes evaluators (docs/evaluation.md):

  python -m hvla.main --config=configs/clip_vitb16.py:runlocal,data=/data/mine \
      --workdir=/tmp/mine --eval='probe_kind=linear_probe,label=kind,shots=(1, 5)' \
      --eval=-retrieval

Ctrl-C stops with one line naming the newest checkpoint; the same command resumes.

With several processes (a TPU pod, a SLURM job, `launch/local.py`) it first calls
`jax.distributed.initialize`: without arguments where jax detects the cluster itself (TPU,
SLURM), or with --coordinator_address / --num_processes / --process_id (or the
HVLA_COORDINATOR / HVLA_NUM_PROCESSES / HVLA_PROCESS_ID variables; flags win).
"""
import os
import sys

# TensorFlow, which tfds imports, prints C++ start-up notices on every run: its log level
# silences most, and its oneDNN notice goes with oneDNN's kernels, which hvla never runs
# (TensorFlow only reads dataset files here; images are decoded with PIL, models are jax).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# Config files import `configs.common`: make the repository root importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, optionally with ':args'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to do.")
_EVAL = flags.DEFINE_multi_string(
    "eval", [], "NAME=TYPE[,KEY=VALUE...] adds or replaces config.evals.NAME; -NAME "
    "removes it. Applied in order, after the --config overrides.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def distributed_arguments(coordinator, num_processes, process_id, environ):
  """The explicit jax.distributed arguments from flags, then the environment.

  Returns None where nothing is given (single process, or a cluster jax detects itself).
  """
  coordinator = coordinator or environ.get("HVLA_COORDINATOR")
  if num_processes is None and environ.get("HVLA_NUM_PROCESSES"):
    num_processes = int(environ["HVLA_NUM_PROCESSES"])
  if process_id is None and environ.get("HVLA_PROCESS_ID"):
    process_id = int(environ["HVLA_PROCESS_ID"])
  given = [coordinator is not None, num_processes is not None, process_id is not None]
  if not any(given):
    return None
  if not all(given):
    raise ValueError("Multi-process runs need all of --coordinator_address, "
                     "--num_processes and --process_id (or HVLA_* variables).")
  return dict(coordinator_address=coordinator, num_processes=num_processes,
              process_id=process_id)


def cluster_detected(environ):
  """True on clusters where jax.distributed finds its peers without arguments."""
  slurm = int(environ.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = "," in environ.get("TPU_WORKER_HOSTNAMES", "")
  return slurm or tpu_pod


def config_file_dir(argv):
  """The directory of the --config file in `argv` (None without one)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    return os.path.dirname(os.path.abspath(value.split(":", 1)[0]))
  return None


def initialize_distributed(environ=os.environ):
  import jax  # pylint: disable=g-import-not-at-top
  explicit = distributed_arguments(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, environ)
  if explicit is not None:
    # Cross-process collectives between CPU devices (it changes nothing for GPU or TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**explicit)
  elif cluster_detected(environ):
    jax.distributed.initialize()


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required.")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required.")
  from hvla import config as config_lib  # pylint: disable=g-import-not-at-top
  config_lib.apply_eval_flags(config, _EVAL.value)
  initialize_distributed()
  from hvla import metrics  # pylint: disable=g-import-not-at-top
  metrics.quiet_library_logs()
  import jax  # pylint: disable=g-import-not-at-top
  if config.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache)
  from hvla import train  # pylint: disable=g-import-not-at-top
  logging.info("Process %d of %d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  try:
    if _MODE.value == "train":
      train.train(config, _WORKDIR.value)
    else:
      train.evaluate(config, _WORKDIR.value)
  except (train.Interrupted, KeyboardInterrupt) as e:
    print(str(e) or "Interrupted; the same command starts again.", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  # Config files import their neighbours (the repository root is on the path already).
  _HERE = config_file_dir(sys.argv)
  if _HERE and _HERE not in sys.path:
    sys.path.insert(1, _HERE)
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
