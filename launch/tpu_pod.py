r"""Creates a Cloud TPU VM slice, installs hvla on every worker, runs and watches it.

  python launch/tpu_pod.py create hvla-pod --zone=us-central2-b --accelerator-type=v4-32 --spot
  python launch/tpu_pod.py setup hvla-pod --zone=us-central2-b
  python launch/tpu_pod.py run hvla-pod --zone=us-central2-b -- \
      --config=configs/pyramid_vitb16.py --workdir=gs://BUCKET/hvla/pyramid_vitb16
  python launch/tpu_pod.py logs hvla-pod --zone=us-central2-b --worker=0 --follow
  python launch/tpu_pod.py stop hvla-pod --zone=us-central2-b
  python launch/tpu_pod.py delete hvla-pod --zone=us-central2-b

Every subcommand takes --dry-run, which prints its commands instead of running them.
Commands are argv lists run without a local shell; the one string a shell reads, the
remote `ssh --command`, is assembled from shlex-quoted words. Remote relative paths are
taken from the remote home directory.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_EXCLUDES = (".git", "__pycache__", "*.egg-info", ".pytest_cache")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ------------------------------------------------------------------------------------
# Building blocks.
# ------------------------------------------------------------------------------------


def remote_path(path: str) -> str:
  """`path` as a remote shell word: absolute as given, otherwise under the remote home."""
  if path.startswith("/"):
    return shlex.quote(path)
  return "~/" + shlex.quote(path.removeprefix("~/"))


def gcloud(verb: str, positionals: list[str], flags: argparse.Namespace, *options: str):
  """A `gcloud compute tpus tpu-vm VERB` argv with the slice's zone and project."""
  project = [f"--project={flags.project}"] if flags.project else []
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *positionals, f"--zone={flags.zone}",
          *project, *options]


def ssh(flags: argparse.Namespace, worker: str, script: str) -> list[str]:
  """Runs the shell `script` on one worker (an index) or on all of them ('all')."""
  return gcloud("ssh", [flags.name], flags, f"--worker={worker}", f"--command={script}")


def env_assignments(specs: list[str], environ=os.environ) -> list[str]:
  """`NAME=VALUE` words from `NAME=VALUE` or `NAME` (which takes the local value)."""
  words = []
  for spec in specs:
    name, sep, value = spec.partition("=")
    if not _ENV_NAME.fullmatch(name):
      raise ValueError(f"--env {spec!r}: {name!r} is not a variable name.")
    if not sep:
      if name not in environ:
        raise ValueError(f"--env {name}: the variable is not set here, give NAME=VALUE.")
      value = environ[name]
    words.append(f"{name}={value}")
  return words


# ------------------------------------------------------------------------------------
# Subcommands: each returns the list of commands it runs.
# ------------------------------------------------------------------------------------


def create_commands(flags: argparse.Namespace) -> list[list[str]]:
  capacity = ["--spot"] if flags.spot else ["--reserved"] if flags.reserved else []
  return [gcloud("create", [flags.name], flags, f"--accelerator-type={flags.accelerator_type}",
                 f"--version={flags.version}", *capacity)]


def setup_commands(flags: argparse.Namespace) -> list[list[str]]:
  """Puts the code in --remote-dir on every worker, then pip-installs it editable.

  From a git remote (--git, at --ref) or, by default, as a tarball of --source; a
  copy lands on top of what is there, so files deleted locally stay on the workers.
  """
  repo = remote_path(flags.remote_dir)
  packages = flags.pip if flags.pip is not None else ["jax[tpu]"]
  install = f"{shlex.quote(flags.python)} -m pip install -e {repo} {shlex.join(packages)}"
  if flags.git:
    fetch = (f"(test -d {repo}/.git || git clone {shlex.quote(flags.git)} {repo})"
             f" && git -C {repo} fetch origin {shlex.quote(flags.ref)}"
             f" && git -C {repo} checkout --detach FETCH_HEAD")
    return [ssh(flags, "all", f"{fetch} && {install}")]
  archive = f"{flags.name}-hvla-src.tar.gz"
  local_archive = os.path.join(tempfile.gettempdir(), archive)
  excludes = [f"--exclude={pattern}" for pattern in (*DEFAULT_EXCLUDES, *flags.exclude)]
  unpack = (f"mkdir -p {repo} && tar -xzf {remote_path(archive)} -C {repo}"
            f" && rm {remote_path(archive)}")
  return [
      ["tar", "-czf", local_archive, *excludes, "-C", os.path.abspath(flags.source), "."],
      gcloud("scp", [local_archive, f"{flags.name}:{archive}"], flags, "--worker=all"),
      ["rm", local_archive],
      ssh(flags, "all", f"{unpack} && {install}"),
  ]


def run_commands(flags: argparse.Namespace) -> list[list[str]]:
  """Starts `python -m MODULE ARGS` in --remote-dir on every worker, detached.

  Each worker writes its own --log (and the process id next to it, for `stop`); a run
  still alive from before is an error rather than a second claim on the TPU.
  """
  log, pid = remote_path(flags.log), remote_path(flags.log + ".pid")
  env = env_assignments(flags.env)
  command = shlex.join([*(["env", *env] if env else []), flags.python, "-m", flags.module,
                        *flags.args])
  busy = (f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null;'
          f' then echo "already running: pid $(cat {pid}) on $(hostname)" >&2; exit 1; fi')
  start = (f"cd {remote_path(flags.remote_dir)}"
           f" && {{ setsid nohup {command} > {log} 2>&1 < /dev/null & echo $! > {pid}; }}")
  return [ssh(flags, "all", f"{busy}; {start}")]


