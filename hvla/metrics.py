"""Training metrics: on-device accumulation, TensorBoard through clu, a console line."""
import datetime
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers


class MeanAccumulator:
  """Keeps per-step metric dicts on device and averages them only when asked.

  Holding the arrays (rather than converting each step) keeps dispatch asynchronous:
  the host never waits for the device between logging points.
  """

  def __init__(self):
    self._steps = []

  def add(self, metrics):
    self._steps.append(metrics)

  def result(self):
    steps = jax.device_get(self._steps)
    self._steps = []
    if not steps:
      return {}
    return {k: float(np.mean([s[k] for s in steps])) for k in steps[0]}


class Throughput:
  """Examples/s and the ETA between two logging points."""

  def __init__(self, batch_size, total_steps, start_step):
    self.batch_size, self.total_steps = batch_size, total_steps
    self._time, self._step = time.perf_counter(), start_step

  def restart(self, step):
    """Starts a new interval, leaving out time spent elsewhere (evaluation)."""
    self._time, self._step = time.perf_counter(), step

  def update(self, step):
    now = time.perf_counter()
    seconds_per_step = (now - self._time) / max(step - self._step, 1)
    self._time, self._step = now, step
    return {
        "perf/examples_per_sec": self.batch_size / seconds_per_step,
        "perf/steps_per_sec": 1.0 / seconds_per_step,
        "perf/eta_hours": seconds_per_step * (self.total_steps - step) / 3600,
    }


def make_writer(workdir):
  """TensorBoard event files in the workdir, written by process 0 in the background.

  The console gets `console_line` instead of every scalar (clu's default writer would
  also log each one).
  """
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))


def quiet_library_logs():
  """Keeps the console to hvla's own lines: libraries' INFO records are dropped.

  Warnings and errors from anywhere still show; so does everything at --verbosity=1.
  """
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  def keep(record):
    return (record.levelno >= 30 or absl_logging.get_verbosity() > 0
            or "/hvla/" in record.pathname.replace("\\", "/"))
  absl_logging.get_absl_handler().addFilter(keep)


def console_line(step, total_steps, scalars):
  """A concise progress line: step, every loss term, lr, throughput, ETA."""
  parts = [f"step {step}/{total_steps}"]
  for key in sorted(k for k in scalars if k == "loss" or k.endswith("/loss")):
    parts.append(f"{key} {scalars[key]:.4f}")
  if "lr" in scalars:
    parts.append(f"lr {scalars['lr']:.2e}")
  if "perf/examples_per_sec" in scalars:
    parts.append(f"{scalars['perf/examples_per_sec']:.1f} ex/s")
  if "perf/eta_hours" in scalars:
    eta = datetime.timedelta(seconds=round(scalars["perf/eta_hours"] * 3600))
    parts.append(f"ETA {eta}")
  return " | ".join(parts)


def log_console(step, total_steps, scalars):
  logging.info("%s", console_line(step, total_steps, scalars))
