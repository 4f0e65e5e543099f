"""Train straight through, and train again killed (SIGKILL) right after a checkpoint and
resumed: the runs the bit-exact resume tests compare."""
import os
import shutil
import signal
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def straight_and_resumed(command, tmp_path, env, kill_after=4, timeout=600):
  """Workdirs (straight, resumed) of `command(workdir)`: the second run is killed as soon
  as checkpoint `kill_after` is complete, everything it reached after that is discarded,
  and the same command resumes it."""
  straight = tmp_path / "straight"
  subprocess.run(command(straight), cwd=REPO, env=env, check=True, timeout=timeout,
                 capture_output=True)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  half = killed / "checkpoints" / str(kill_after)
  deadline = time.time() + timeout
  while not half.exists() and proc.poll() is None:  # Orbax renames it in when complete.
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  for step_dir in (killed / "checkpoints").iterdir():
    if step_dir.name != str(kill_after):
      shutil.rmtree(step_dir)
  subprocess.run(command(killed), cwd=REPO, env=env, check=True, timeout=timeout,
                 capture_output=True)
  return straight, killed
