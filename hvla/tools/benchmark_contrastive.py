r"""Time and memory of the contrastive loss and its gradient, per strategy and batch size.

  python -m hvla.tools.benchmark_contrastive --n=4096,16384,65536 --d=512 \
      --strategies=dense,chunked,sharded --block=1024 --kind=softmax --repeats=5
  python -m hvla.tools.benchmark_contrastive --n=16384 --strategies=dense,chunked --two_pass

For every N and strategy, the symmetric `contrastive_loss` of N pairs and its gradient
with respect to both embedding sets and the logit scale is compiled ahead of time. The
table gives the compile time, the executable's memory per device (arguments + outputs +
temporaries, from XLA's memory analysis) and, for the cases whose memory fits in
--max_run_gib, the median of --repeats timed calls (alternating between the strategies
of one N, so their ratios hold on a loaded machine) and the rise of the process's
resident memory during a first, untimed call. A case that does not fit is compiled,
which allocates nothing of its size, but never run, and marked so. 'sharded' spreads the
rows over a 'data' axis of all devices (on a CPU host, 8 fake devices unless XLA_FLAGS
already sets a count); --block is the candidate block of 'chunked' and, within each
device, of 'sharded'. --two_pass also measures every strategy the two-pass way: two
one-way calls (x->y and y->x, summed and halved) instead of the symmetric call, whose
one pass over the logits feeds both directions.
"""
import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):  # must precede importing jax
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()

import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

from hvla.losses import contrastive  # noqa: E402
from hvla.tools import benchmark  # noqa: E402

_N = flags.DEFINE_list("n", ["4096", "16384", "65536"], "Numbers of pairs N.")
_D = flags.DEFINE_integer("d", 512, "Embedding width.")
_STRATEGIES = flags.DEFINE_list("strategies", list(contrastive.STRATEGIES), "Strategies.")
_BLOCK = flags.DEFINE_integer("block", 1024, "Candidates per block (chunked, sharded).")
_KIND = flags.DEFINE_enum("kind", "softmax", contrastive.KINDS, "Loss kind.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per case; the median counts.")
_MAX_RUN_GIB = flags.DEFINE_float(
    "max_run_gib", 8.0, "Run a case only if its compiled memory, summed over the devices "
    "of this process, is at most this many GiB; larger ones are only compiled.")
_TWO_PASS = flags.DEFINE_bool(
    "two_pass", False, "Also measure each strategy as two one-way calls (x->y, y->x).")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this file.")

GIB = 2**30


def loss_and_grads(strategy, *, kind="softmax", block_size=None, mesh=None, two_pass=False):
  """f(x, y, scale) -> (loss, (d_x, d_y, d_scale)) of the symmetric loss, not jitted;
  two_pass: as the mean of the one-way losses x->y and y->x, two calls."""
  def one_call(x, y, scale, symmetric):
    return contrastive.contrastive_loss(
        x, y, scale=scale, kind=kind, strategy=strategy, mesh=mesh, symmetric=symmetric,
        block_size=None if strategy == "dense" else block_size)
  def loss(x, y, scale):
    if two_pass:
      return (one_call(x, y, scale, False) + one_call(y, x, scale, False)) / 2
    return one_call(x, y, scale, True)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def row_mesh():
  """Every device on one 'data' axis, over which 'sharded' splits the rows."""
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def input_shardings(strategy, mesh=None):
  """Shardings of (x, y, scale): rows over `mesh` for 'sharded', else the first device."""
  if strategy != "sharded":
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return one, one, one
  rows = NamedSharding(mesh, PartitionSpec("data"))
  return rows, rows, NamedSharding(mesh, PartitionSpec())


def compile_case(n, d, strategy, *, kind="softmax", block_size=None, mesh=None,
                 two_pass=False):
  """(executable, compile seconds) of one case, compiled ahead of time from shapes."""
  if strategy == "sharded" and mesh is None:
    mesh = row_mesh()
  shardings = input_shardings(strategy, mesh)
  specs = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=s)
           for shape, s in zip(((n, d), (n, d), ()), shardings)]
  jitted = jax.jit(loss_and_grads(strategy, kind=kind, block_size=block_size, mesh=mesh,
                                  two_pass=two_pass))
  start = time.perf_counter()
  compiled = jitted.lower(*specs).compile()
  return compiled, time.perf_counter() - start


def make_inputs(n, d, shardings, seed=0):
  """Unit-norm random x and y [n, d] and CLIP's initial scale 1 / 0.07, generated in
  place on their devices."""
  def unit(key, sharding):
    @functools.partial(jax.jit, out_shardings=sharding)
    def sample():
      v = jax.random.normal(key, (n, d), jnp.float32)
      return v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    return sample()
  key_x, key_y = jax.random.split(jax.random.key(seed))
  return (unit(key_x, shardings[0]), unit(key_y, shardings[1]),
          jax.device_put(jnp.float32(1 / 0.07), shardings[2]))


