r"""Measures the train step of a config on synthetic batches of the config's layout.

  python -m hvla.tools.benchmark --config=configs/clip_vitb16.py --batch=8
  python -m hvla.tools.benchmark --config=configs/clip_vitb16.py --batch=4096 --aot
  python -m hvla.tools.benchmark --config=configs/clip_vitb16.py --largest_batch --measure_peak
  python -m hvla.tools.benchmark --config=configs/clip_vitb16.py --batch=8 --measure_peak \
      --variant='remat:model.remat=full' --variant='scan:model.scan=True'
  python -m hvla.tools.benchmark --config=configs/pyramid_vitb16.py --batch=8 \
      --against=configs/clip_vitb16.py

Prints compile time, median step time over --steps timed steps (after --warmup), examples/s,
the model's FLOPs per step (see `model_flops`), achieved TFLOP/s, MFU (when the device's
peak is known or given with --peak_tflops) and peak memory. With --aot it only compiles for
the configured mesh and batch and reports the per-device memory of the compiled executable,
so an out-of-memory configuration shows before any hardware is booked. --largest_batch
first finds the largest batch that fits in the device's memory (or --memory_gib) by
compiling, and then measures that batch. Each --variant is
the config with some keys changed, and each --against another config file; all are
compiled, their timed steps alternate (so their ratios hold on a loaded machine) and a
table compares them, FLOPs included.
"""
import ast
import json
import math
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
  flags.DEFINE_bool("measure_peak", False, "Take the peak for MFU from a timed matmul in "
                    "each variant's compute dtype (for devices without a published peak: "
                    "CPUs).")
  flags.DEFINE_multi_string(
      "variant", [], "name:key=value[;key=value...]: the config with these changes, "
      "measured beside it (repeatable); their steps alternate with the config's.")
  flags.DEFINE_multi_string(
      "against", [], "Another config file[:args], measured in the same run as --config with "
      "its steps interleaved (e.g. configs/clip_vitb16.py against a PyramidCLIP config).")
  flags.DEFINE_bool("largest_batch", False, "First search the largest global batch whose "
                    "compiled step fits in --memory_gib per device (see `largest_batch`), "
                    "then measure the config at that batch.")
  flags.DEFINE_float("memory_gib", None, "Per-device memory for --largest_batch (default: "
                     "the device's own limit, which a CPU does not report).")
  flags.DEFINE_string("json", None, "Also write the results to this file.")
  flags.mark_flags_as_required(["config"])


