r"""Trains configs for equal steps on equal data and prints their evaluations side by side.

  python -m hvla.tools.compare --configs=clip_vitb16,pyramid_vitb16 --steps=600 \
      --workdir=/tmp/compare

Each entry of --configs is `configs/<name>.py` run as `<name>.py:runlocal[,ARGS]` (write
`pyramid_vitb16:leff=false` to pass ARGS): the same tiny towers, hvla_shapes data, seed,
batch and number of steps for all. Every config is evaluated with its own zero-shot and
retrieval evals plus phrase grounding on the same view (added where the config has no
grounding eval), once, at the end. Runs go to `<workdir>/<name>` one after the other,
in this process; a run that already reached its last step is reused, not retrained. The
markdown table is printed and written to `<workdir>/comparison.md`.
"""
import importlib
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a program: importing this module (tests) adds no flags."""
  flags.DEFINE_list("configs", None, "Config names in configs/, each NAME[:ARGS].")
  flags.DEFINE_integer("steps", None, "Training steps for every config (default: the "
                       "runlocal steps).")
  flags.DEFINE_integer("batch", None, "Global batch size for every config.")
  flags.DEFINE_string("workdir", None, "Where each config's run goes.")


def load_config(entry, *, steps=None, batch=None):
  """`NAME[:ARGS]` -> configs/NAME.py's config for `runlocal,ARGS`, with equal length,
  batch and a grounding eval, evaluated only at the end."""
  from hvla import evaluators  # pylint: disable=g-import-not-at-top
  name, _, args = entry.partition(":")
  config = importlib.import_module(f"configs.{name}").get_config(
      ",".join(filter(None, ("runlocal", args))))
  if steps:
    config.total_steps, config.total_epochs, config.total_examples = steps, None, None
    config.schedule.warmup_steps = min(config.schedule.warmup_steps or 0, steps // 10)
    config.schedule.warmup_epochs = config.schedule.warmup_examples = None
  if batch:
    config.batch_size = batch
  if not config.evals:
    raise ValueError(f"{entry}: its runlocal config has no evals to compare.")
  if not any(ev.type == "grounding" for ev in config.evals.values()):
    view = next(iter(config.evals.values())).view
    config.evals.grounding = evaluators.default_eval_config(
        "grounding", split="validation", view=view)
  config.checkpoint_every = config.total_steps
  for ev in config.evals.values():
    ev.every_steps = config.total_steps
  return config


def run(entry, config, workdir):
  """Trains (unless already done) and evaluates one config -> (results, train seconds)."""
  from hvla import train  # pylint: disable=g-import-not-at-top
  train_config = config.copy_and_resolve_references()
  train_config.evals = {}  # Evaluated once below, not by the training loop.
  start = time.perf_counter()
  logging.info("Training %s in %s.", entry, workdir)
  train.train(train_config, workdir)
  seconds = time.perf_counter() - start
  return train.evaluate(config, workdir), seconds


def markdown_table(columns):
  """{column: {metric: value}} -> a markdown table, one row per metric (timings last)."""
  metrics = sorted({m for values in columns.values() for m in values},
                   key=lambda m: (m.endswith("seconds"), m))
  lines = ["| metric | " + " | ".join(columns) + " |",
           "|---|" + "---|" * len(columns)]
  for metric in metrics:
    cells = [columns[c].get(metric) for c in columns]
    lines.append(f"| {metric} | " + " | ".join(
        "-" if v is None else f"{v:.1f}" if metric.endswith("seconds") else f"{v:.3f}"
        for v in cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  if not FLAGS.configs or not FLAGS.workdir:
    raise app.UsageError("--configs and --workdir are required.")
  configs = {entry: load_config(entry, steps=FLAGS.steps, batch=FLAGS.batch)
             for entry in FLAGS.configs}
  lengths = {c.total_steps for c in configs.values()}
  batches = {c.batch_size for c in configs.values()}
  if len(lengths) > 1 or len(batches) > 1:
    raise ValueError(f"The configs train for different steps {lengths} or batches "
                     f"{batches}; give --steps and --batch.")
  columns = {}
  for entry, config in configs.items():
    workdir = os.path.join(FLAGS.workdir, entry.replace(":", "_").replace(",", "_"))
    results, seconds = run(entry, config, workdir)
    columns[entry] = {k: v for k, v in results.items() if not k.endswith("/seconds")}
    columns[entry]["train/seconds"] = seconds
  table = markdown_table(columns)
  header = (f"{lengths.pop()} steps at batch {batches.pop()} on hvla_shapes "
            f"(runlocal towers), evaluated on the validation split.")
  with open(os.path.join(FLAGS.workdir, "comparison.md"), "w") as f:
    f.write(header + "\n\n" + table + "\n")
  with open(os.path.join(FLAGS.workdir, "comparison.json"), "w") as f:
    json.dump(columns, f, indent=2, sort_keys=True)
  print(header + "\n\n" + table)


if __name__ == "__main__":
  define_flags()
  app.run(main)