def reset_peak_rss():
  """Restarts the kernel's high-water mark of this process's resident memory (Linux)
  and returns the current resident bytes; None where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    return None
  return _status_bytes("VmRSS")


def peak_rss():
  """Highest resident bytes of this process since the last `reset_peak_rss` (Linux)."""
  return _status_bytes("VmHWM")


def _status_bytes(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return None


def measure(n, d, strategies, *, kind="softmax", block_size=None, repeats=5,
            max_run_bytes=8 * GIB, mesh=None, two_pass=False):
  """One result per strategy at N = n (with two_pass, two: the symmetric call, then two
  one-way calls): compile time, memory per device and, when the case fits
  `max_run_bytes` over all devices, the seconds of `repeats` calls and the rise of
  resident memory during its first, untimed call.

  The timed calls alternate between the cases (one call of each in turn), so a change
  in the machine's load hits them alike and their ratios stay meaningful.
  """
  results, calls, inputs = [], [], {}
  cases = [(strategy, passes) for strategy in strategies
           for passes in ((False, True) if two_pass else (False,))]
  for strategy, passes in cases:
    compiled, compile_seconds = compile_case(n, d, strategy, kind=kind,
                                             block_size=block_size, mesh=mesh,
                                             two_pass=passes)
    shardings = compiled.input_shardings[0]
    memory = benchmark.memory_report(compiled)
    devices = len(shardings[0].device_set)
    result = {"n": n, "d": d, "strategy": strategy, "two_pass": passes, "kind": kind,
              "block": None if strategy == "dense" else block_size, "devices": devices,
              "compile_seconds": compile_seconds, "memory_per_device": memory,
              "ran": memory["peak"] * devices <= max_run_bytes}
    results.append(result)
    if result["ran"]:
      if shardings not in inputs:
        inputs[shardings] = make_inputs(n, d, shardings)
      baseline = reset_peak_rss()
      jax.block_until_ready(compiled(*inputs[shardings]))
      # The kernel updates its high-water mark lazily, so it may lag the resident bytes
      # read just after the reset by a page or so: a rise is never below 0.
      result["rss_rise_bytes"] = None if baseline is None else max(peak_rss() - baseline, 0)
      result["seconds_all"] = []
      calls.append((result, compiled, inputs[shardings]))
  for _ in range(repeats):
    for result, compiled, args in calls:
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      result["seconds_all"].append(time.perf_counter() - start)
  for result, _, _ in calls:
    result["seconds_median"] = statistics.median(result["seconds_all"])
  return results


def format_table(results):
  """A markdown table of `measure` results, each time also as a ratio to the (one-pass)
  dense time of the same N where dense ran; two-pass cases are marked as such."""
  gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
  dense = {r["n"]: r["seconds_median"] for r in results
           if r["strategy"] == "dense" and not r.get("two_pass") and r["ran"]}
  lines = ["| N | strategy | block | devices | compile s | memory/device GiB (temp, args, "
           "out) | memory all devices GiB | median s (runs) | vs dense | RSS rise GiB |",
           "|---" * 10 + "|"]
  for r in results:
    mem = r["memory_per_device"]
    name = r["strategy"] + (", two-pass" if r.get("two_pass") else "")
    row = [str(r["n"]), name, str(r["block"] or "-"), str(r["devices"]),
           f"{r['compile_seconds']:.1f}",
           f"{gib(mem['peak'])} ({gib(mem['temp'])}, {gib(mem['argument'])}, "
           f"{gib(mem['output'])})", gib(mem["peak"] * r["devices"])]
    if r["ran"]:
      ratio = (f"{r['seconds_median'] / dense[r['n']]:.2f}x" if r["n"] in dense else "-")
      rss = "-" if r["rss_rise_bytes"] is None else gib(r["rss_rise_bytes"])
      row += [f"{r['seconds_median']:.3f} ({len(r['seconds_all'])})", ratio, rss]
    else:
      row += ["not run (memory)", "-", "-"]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  results = []
  for n in (int(v) for v in _N.value):
    results += measure(n, _D.value, _STRATEGIES.value, kind=_KIND.value,
                       block_size=_BLOCK.value, repeats=_REPEATS.value,
                       max_run_bytes=_MAX_RUN_GIB.value * GIB, two_pass=_TWO_PASS.value)
    cases = len(_STRATEGIES.value) * (2 if _TWO_PASS.value else 1)
    print("\n".join(format_table(results).splitlines()[-cases:]), flush=True)
  print(f"\n{jax.device_count()} x {jax.devices()[0].device_kind}, D={_D.value}, "
        f"kind={_KIND.value}\n" + format_table(results))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