# Dense bf16 peak TFLOP/s per chip, for MFU.
PEAK_TFLOPS = {"NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA A100-SXM4-80GB": 312.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def memory_report(compiled):
  """Per-device bytes of the compiled executable (arguments, outputs, temporaries)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  report = {k: int(getattr(analysis, f"{k}_size_in_bytes", 0))
            for k in ("argument", "output", "temp", "alias", "generated_code")}
  report["peak"] = report["argument"] + report["output"] + report["temp"] - report["alias"]
  return report


def model_flops(config, global_spec, devices=None):
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
  setup = train.Setup(config, devices=devices)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    return lowered_flops(setup.train_step_fn(), setup.abstract_state(), global_spec)


def lowered_flops(fn, *args):
  """XLA's FLOP count of `fn(*args)` lowered (not compiled, not run): the same measure
  for hvla's step and for other trainers' steps. `args` may be abstract."""
  import jax  # pylint: disable=g-import-not-at-top
  lowered = jax.jit(fn).lower(*args)
  return float((lowered.cost_analysis() or {}).get("flops", 0.0))


def parameter_count(tree):
  """The number of scalars in a tree of arrays (or of their shapes)."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def matmul_peak_tflops(dtype="float32", n=4096, repeats=5):
  """TFLOP/s of an [n, n] x [n, n] matmul in `dtype` on the first device (median of
  `repeats`): the peak for MFU on a device without a published one, such as a CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  matmul = jax.jit(jnp.matmul).lower(a, a).compile()
  jax.block_until_ready(matmul(a, a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times) / 1e12


def apply_overrides(config, overrides):
  """Sets dotted keys (`model.remat=full`) of a copy of `config`; values are Python
  literals or, failing that, strings. An unknown key raises a ValueError naming it."""
  config = config.copy_and_resolve_references()
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"Override {item!r} is not key=value.")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.strip().split(".")
    node = config
    for name in parents:
      node = node.get(name) if hasattr(node, "get") else None
    if node is None or not hasattr(node, "keys") or leaf not in node:
      raise ValueError(f"Unknown config key {key.strip()!r} in override {item!r}.")
    node[leaf] = value
  return config


def parse_variant(text):
  """'name:key=value;key=value' -> (name, [key=value, ...])."""
  name, sep, changes = text.partition(":")
  if not sep or not name:
    raise ValueError(f"Variant {text!r} is not name:key=value[;key=value...].")
  return name, [c for c in changes.split(";") if c]


class Case:
  """One configuration's compiled train step, its state and batch, and its results
  (`flops=False` skips counting the model's FLOPs, one more lowering of the step)."""

  def __init__(self, name, config, aot, devices=None, flops=True):
    import jax  # pylint: disable=g-import-not-at-top
    from hvla import sharding  # pylint: disable=g-import-not-at-top
    from hvla import train  # pylint: disable=g-import-not-at-top
    from hvla.data import synthetic  # pylint: disable=g-import-not-at-top
    config.total_steps, config.total_epochs, config.total_examples = 10**6, None, None
    config.schedule.warmup_steps = 1
    config.schedule.warmup_epochs = config.schedule.warmup_examples = None
    setup = train.Setup(config, devices=devices)
    local_spec = synthetic.batch_spec(config.data, sharding.local_batch_size(config.batch_size))
    global_spec = train.global_batch_spec(local_spec)
    start = time.perf_counter()
    self.compiled = setup.compile_train_step(global_spec)
    self.name = name
    self.results = {
        "name": name, "batch": config.batch_size, "devices": setup.mesh.size,
        "dtype": config.model.dtype,
        "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "compile_seconds": time.perf_counter() - start,
        "flops_per_step": model_flops(config, global_spec, devices) if flops else None,
        "xla_flops_per_device": train.compiled_flops(self.compiled),
        "memory_per_device": memory_report(self.compiled),
    }
    if not aot:
      self.state = setup.init_state()
      self.batch = sharding.make_global_batch(
          synthetic.batch(local_spec, config.model.text.vocab_size), setup.mesh)

  def step(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics


def time_interleaved(cases, *, steps, warmup):
  """Runs `warmup` then `steps` timed calls of every case's `step`, one call of each in
  turn, so that a change in the machine's load hits all cases alike; returns each
  case's list of seconds."""
  import jax  # pylint: disable=g-import-not-at-top
  for case in cases:
    for _ in range(warmup):
      jax.block_until_ready(case.step())
  times = {case.name: [] for case in cases}
  for _ in range(steps):
    for case in cases:
      start = time.perf_counter()
      jax.block_until_ready(case.step())
      times[case.name].append(time.perf_counter() - start)
  return times


def add_speed(results, seconds, peak_tflops=None):
  """Step time, examples/s, achieved TFLOP/s and MFU from the seconds of timed steps.

  `peak_tflops` per device: a number, or a mapping from the compute dtype to one.
  """
  step_time = statistics.median(seconds)
  tflops = results["flops_per_step"] / step_time / 1e12
  if isinstance(peak_tflops, dict):
    peak_tflops = peak_tflops.get(results.get("dtype"))
  peak = peak_tflops or PEAK_TFLOPS.get(results["device_kind"])
  results.update({
      "step_seconds_median": step_time, "step_seconds_all": list(seconds),
      "examples_per_sec": results["batch"] / step_time, "tflops_per_sec": tflops,
      "peak_tflops": peak,
      "mfu": tflops / (peak * results.get("devices", 1)) if peak else None,
  })
  return results


def largest_batch(config, memory_bytes, *, devices=None):
  """The largest global batch whose compiled train step needs at most `memory_bytes` per
  device by XLA's analysis (compiled only, nothing runs), and {batch: peak bytes} of
  every batch tried.

  Batches are multiples of the mesh's batch-parallel size (data x fsdp) times
  `accum_steps`. From the config's batch the search doubles (or halves) to bracket the
  limit, then bisects it to within 1/32 of the answer: about a dozen compilations.
  Returns 0 when not even one batch per device fits.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from hvla import sharding  # pylint: disable=g-import-not-at-top
  devices = jax.devices() if devices is None else devices
  sizes = sharding.mesh_shape(config.mesh, len(devices))
  unit = sizes["data"] * sizes["fsdp"] * config.accum_steps
  peaks = {}

  def fits(k):
    batch = k * unit
    if batch not in peaks:
      case = Case(f"batch {batch}", apply_overrides(config, [f"batch_size={batch}"]),
                  aot=True, devices=devices, flops=False)
      peaks[batch] = case.results["memory_per_device"]["peak"]
    return peaks[batch] <= memory_bytes

  k = max(1, config.batch_size // unit)
  if fits(k):
    low, high = k, 2 * k
    while fits(high):
      low, high = high, 2 * high
  else:
    low, high = k // 2, k
    while low and not fits(low):
      low, high = low // 2, low
    if not low:
      return 0, peaks
  while high - low > max(1, low // 32):  # `low` fits, `high` does not
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low * unit, peaks


def device_memory_bytes():
  """The first device's memory limit, or None where the backend reports none (CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def measure_variants(config, variants, *, steps, warmup, aot, peak_tflops=None, others=()):
  """Results of `config` changed by each of `variants` [(name, overrides)], and of the
  configs `others` [(name, config)], compiled one by one and timed interleaved (see
  `time_interleaved`)."""
  import jax  # pylint: disable=g-import-not-at-top
  names = [name for name, _ in variants] + [name for name, _ in others]
  if len(set(names)) != len(names):
    raise ValueError(f"Variant names must differ, got {names}.")
  cases = []
  for name, overrides in variants:
    case = Case(name, apply_overrides(config, overrides), aot)
    case.results["overrides"] = list(overrides)
    cases.append(case)
  for name, other in others:
    case = Case(name, other, aot)
    case.results["overrides"] = ["(another config)"]
    cases.append(case)
  if aot:
    return [case.results for case in cases]
  times = time_interleaved(cases, steps=steps, warmup=warmup)
  results = [add_speed(case.results, times[case.name], peak_tflops) for case in cases]
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  stats = jax.devices()[0].memory_stats() or {}
  for r in results:
    r["peak_rss_bytes"] = rss  # of the process, over every case
    if "peak_bytes_in_use" in stats:
      r["device_peak_bytes"] = stats["peak_bytes_in_use"]
  return results


def measure(config, *, steps, warmup, aot, peak_tflops=None):
  """Results of one config (see `measure_variants`)."""
  return measure_variants(config, [("config", [])], steps=steps, warmup=warmup, aot=aot,
                          peak_tflops=peak_tflops)[0]


def format_table(results):
  """A markdown table of `measure_variants` results, times also as a ratio to the first."""
  gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
  timed = "step_seconds_median" in results[0]
  header = ["variant", "changes", "compile s", "memory/device GiB", "FLOPs/step",
            "FLOPs vs first"]
  if timed:
    header += ["step s (median)", "examples/s", "TFLOP/s", "MFU", "time vs first"]
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  first_flops = results[0].get("flops_per_step") or 0
  for r in results:
    flops = r.get("flops_per_step") or 0
    row = [r["name"], "; ".join(r["overrides"]) or "-", f"{r['compile_seconds']:.0f}",
           gib(r["memory_per_device"].get("peak", 0)), f"{flops:.4g}",
           f"{flops / first_flops:.2f}x" if first_flops else "-"]
    if timed:
      mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
      ratio = r["step_seconds_median"] / results[0]["step_seconds_median"]
      row += [f"{r['step_seconds_median']:.2f}", f"{r['examples_per_sec']:.2f}",
              f"{r['tflops_per_sec']:.3f}", mfu, f"{ratio:.2f}x"]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


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


def load_config_file(spec):
  """'path/to/config.py[:args]' -> that file's `get_config(args)`."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_hvla_config", path)
  if module_spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"No config file {path!r}.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def main(argv):
  del argv
  config = FLAGS.config
  others = [(os.path.basename(spec.partition(":")[0]).removesuffix(".py"),
             load_config_file(spec)) for spec in FLAGS.against]
  if FLAGS.batch:
    config.batch_size = FLAGS.batch
    for _, other in others:
      other.batch_size = FLAGS.batch
  if FLAGS.largest_batch:
    memory = FLAGS.memory_gib * 2**30 if FLAGS.memory_gib else device_memory_bytes()
    if not memory:
      raise app.UsageError("--largest_batch: this device reports no memory limit; give "
                           "--memory_gib.")
    config.batch_size, peaks = largest_batch(config, memory)
    print(f"largest batch    {config.batch_size} within {memory / 2**30:.2f} GiB per "
          "device; tried (XLA peak per device): " + ", ".join(
              f"{b}: {p / 2**30:.2f} GiB" for b, p in sorted(peaks.items())))
    if not config.batch_size:
      return
  peak = FLAGS.peak_tflops
  variants = [("config", [])] + [parse_variant(v) for v in FLAGS.variant]
  if FLAGS.measure_peak:
    dtypes = {apply_overrides(config, changes).model.dtype for _, changes in variants}
    dtypes |= {other.model.dtype for _, other in others}
    peak = {dtype: matmul_peak_tflops(dtype) for dtype in sorted(dtypes)}
    print("peak             " + ", ".join(f"{dtype} matmul {tflops:.3f} TFLOP/s"
                                          for dtype, tflops in peak.items()))
  results = measure_variants(config, variants, steps=FLAGS.steps, warmup=FLAGS.warmup,
                             aot=FLAGS.aot, peak_tflops=peak, others=others)
  for r in results:
    print(f"\n[{r['name']}] {'; '.join(r['overrides'])}\n{format_results(r)}")
  if len(results) > 1:
    print("\n" + format_table(results))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
