r"""Measures the train step of a config on synthetic batches of the config's layout.

  python -m hvla.tools.benchmark --config=configs/clip_vitb16.py --batch=8
  python -m hvla.tools.benchmark --config=configs/clip_vitb16.py --batch=4096 --aot

Prints compile time, median step time over --steps timed steps (after --warmup), examples/s,
the model's FLOPs per step (see `model_flops`), achieved TFLOP/s, MFU (when the device's
peak is known or given with --peak_tflops) and peak memory. With --aot it only compiles for
the configured mesh and batch and reports the per-device memory of the compiled executable,
so an out-of-memory configuration shows before any hardware is booked.
"""
import json
import os
import resource
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """The command line, defined only when this file runs as a program, so that other
  tools (with flags of their own) and tests can import its functions."""
  config_flags.DEFINE_config_file("config", None, "Config file[:args].")
  flags.DEFINE_integer("batch", None, "Global batch size (default: the config's).")
  flags.DEFINE_integer("steps", 5, "Timed steps.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.DEFINE_bool("aot", False, "Compile only and report memory.")
  flags.DEFINE_float("peak_tflops", None, "Device peak TFLOP/s for MFU.")
  flags.DEFINE_string("json", None, "Also write the results to this file.")
  flags.mark_flags_as_required(["config"])


# Dense bf16 peak TFLOP/s per chip, for MFU.
PEAK_TFLOPS = {"NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA A100-SXM4-80GB": 312.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def synthetic_batch(spec, vocab_size, seed=0):
  """Random host arrays for a batch spec: tokens in the vocabulary, EOS-terminated."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def make(path, s):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.startswith("tokens/"):
      tokens = rng.integers(4, vocab_size, s.shape).astype(s.dtype)
      tokens[..., -1] = 3
      return tokens
    if s.dtype == np.bool_:
      return np.ones(s.shape, bool)
    if np.issubdtype(s.dtype, np.integer):
      return np.zeros(s.shape, s.dtype)
    if name.startswith("rois/boxes") or name.startswith("phrases/boxes"):
      return np.tile(np.array([0.1, 0.1, 0.6, 0.6], s.dtype), s.shape[:-1] + (1,))
    return rng.standard_normal(s.shape).astype(s.dtype)

  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map_with_path(make, spec)


def batch_spec(data_config, batch_size):
  """Shapes and dtypes of a host batch of `data_config`'s layout, without any data."""
  import jax  # pylint: disable=g-import-not-at-top
  from hvla.data import config as data_config_lib  # pylint: disable=g-import-not-at-top
  from hvla.data import examples  # pylint: disable=g-import-not-at-top
  views = data_config_lib.validate_data_config(data_config)
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct((batch_size,) + s[0], s[1]),
      examples.layout(data_config, views, features={}),
      is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple))


def memory_report(compiled):
  """Per-device bytes of the compiled executable (arguments, outputs, temporaries)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  report = {k: int(getattr(analysis, f"{k}_size_in_bytes", 0))
            for k in ("argument", "output", "temp", "alias", "generated_code")}
  report["peak"] = report["argument"] + report["output"] + report["temp"] - report["alias"]
  return report


def model_flops(config, global_spec):
  """FLOPs of one train step over the whole batch, the numerator of TFLOP/s and MFU.

  XLA's count of a compiled step is per device, counts the body of a loop once (so a
  `model.scan` stack as one block, `accum_steps` micro-batches as one) and includes
  recomputed forward passes (`model.remat`, GradCache's first pass). This counts the
  step lowered before partitioning, in one batch, with the blocks unrolled and nothing
  recomputed: the work the model needs however it is executed.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from hvla import train  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.model.scan, config.model.remat, config.accum_steps = False, "none", 1
  setup = train.Setup(config)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    lowered = jax.jit(setup.train_step_fn()).lower(setup.abstract_state(), global_spec)
  return float((lowered.cost_analysis() or {}).get("flops", 0.0))


def measure(config, *, steps, warmup, aot, peak_tflops=None):
  import jax  # pylint: disable=g-import-not-at-top
  from hvla import sharding  # pylint: disable=g-import-not-at-top
  from hvla import train  # pylint: disable=g-import-not-at-top

  config.total_steps, config.total_epochs, config.total_examples = 10**6, None, None
  config.schedule.warmup_steps = 1
  config.schedule.warmup_epochs = config.schedule.warmup_examples = None
  setup = train.Setup(config)
  local_spec = batch_spec(config.data, sharding.local_batch_size(config.batch_size))
  global_spec = train.global_batch_spec(local_spec)
  start = time.perf_counter()
  compiled = setup.compile_train_step(global_spec)
  results = {
      "batch": config.batch_size, "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
      "compile_seconds": time.perf_counter() - start,
      "flops_per_step": model_flops(config, global_spec),
      "xla_flops_per_device": train.compiled_flops(compiled),
      "memory_per_device": memory_report(compiled),
  }
  if aot:
    return results
  state = setup.init_state()
  batch = sharding.make_global_batch(
      synthetic_batch(local_spec, config.model.text.vocab_size), setup.mesh)
  for _ in range(warmup):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  tflops = results["flops_per_step"] / step_time / 1e12
  peak = peak_tflops or PEAK_TFLOPS.get(results["device_kind"])
  results.update({
      "step_seconds_median": step_time, "step_seconds_all": times,
      "examples_per_sec": config.batch_size / step_time,
      "tflops_per_sec": tflops,
      "mfu": tflops / (peak * jax.device_count()) if peak else None,
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  })
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    results["device_peak_bytes"] = stats["peak_bytes_in_use"]
  return results


def format_results(r):
  mb = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
  lines = [f"devices          {r['devices']} x {r['device_kind']} ({r['backend']})",
           f"global batch     {r['batch']}",
           f"compile          {r['compile_seconds']:.1f} s",
           f"FLOPs per step   {r['flops_per_step']:.4g} (model; XLA counts "
           f"{r['xla_flops_per_device']:.4g} per device)"]
  mem = r["memory_per_device"]
  if mem:
    lines.append(f"memory/device    peak {mb(mem['peak'])} (arguments {mb(mem['argument'])}, "
                 f"temporaries {mb(mem['temp'])}, outputs {mb(mem['output'])})")
  if "step_seconds_median" in r:
    lines += [f"step time        {r['step_seconds_median'] * 1e3:.1f} ms (median of "
              f"{len(r['step_seconds_all'])})",
              f"examples/s       {r['examples_per_sec']:.1f}",
              f"achieved         {r['tflops_per_sec']:.3f} TFLOP/s",
              "MFU              " + (f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None
                                     else "n/a (give --peak_tflops)"),
              f"peak host RSS    {mb(r['peak_rss_bytes'])}"]
    if "device_peak_bytes" in r:
      lines.append(f"peak device mem  {mb(r['device_peak_bytes'])}")
  return "\n".join(lines)


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.batch:
    config.batch_size = FLAGS.batch
  results = measure(config, steps=FLAGS.steps, warmup=FLAGS.warmup, aot=FLAGS.aot,
                    peak_tflops=FLAGS.peak_tflops)
  print(format_results(results))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
