"""launch/: the TPU pod commands, the SLURM script, and local multi-process runs.

Cloud and cluster tools are replaced by fakes on PATH that record how they are called
and, for `gcloud ... ssh`, run the remote command in a local bash whose HOME stands in
for a worker, so quoting is checked by a real shell rather than by string comparison.
"""
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

from launch import local
from launch import tpu_pod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def _write_executable(path, text):
  with open(path, "w") as f:
    f.write(textwrap.dedent(text).lstrip())
  os.chmod(path, 0o755)
  return str(path)


def _read_nul_list(path):
  with open(path) as f:
    return f.read().split("\0")[:-1]


def _wait_for(predicate, timeout=20.0):
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      raise TimeoutError("condition not met in time")
    time.sleep(0.05)


def _alive(pid):
  """True while `pid` runs (a zombie nobody reaps counts as gone)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


# ------------------------------------------------------------------------------------
# tpu_pod.py
# ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_real_gcloud(tmp_path, monkeypatch):
  """Puts a `gcloud` that refuses to run first on PATH: no test may reach the cloud."""
  guard = tmp_path / "guard"
  guard.mkdir()
  _write_executable(guard / "gcloud", """\
      #!/bin/sh
      echo "the real gcloud must not run in tests: $*" >&2
      exit 99
  """)
  monkeypatch.setenv("PATH", f"{guard}:{os.environ['PATH']}")


def _tpu_pod(*args, env=None):
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "tpu_pod.py"), *args],
                        capture_output=True, text=True, env=env, timeout=120)


def _dry_run(subcommand, *args):
  result = _tpu_pod(subcommand, "--dry-run", *args)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def test_remote_path_is_quoted_and_relative_to_the_remote_home():
  assert tpu_pod.remote_path("hvla") == "~/hvla"
  assert tpu_pod.remote_path("~/runs/a b.log") == "~/'runs/a b.log'"
  assert tpu_pod.remote_path("/mnt/disk/it's") == "'/mnt/disk/it'\"'\"'s'"
  home = "/home/worker"
  for path, expected in [("a b/c.log", f"{home}/a b/c.log"), ("/x/it's", "/x/it's")]:
    echoed = subprocess.run(["bash", "-c", f"printf %s {tpu_pod.remote_path(path)}"],
                            capture_output=True, text=True, env={"HOME": home}).stdout
    assert echoed == expected


def test_env_assignments_take_literal_or_local_values():
  environ = {"TOKEN": "s3 cr=t"}
  assert tpu_pod.env_assignments(["A=1", "TOKEN", "EMPTY="], environ) == [
      "A=1", "TOKEN=s3 cr=t", "EMPTY="]
  with pytest.raises(ValueError, match="not a variable name"):
    tpu_pod.env_assignments(["1A=x"], environ)
  with pytest.raises(ValueError, match="MISSING: the variable is not set"):
    tpu_pod.env_assignments(["MISSING"], environ)


def test_tpu_pod_dry_run_create_logs_stop_delete():
  where = ["pod-1", "--zone=us-central2-b", "--project=my-proj"]
  assert _dry_run("create", *where, "--accelerator-type=v4-32", "--spot") == [[
      *GCLOUD_TPU, "create", "pod-1", "--zone=us-central2-b", "--project=my-proj",
      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]]
  assert _dry_run("create", "pod-1", "--zone=z", "--accelerator-type=v5p-8",
                  "--version=v2-alpha-tpuv6e", "--reserved") == [[
      *GCLOUD_TPU, "create", "pod-1", "--zone=z", "--accelerator-type=v5p-8",
      "--version=v2-alpha-tpuv6e", "--reserved"]]
  assert _dry_run("logs", *where, "--worker=3", "--lines=20", "--follow",
                  "--log=runs/a b.log") == [[
      *GCLOUD_TPU, "ssh", "pod-1", "--zone=us-central2-b", "--project=my-proj", "--worker=3",
      "--command=tail -n 20 -f ~/'runs/a b.log'"]]
  [stop] = _dry_run("stop", *where, "--grace=5")
  assert stop[:9] == [*GCLOUD_TPU, "ssh", "pod-1", "--zone=us-central2-b",
                      "--project=my-proj", "--worker=all"]
  assert "sleep 5;" in stop[9]
  assert _dry_run("delete", *where, "--quiet") == [[
      *GCLOUD_TPU, "delete", "pod-1", "--zone=us-central2-b", "--project=my-proj", "--quiet"]]


def test_tpu_pod_dry_run_setup_copies_or_clones():
  archive = os.path.join(tempfile.gettempdir(), "pod-1-hvla-src.tar.gz")
  tar, scp, rm, ssh = _dry_run("setup", "pod-1", "--zone=z", "--source=/src dir",
                               "--exclude=workdirs")
  assert tar == ["tar", "-czf", archive, "--exclude=.git", "--exclude=__pycache__",
                 "--exclude=*.egg-info", "--exclude=.pytest_cache", "--exclude=workdirs",
                 "-C", "/src dir", "."]
  assert scp == [*GCLOUD_TPU, "scp", archive, "pod-1:pod-1-hvla-src.tar.gz", "--zone=z",
                 "--worker=all"]
  assert rm == ["rm", archive]
  assert ssh == [*GCLOUD_TPU, "ssh", "pod-1", "--zone=z", "--worker=all",
                 "--command=mkdir -p ~/hvla && tar -xzf ~/pod-1-hvla-src.tar.gz -C ~/hvla"
                 " && rm ~/pod-1-hvla-src.tar.gz"
                 " && python3 -m pip install -e ~/hvla 'jax[tpu]'"]
  assert _dry_run("setup", "pod-1", "--zone=z", "--git=https://example.com/h v.git",
                  "--ref=v1.0", "--pip=jax[tpu]", "--pip=tensorboard") == [[
      *GCLOUD_TPU, "ssh", "pod-1", "--zone=z", "--worker=all",
      "--command=(test -d ~/hvla/.git || git clone 'https://example.com/h v.git' ~/hvla)"
      " && git -C ~/hvla fetch origin v1.0 && git -C ~/hvla checkout --detach FETCH_HEAD"
      " && python3 -m pip install -e ~/hvla 'jax[tpu]' tensorboard"]]


def test_tpu_pod_dry_run_run_is_valid_shell_and_rejects_bad_input():
  [run] = _dry_run("run", "pod-1", "--zone=z", "--env=A=1", "--", "--workdir=gs://b/w")
  assert run[:8] == [*GCLOUD_TPU, "ssh", "pod-1", "--zone=z", "--worker=all"]
  script = run[8].removeprefix("--command=")
  assert "setsid nohup env A=1 python3 -m hvla.main --workdir=gs://b/w > ~/hvla.log" in script
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
  for args, message in [(["--env=1A=x"], "not a variable name"),
                        (["--spot"], "unrecognized arguments")]:
    result = _tpu_pod("run", "pod-1", "--zone=z", *args, "--", "--workdir=w")
    assert result.returncode == 2 and message in result.stderr
  result = _tpu_pod("logs", "pod-1", "--zone=z", "--", "--workdir=w")
  assert result.returncode == 2 and "logs takes no arguments after --" in result.stderr


FAKE_GCLOUD = """\
  #!{python}
  # Stands in for gcloud: records its argv; ssh runs --command in bash with HOME set to
  # the chosen fake worker's directory, scp copies into it.
  import json, os, shutil, subprocess, sys
  args = sys.argv[1:]
  with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
  verb, rest = args[3], args[4:]
  options = dict(a[2:].split("=", 1) for a in rest if a.startswith("--") and "=" in a)
  positionals = [a for a in rest if not a.startswith("--")]
  root = os.environ["FAKE_WORKERS"]
  workers = sorted(os.listdir(root))
  worker = options.get("worker", "0")
  homes = [os.path.join(root, w) for w in (workers if worker == "all" else [workers[int(worker)]])]
  status = 0
  for home in homes:
    if verb == "ssh":
      status = status or subprocess.run(["bash", "-c", options["command"]], cwd=home,
                                        env=dict(os.environ, HOME=home)).returncode
    elif verb == "scp":
      source, dest = positionals
      shutil.copy(source, os.path.join(home, dest.split(":", 1)[1]))
  sys.exit(status)
