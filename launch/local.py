r"""Runs N processes of an hvla entry point on this machine, each with K fake CPU devices.

The cheapest way to exercise the multi-host code paths (jax.distributed, per-host data
slices, global arrays, checkpoints written by several processes) without a cluster:

  python -m launch.local --processes 2 --devices 4 -- \
      --config=configs/clip_vitb16.py:runlocal --workdir=/tmp/hvla_2x4

Each process runs `python -m MODULE --coordinator_address=localhost:PORT
--num_processes=N --process_id=I ARGS...` with XLA_FLAGS asking for K host devices.
Output comes back line by line, prefixed with the rank. When a process fails the others
are stopped and the launcher exits with the failing process's status.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A localhost TCP port that nothing listens on right now (for the coordinator)."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def xla_flags_with_devices(xla_flags: str, devices: int) -> str:
  """`xla_flags` with the fake CPU device count set to `devices`, other flags kept."""
  kept = [f for f in xla_flags.split() if f.split("=")[0] != _DEVICE_COUNT_FLAG]
  return " ".join([*kept, f"{_DEVICE_COUNT_FLAG}={devices}"])


def process_command(module: str, args: list[str], *, coordinator: str, processes: int,
                    rank: int) -> list[str]:
  """The argv of one rank: the distributed flags first, so forwarded ones may override."""
  return [sys.executable, "-m", module, f"--coordinator_address={coordinator}",
          f"--num_processes={processes}", f"--process_id={rank}", *args]


def launch(module: str, args: list[str], *, processes: int, devices: int,
           port: int | None = None, grace_s: float = 10.0) -> int:
  """Runs the processes to the end; returns 0, or the exit status of the first to fail.

  A process killed by signal S counts as status 128 + S, as in a shell. Stopped
  processes get SIGTERM, then SIGKILL after `grace_s` seconds (after jax.distributed
  starts, jax turns SIGTERM into a preemption notice rather than an exit). Each runs in
  its own session so that its children (data loader workers) are stopped with it.
  """
  if processes < 1 or devices < 1:
    raise ValueError(f"need at least one process and one device, got processes={processes}, "
                     f"devices={devices}")
  coordinator = f"localhost:{port or free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=xla_flags_with_devices(os.environ.get("XLA_FLAGS", ""), devices))
  width = len(str(processes - 1))
  lock = threading.Lock()
  procs, readers = [], []
  try:
    for rank in range(processes):
      proc = subprocess.Popen(
          process_command(module, args, coordinator=coordinator, processes=processes,
                          rank=rank),
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
          errors="replace", start_new_session=True)
      procs.append(proc)
      reader = threading.Thread(target=_forward, args=(proc.stdout, f"[{rank:>{width}}] ", lock))
      reader.start()
      readers.append(reader)
    return _wait_for_first_failure(procs)
  except KeyboardInterrupt:
    return 128 + signal.SIGINT
  finally:
    _stop(procs, grace_s)
    for reader in readers:
      reader.join()


def _forward(stream, prefix: str, lock: threading.Lock):
  """Copies a process's output to ours line by line, whole lines only, under `prefix`."""
  for line in stream:
    with lock:
      sys.stdout.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
      sys.stdout.flush()


def _wait_for_first_failure(procs: list[subprocess.Popen]) -> int:
  while True:
    codes = [proc.poll() for proc in procs]
    for rank, code in enumerate(codes):
      if code:
        status = code if code > 0 else 128 - code
        print(f"launch.local: rank {rank} exited with status {status}; stopping the others",
              file=sys.stderr, flush=True)
        return status
    if all(code == 0 for code in codes):
      return 0
    time.sleep(0.1)


def _stop(procs: list[subprocess.Popen], grace_s: float):
  running = [proc for proc in procs if proc.poll() is None]
  for proc in running:
    _signal_group(proc, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for proc in running:
    try:
      proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(proc, signal.SIGKILL)
      proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int):
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:  # Exited between the check and the signal.
    pass


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], allow_abbrev=False,
      usage="%(prog)s [--processes N] [--devices K] [--module M] [--port P] [--grace S] "
            "-- ARGS...")
  parser.add_argument("--processes", type=int, default=2, help="processes to start")
  parser.add_argument("--devices", type=int, default=4, help="fake CPU devices per process")
  parser.add_argument("--module", default="hvla.main", help="module run with python -m")
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port on localhost (default: a free one)")
  parser.add_argument("--grace", type=float, default=10.0,
                      help="seconds a stopped process gets between SIGTERM and SIGKILL")
  parser.add_argument("args", nargs="*", help="forwarded to the module, after --")
  flags = parser.parse_args(argv)
  # A SIGTERM (a job scheduler, a test timeout) stops the processes like Ctrl-C does.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  try:
    return launch(flags.module, flags.args, processes=flags.processes, devices=flags.devices,
                  port=flags.port, grace_s=flags.grace)
  except ValueError as e:
    parser.error(str(e))


if __name__ == "__main__":
  sys.exit(main())
