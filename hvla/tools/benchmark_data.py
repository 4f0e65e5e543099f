r"""Input-pipeline throughput: examples/s per grain worker, two augmented views.

  python -m hvla.tools.benchmark_data --size=224 --workers=0,1,2 --repeats=5

Each example is decoded once and rendered as two views of `--size` pixels with
UniCLIP-style augmentation (random resized crop 0.5-1, flip, colour jitter 0.4,
grayscale 0.2, blur 0.5) plus its tokenised caption, i.e. the heaviest per-example work
of hvla's objectives. Prints a markdown table: the median of `--repeats` runs per worker
count, the rate per worker, and the workers needed to feed an accelerator that trains on
each of `--accelerator_rates` examples/s.
"""
import math
import statistics
import time

from absl import app
from absl import flags

from hvla.data import pipeline

_DATASET = flags.DEFINE_string("dataset", "hvla_shapes", "Dataset to read.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir.")
_SIZE = flags.DEFINE_integer("size", 224, "View side (and hvla_shapes image side).")
_NUM_RECORDS = flags.DEFINE_integer("num_records", 2048, "hvla_shapes training records.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to time.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
_BATCHES = flags.DEFINE_integer("batches", 16, "Timed batches per run.")
_WARMUP = flags.DEFINE_integer("warmup", 4, "Untimed batches first (worker start-up).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs per worker count; the median counts.")
_RATES = flags.DEFINE_list("accelerator_rates", ["500", "1000", "2000"],
                           "Examples/s one accelerator trains on, to size the workers.")


def benchmark_config(dataset, data_dir, size, num_records):
  config = pipeline.default_data_config()
  config.dataset, config.data_dir = dataset, data_dir
  config.shapes.update(image_size=size, num_train=num_records, num_validation=64,
                       num_test=64)
  view = dict(size=size, crop_scale=(0.5, 1.0), flip=True, color_jitter=0.4,
              grayscale_p=0.2, blur_p=0.5)
  config.views = dict(aug1=view, aug2=view)
  config.text.max_len = 77
  return config


def examples_per_second(config, workers, batch_size, batches, warmup):
  """Throughput of one fresh loader after `warmup` batches."""
  config.worker_count = workers
  it = iter(pipeline.make_loader(config, split="train", global_batch_size=batch_size,
                                 train=True, seed=0, process_index=0, process_count=1))
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  config = benchmark_config(_DATASET.value, _DATA_DIR.value, _SIZE.value,
                            _NUM_RECORDS.value)
  pipeline.ensure_dataset(config)
  rates = [float(r) for r in _RATES.value]
  lines = ["| workers | examples/s (median) | runs | examples/s per worker | "
           + " | ".join(f"workers for {r:g}/s" for r in rates) + " |",
           "|---" * (4 + len(rates)) + "|"]
  for workers in (int(w) for w in _WORKERS.value):
    runs = [examples_per_second(config, workers, _BATCH_SIZE.value, _BATCHES.value,
                                _WARMUP.value) for _ in range(_REPEATS.value)]
    median = statistics.median(runs)
    per_worker = median / max(workers, 1)
    lines.append(f"| {workers} | {median:.0f} | {', '.join(f'{r:.0f}' for r in runs)} | "
                 f"{per_worker:.0f} | "
                 + " | ".join(str(math.ceil(r / per_worker)) for r in rates) + " |")
    print(lines[-1], flush=True)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