"""

FAKE_WORKER_PYTHON = """\
  #!/bin/bash
  # Stands in for a worker's python3: records its directory, argv and $GREETING.
  printf '%s\\0' "$PWD" "$@" > "$HOME/$2.args"
  printf '%s' "${GREETING-unset}" > "$HOME/$2.env"
  if [ "$2" = hvla.main ]; then echo "training on $HOME"; exec sleep 60; fi
"""


def test_tpu_pod_commands_work_end_to_end_against_fake_gcloud(tmp_path):
  bin_dir, workers, source, scratch = (tmp_path / d for d in ("bin", "workers", "src", "tmp"))
  for d in (bin_dir, workers / "w0", workers / "w1", source / ".git", source / "pkg" /
            "__pycache__", scratch):
    d.mkdir(parents=True)
  (source / "pkg" / "model.py").write_text("weights = 1\n")
  (source / ".git" / "HEAD").write_text("ref\n")
  (source / "pkg" / "__pycache__" / "model.pyc").write_text("")
  _write_executable(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
  python = _write_executable(bin_dir / "worker-python", FAKE_WORKER_PYTHON)
  log = tmp_path / "gcloud.log"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_WORKERS=str(workers),
             FAKE_GCLOUD_LOG=str(log), TMPDIR=str(scratch), GREETING="hello  'world'")
  homes = [str(workers / "w0"), str(workers / "w1")]
  where = ["pod-e2e", "--zone=z"]

  result = _tpu_pod("setup", *where, f"--python={python}", f"--source={source}", env=env)
  assert result.returncode == 0, result.stderr
  assert os.listdir(scratch) == []  # The local tarball is gone.
  for home in homes:
    assert sorted(os.listdir(home)) == ["hvla", "pip.args", "pip.env"]
    assert sorted(os.listdir(os.path.join(home, "hvla"))) == ["pkg"]
    assert os.listdir(os.path.join(home, "hvla", "pkg")) == ["model.py"]
    assert _read_nul_list(os.path.join(home, "pip.args")) == [
        home, "-m", "pip", "install", "-e", f"{home}/hvla", "jax[tpu]"]

  forwarded = ["--config=configs/x.py:runlocal,batch=8", "--workdir=/shared/w",
               "--config.name=it's \"q\" $HOME `id` * ;"]
  pids = []
  try:
    result = _tpu_pod("run", *where, f"--python={python}", "--env=GREETING", "--",
                      *forwarded, env=env)
    assert result.returncode == 0, result.stderr
    for home in homes:
      args_file = os.path.join(home, "hvla.main.args")
      _wait_for(lambda: os.path.exists(args_file) and _read_nul_list(args_file))
      with open(os.path.join(home, "hvla.log.pid")) as f:
        pids.append(int(f.read()))
      assert _read_nul_list(args_file) == [f"{home}/hvla", "-m", "hvla.main", *forwarded]
      with open(os.path.join(home, "hvla.main.env")) as f:
        assert f.read() == "hello  'world'"
      assert all(map(_alive, pids))

    again = _tpu_pod("run", *where, f"--python={python}", "--", *forwarded, env=env)
    assert again.returncode == 1 and f"already running: pid {pids[0]}" in again.stderr

    _wait_for(lambda: "training" in open(os.path.join(homes[1], "hvla.log")).read())
    shown = _tpu_pod("logs", *where, "--worker=1", env=env)
    assert shown.returncode == 0 and shown.stdout == f"training on {homes[1]}\n"

    assert _tpu_pod("stop", *where, "--grace=0", env=env).returncode == 0
    _wait_for(lambda: not any(map(_alive, pids)), timeout=10)
    assert not any(os.path.exists(os.path.join(h, "hvla.log.pid")) for h in homes)
  finally:
    for pid in filter(_alive, pids):
      os.killpg(pid, signal.SIGKILL)

  assert _tpu_pod("delete", *where, "--quiet", env=env).returncode == 0
  with open(log) as f:
    assert json.loads(f.readlines()[-1]) == [*GCLOUD_TPU[1:], "delete", "pod-e2e", "--zone=z",
                                             "--quiet"]


# ------------------------------------------------------------------------------------
# slurm_gpu.sbatch
# ------------------------------------------------------------------------------------

FAKE_SRUN = """\
  #!/bin/bash
  # Stands in for srun: records its argv and the environment the tasks would get.
  printf '%s\\0' "$@" > "$FAKE_OUT/srun.args"
  printf '%s\\0' "${JAX_LOCAL_DEVICE_IDS-unset}" "$XLA_FLAGS" \\
      "$XLA_PYTHON_CLIENT_MEM_FRACTION" > "$FAKE_OUT/srun.env"
  echo $$ > "$FAKE_OUT/srun.pid"
  if [ -n "${FAKE_SRUN_SECONDS:-}" ]; then exec sleep "$FAKE_SRUN_SECONDS"; fi
  exit "${FAKE_SRUN_STATUS:-0}"