def logs_commands(flags: argparse.Namespace) -> list[list[str]]:
  follow = " -f" if flags.follow else ""
  return [ssh(flags, str(flags.worker),
              f"tail -n {flags.lines}{follow} {remote_path(flags.log)}")]


def stop_commands(flags: argparse.Namespace) -> list[list[str]]:
  """Stops the run on every worker: SIGTERM, then SIGKILL after --grace seconds.

  jax turns SIGTERM into a preemption notice instead of an exit, hence the SIGKILL;
  signals go to the run's process group so that data loader workers stop too.
  """
  pid = remote_path(flags.log + ".pid")
  script = (f'if [ -f {pid} ]; then group=-"$(cat {pid})";'
            f' kill -TERM -- "$group" 2>/dev/null && sleep {flags.grace};'
            f' kill -KILL -- "$group" 2>/dev/null; rm -f {pid}; fi')
  return [ssh(flags, "all", script)]


def delete_commands(flags: argparse.Namespace) -> list[list[str]]:
  return [gcloud("delete", [flags.name], flags, *(["--quiet"] if flags.quiet else []))]


# ------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument("name", help="the TPU VM (slice) name")
  common.add_argument("--zone", required=True)
  common.add_argument("--project", default=None, help="default: gcloud's configured project")
  common.add_argument("--dry-run", action="store_true", help="print the commands only")
  remote = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  remote.add_argument("--remote-dir", default="hvla", help="the code's directory on workers")
  remote.add_argument("--python", default="python3", help="the workers' interpreter")
  log = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  log.add_argument("--log", default="hvla.log", help="each worker's log file")

  top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  sub = top.add_subparsers(dest="subcommand", required=True)

  create = sub.add_parser("create", parents=[common], help="create the slice")
  create.add_argument("--accelerator-type", required=True, help="e.g. v4-32, v5p-64")
  create.add_argument("--version", default="tpu-ubuntu2204-base",
                      help="TPU software version (v6e: v2-alpha-tpuv6e)")
  capacity = create.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
  capacity.add_argument("--reserved", action="store_true", help="use a reservation")
  create.set_defaults(commands=create_commands)

  setup = sub.add_parser("setup", parents=[common, remote], help="install hvla on all workers")
  setup.add_argument("--source", default=REPO_ROOT, help="local code to copy (default: here)")
  setup.add_argument("--exclude", action="append", default=[],
                     help=f"more patterns left out of the copy (always: {DEFAULT_EXCLUDES})")
  setup.add_argument("--git", default=None, help="clone this URL instead of copying")
  setup.add_argument("--ref", default="HEAD", help="branch, tag or commit of --git")
  setup.add_argument("--pip", action="append", default=None,
                     help="requirements installed along (default: jax[tpu]); repeatable")
  setup.set_defaults(commands=setup_commands)

  run = sub.add_parser("run", parents=[common, remote, log], help="start a run on all workers",
                       usage="%(prog)s NAME --zone=ZONE [options] -- ARGS...",
                       epilog="ARGS after -- are forwarded to the module.")
  run.add_argument("--module", default="hvla.main", help="module run with python -m")
  run.add_argument("--env", action="append", default=[],
                   help="NAME=VALUE, or NAME to pass the local value; repeatable")
  run.set_defaults(commands=run_commands)

  logs = sub.add_parser("logs", parents=[common, log], help="show a worker's log")
  logs.add_argument("--worker", type=int, default=0)
  logs.add_argument("--lines", type=int, default=100)
  logs.add_argument("--follow", action="store_true")
  logs.set_defaults(commands=logs_commands)

  stop = sub.add_parser("stop", parents=[common, log], help="stop the run on all workers")
  stop.add_argument("--grace", type=int, default=30, help="seconds from SIGTERM to SIGKILL")
  stop.set_defaults(commands=stop_commands)

  delete = sub.add_parser("delete", parents=[common], help="delete the slice")
  delete.add_argument("--quiet", action="store_true", help="do not ask for confirmation")
  delete.set_defaults(commands=delete_commands)
  return top


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  forwarded = []
  if "--" in argv:  # Split by hand: argparse mishandles "--" after a subcommand.
    argv, forwarded = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  top = parser()
  flags = top.parse_args(argv)
  if forwarded and flags.subcommand != "run":
    top.error(f"{flags.subcommand} takes no arguments after --")
  flags.args = forwarded
  try:
    commands = flags.commands(flags)
  except ValueError as e:
    top.error(str(e))
  for command in commands:
    if flags.dry_run:
      print(shlex.join(command))
      continue
    print("+ " + shlex.join(command), file=sys.stderr, flush=True)
    try:
      subprocess.run(command, check=True)
    except subprocess.CalledProcessError as e:
      print(f"tpu_pod: {command[0]} failed with status {e.returncode}", file=sys.stderr)
      return e.returncode
    except KeyboardInterrupt:
      return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
