r"""hvla's CLIP train step against public JAX CLIP trainers on the same towers and batch.

From the repository root (benchmarks/ is not installed):

  pip install -e ".[reference]"
  python -m benchmarks.reference --config=configs/clip_vitb16.py --batch=8 \
      --dtypes=bfloat16,float32
  python -m benchmarks.reference --reference=big_vision \
      --big_vision_dir=PATH/TO/big_vision --config=configs/clip_vitb16.py --batch=8

Two references, each trained the way its own training code does (its loss, its
optimizer, one jitted step) with the hvla config's tower sizes and AdamW hyperparameters:
- `transformers` (default): `FlaxCLIPModel` of Hugging Face transformers, as its
  contrastive-image-text example trains it, from hvla's initial parameters: the same
  function on the same values (`reference_transformers`).
- `big_vision`: big_vision's two-tower CLIP, as its contrastive trainer trains it, from
  a checkout: near-equal FLOPs, not the same function (`reference_big_vision`).
hvla's own step runs on the same single device with the same synthetic batch and compute
dtype as configured (gradient clipping, decay masks, norm metrics and all) and, where
the reference does not clip gradients, also without clipping. The steps alternate, so
the ratios of their median times hold on a loaded machine.
"""
from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from benchmarks import reference_big_vision
from benchmarks import reference_transformers
from benchmarks import towers
from hvla.data import synthetic
from hvla.tools import benchmark

FLAGS = flags.FLAGS
REFERENCES = ("transformers", "big_vision")


def define_flags():
  config_flags.DEFINE_config_file("config", "configs/clip_vitb16.py", "hvla config[:args].")
  flags.DEFINE_enum("reference", "transformers", REFERENCES, "The trainer to compare with.")
  flags.DEFINE_string("big_vision_dir", None, "Root of a big_vision checkout "
                      "(--reference=big_vision; default: big_vision on the import path).")
  flags.DEFINE_integer("batch", 8, "Batch size.")
  flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes to compare in.")
  flags.DEFINE_integer("steps", 5, "Timed steps of each.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")


def make_reference(name, hvla_config, params, host_batch, dtype, big_vision_dir=None):
  """The reference step `name` for hvla's config, its initial `params` and a batch."""
  if name == "transformers":
    return reference_transformers.TransformersCase(hvla_config, params, host_batch,
                                                   dtype=dtype)
  if name == "big_vision":
    return reference_big_vision.BigVisionCase(hvla_config, host_batch, dtype=dtype,
                                              big_vision_dir=big_vision_dir)
  raise ValueError(f"Unknown reference {name!r}; choose from {REFERENCES}.")


def compare(config, *, batch, dtypes, steps, warmup, reference="transformers",
            big_vision_dir=None):
  """Per dtype, the results of [hvla's step as configured, (hvla's step without
  gradient clipping, where the reference does not clip), the reference's step], on the
  same tower sizes, batch and device."""
  towers.check_clip_towers(config.model)
  rows = []
  for dtype in dtypes:
    hvla_config = benchmark.apply_overrides(
        config, [f"batch_size={batch}", f"model.dtype='{dtype}'", "accum_steps=1",
                 "mesh.data=1", "mesh.fsdp=1", "mesh.model=1"])
    one_device = jax.devices()[:1]
    configured = benchmark.Case(
        f"hvla (clip_norm={hvla_config.optimizer.clip_norm}), {dtype}", hvla_config,
        aot=False, devices=one_device)
    host_batch = synthetic.batch(
        synthetic.batch_spec(hvla_config.data, batch), hvla_config.model.text.vocab_size)
    theirs = make_reference(reference, hvla_config,
                            jax.device_get(configured.state["params"]), host_batch,
                            dtype, big_vision_dir)
    ours = [configured]
    if not theirs.clips_gradients:
      ours.append(benchmark.Case(
          f"hvla (clip_norm=0), {dtype}",
          benchmark.apply_overrides(hvla_config, ["optimizer.clip_norm=0.0"]), aot=False,
          devices=one_device))
    times = benchmark.time_interleaved(ours + [theirs], steps=steps, warmup=warmup)
    parameters = benchmark.parameter_count(configured.state["params"])
    row = [benchmark.add_speed(dict(case.results, parameters=parameters), times[case.name])
           for case in ours]
    row.append(benchmark.add_speed(
        {"name": theirs.name, "batch": batch, "parameters": theirs.parameters,
         "device_kind": configured.results["device_kind"],
         "flops_per_step": theirs.flops_per_step}, times[theirs.name]))
    rows.append(row)
  return rows


def format_table(rows):
  """Markdown: each step's size, median time, and the reference's time over its own."""
  lines = ["| dtype | step | parameters | FLOPs / step | step s (median of n) | "
           "examples/s | speed vs reference |", "|---|---|---|---|---|---|---|"]
  for row in rows:
    reference = row[-1]["step_seconds_median"]
    for r in row:
      name, dtype = r["name"].rsplit(", ", 1)
      lines.append(f"| {dtype} | {name} | {r['parameters']:,} | "
                   f"{r['flops_per_step']:.4g} | "
                   f"{r['step_seconds_median']:.2f} ({len(r['step_seconds_all'])}) | "
                   f"{r['examples_per_sec']:.2f} | "
                   f"{reference / r['step_seconds_median']:.2f}x |")
  return "\n".join(lines)


def main(argv):
  del argv
  rows = compare(FLAGS.config, batch=FLAGS.batch, dtypes=FLAGS.dtypes, steps=FLAGS.steps,
                 warmup=FLAGS.warmup, reference=FLAGS.reference,
                 big_vision_dir=FLAGS.big_vision_dir)
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), batch {FLAGS.batch}\n"
        + format_table(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main)