"""

FAKE_SCONTROL = """\
  #!/bin/bash
  printf '%s\\0' "$@" > "$FAKE_OUT/scontrol.args"
"""


@pytest.fixture
def slurm(tmp_path):
  """Runs the sbatch script as SLURM would on a node with 4 GPUs and 32 CPUs."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_executable(bin_dir / "srun", FAKE_SRUN)
  _write_executable(bin_dir / "scontrol", FAKE_SCONTROL)
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HVLA_"))}
  base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_OUT=str(tmp_path),
              SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_ON_NODE="32",
              XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false")

  def start(*args, wait=True, **env):
    proc = subprocess.Popen(["bash", SBATCH, *args], env={**base, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
      return proc
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err

  return start, tmp_path


def test_sbatch_script_parses():
  assert subprocess.run(["bash", "-n", SBATCH]).returncode == 0


def test_sbatch_one_process_per_node_drives_all_gpus(slurm):
  start, out = slurm
  forwarded = ["--config=configs/x.py:runlocal", "--workdir=/shared/w", "--config.name=a b"]
  status, err = start(*forwarded)
  assert status == 0, err
  assert _read_nul_list(out / "srun.args") == [
      "--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=1", "python", "-m",
      "hvla.main", *forwarded]
  device_ids, xla_flags, fraction = _read_nul_list(out / "srun.env")
  assert device_ids == "0,1,2,3"
  assert xla_flags.split()[0] == "--xla_gpu_enable_latency_hiding_scheduler=true"
  assert xla_flags.split()[-1] == "--xla_gpu_enable_latency_hiding_scheduler=false"
  assert fraction == "0.9"


def test_sbatch_one_process_per_gpu(slurm):
  start, out = slurm
  status, err = start("--workdir=/shared/w", HVLA_PROCESS_PER="gpu", HVLA_PYTHON="/venv/py")
  assert status == 0, err
  assert _read_nul_list(out / "srun.args") == [
      "--ntasks-per-node=4", "--cpus-per-task=8", "--kill-on-bad-exit=1", "/venv/py", "-m",
      "hvla.main", "--workdir=/shared/w"]
  assert _read_nul_list(out / "srun.env")[0] == "unset"


def test_sbatch_reports_bad_settings_and_failures(slurm):
  start, _ = slurm
  status, err = start(HVLA_PROCESS_PER="socket")
  assert status == 2 and "HVLA_PROCESS_PER must be 'node' or 'gpu'" in err
  status, err = start(SLURM_GPUS_ON_NODE="")
  assert status != 0 and "no GPUs in this job" in err
  status, _ = start(FAKE_SRUN_STATUS="7")
  assert status == 7


def test_sbatch_requeues_itself_on_usr1(slurm):
  start, out = slurm
  proc = start("--workdir=/shared/w", wait=False, FAKE_SRUN_SECONDS="60")
  try:
    _wait_for(lambda: (out / "srun.pid").exists() and (out / "srun.pid").read_text())
    proc.send_signal(signal.SIGUSR1)
    proc.wait(timeout=30)  # Before srun ends: the trap ran while the script waited.
  finally:
    proc.kill()
    srun_pid = int((out / "srun.pid").read_text())
    if _alive(srun_pid):
      os.kill(srun_pid, signal.SIGKILL)
  assert _read_nul_list(out / "scontrol.args") == ["requeue", "4242"]
  assert "requeueing job 4242" in proc.stderr.read()


def test_sbatch_xla_flags_are_known_to_this_jaxlib(slurm):
  start, out = slurm
  assert start("--workdir=/shared/w")[0] == 0
  xla_flags = _read_nul_list(out / "srun.env")[1]
  check = subprocess.run(
      [sys.executable, "-c", "import jax; jax.numpy.ones(1).block_until_ready()"],
      env=dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=120)
  assert check.returncode == 0, check.stderr[-2000:]


# ------------------------------------------------------------------------------------
# local.py
# ------------------------------------------------------------------------------------


def test_xla_flags_with_devices_replaces_only_the_device_count():
  assert local.xla_flags_with_devices("", 4) == "--xla_force_host_platform_device_count=4"
  assert local.xla_flags_with_devices(
      "--xla_dump_to=/d --xla_force_host_platform_device_count=8 --xla_cpu_x=1", 2) == (
          "--xla_dump_to=/d --xla_cpu_x=1 --xla_force_host_platform_device_count=2")


def test_free_port_can_be_listened_on():
  port = local.free_port()
  with socket.socket() as sock:
    sock.bind(("localhost", port))
    sock.listen()


def test_process_command_puts_distributed_flags_before_forwarded_ones():
  assert local.process_command("m.main", ["--workdir=w"], coordinator="localhost:99",
                               processes=2, rank=1) == [
      sys.executable, "-m", "m.main", "--coordinator_address=localhost:99",
      "--num_processes=2", "--process_id=1", "--workdir=w"]


def test_launch_rejects_empty_runs():
  with pytest.raises(ValueError, match="processes=0"):
    local.launch("m", [], processes=0, devices=4)


def _local(*args, timeout=240):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [TESTS, REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, "-m", "launch.local", "--processes=2", "--devices=4",
       "--module=launch_target", *args], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=timeout)
  return result, time.monotonic() - start


def test_local_two_processes_psum_across_all_devices():
  tag = "it's a \"tag\" $HOME"
  result, _ = _local("--", f"--tag={tag}")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  expected = float(np.arange(1, 9).sum())  # Device d holds d + 1.
  for rank in range(2):
    assert f"[{rank}] rank={rank} processes=2 devices=8 local=4 psum={expected}\n" in (
        result.stdout)
    assert re.search(rf"^\[{rank}\] rank={rank} pid=\d+ tag={re.escape(tag)}$", result.stdout,
                     re.M)
  # Whole lines only, each under its rank's prefix.
  assert all(re.match(r"\[[01]\] ", line) for line in result.stdout.splitlines())


def test_local_failing_rank_stops_the_others():
  result, seconds = _local("--grace=1", "--", "--fail_rank=1")
  assert result.returncode == 3
  assert "rank 1 exited with status 3; stopping the others" in result.stderr
  survivor = int(re.search(r"^\[0\] rank=0 pid=(\d+)", result.stdout, re.M).group(1))
  assert not _alive(survivor)
  assert "psum" not in result.stdout
  assert seconds < 120  # The survivor sleeps 600 s unless stopped.
