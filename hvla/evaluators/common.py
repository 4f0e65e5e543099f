"""What every evaluator shares: the registry, the data source, the sharded pass, ranks.

An evaluation is one pass over a split: every host feeds its slice of each global batch
(the last one padded, `valid` False on the padding), a jitted per-example function runs
on the training mesh, and its outputs come back replicated to every host, where the
padded rows are dropped. Metrics are then computed from the exact, complete set of
per-example outputs, so they do not depend on the number of devices or hosts.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hvla import sharding
from hvla.data import pipeline
from hvla.losses.objective import field

_REGISTRY = {}


def register(type_name):
  """Class decorator: makes an evaluator available as `config.evals.<name>.type`."""
  def wrap(cls):
    if type_name in _REGISTRY:
      raise ValueError(f"Evaluator type {type_name!r} is registered twice.")
    _REGISTRY[type_name] = cls
    return cls
  return wrap


def types():
  return tuple(_REGISTRY)


def registered(type_name):
  if type_name not in _REGISTRY:
    raise ValueError(f"Unknown evaluator type {type_name!r}; known: {sorted(_REGISTRY)}.")
  return _REGISTRY[type_name]


class DatasetSource:
  """Evaluation batches of one dataset: the training `config.data` with the eval's overrides.

  Only the evaluated `view` is decoded (it also becomes the view of the boxes), and the
  `labels` the evaluator reads are added to those the data emits. `split=None` reads
  `config.data.eval_split`. `check` opens the dataset's description, never a record.
  """

  def __init__(self, data_config, overrides, batch_size, *, view, labels=()):
    config = data_config.copy_and_resolve_references()
    config.update(overrides)  # A locked data config rejects unknown keys by name.
    if view not in config.views:
      raise ValueError(f"The evaluated view {view!r} is not in config.data.views "
                       f"{sorted(config.views)}; set the eval's `view`.")
    config.views = {view: config.views[view].to_dict()}
    config.box_view = view
    config.labels = tuple(dict.fromkeys((*config.labels, *labels)))
    pipeline.validate_data_config(config)
    self.config, self.batch_size, self.text_len = config, batch_size, config.text.max_len
    self.labels = tuple(labels)

  def check(self, name, splits, paths):
    """Fails, naming the eval's key, where the dataset lacks one of the evaluator's
    `labels`, one of its `splits` ({config key: split or None}) or a batch field in
    `paths`: before anything compiles, not at the first evaluation."""
    dataset = self.config.dataset
    features = pipeline.dataset_features(self.config)
    labels = pipeline.label_features(features)
    for label in self.labels:
      if label not in labels:
        raise ValueError(
            f"config.evals.{name}.label: dataset {dataset!r} has no class label {label!r} "
            f"(its class labels: {labels}); set the eval's label, or keep the column with "
            "python -m hvla.tools.build_dataset --labels=COLUMN")
    available = pipeline.dataset_splits(self.config)
    for key, split in splits.items():
      if (split or self.config.eval_split) not in available:
        fix = f"config.evals.{name}.{key}" + (" or config.data.eval_split" if split is None
                                               else "")
        raise ValueError(f"config.evals.{name}.{key}: dataset {dataset!r} has no split "
                         f"{split or self.config.eval_split!r} (its splits: {available}); "
                         f"set {fix}")
    fields = pipeline.batch_fields(self.config, features, train=False)
    missing = [path for path in paths if path not in fields]
    if missing:
      raise ValueError(f"config.evals.{name}: reads {missing}, which dataset {dataset!r} "
                       f"with this config does not give (its batches have {fields})")

  def tokenizer(self):
    """The tokenizer of this data's texts (the one its batches are tokenised with)."""
    return pipeline.tokenizer_for(self.config) if self.config.text.fields else None

  def batches(self, split):
    return pipeline.make_loader(
        self.config, split=split or self.config.eval_split,
        global_batch_size=self.batch_size, train=False, seed=0,
        process_index=jax.process_index(), process_count=jax.process_count())

  def class_names(self, label):
    return list(pipeline.class_names(self.config, label))


class Evaluator:
  """Base of every evaluator: `run(params) -> (scalars, images)`.

  `scalars` maps '<name>/<metric>' to python floats; `images` maps '<name>/<tag>' to
  uint8 [N, H, W, 3] arrays for TensorBoard and is empty for evaluators without pictures.
  `source` provides `batches(split)` (host-local batches, see docs/design.md),
  `class_names(label)` and `text_len` (the token length of the dataset's texts).
  `reads(config)` names the splits and batch fields, checked before anything compiles.
  """

  @staticmethod
  def reads(config):
    """({config key: split or None}, batch field paths) that an evaluation reads."""
    raise NotImplementedError

  def __init__(self, name, config, *, encoders, mesh, source, tokenizer=None):
    batch_devices = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    if config.batch_size % np.lcm(batch_devices, jax.process_count()):
      raise ValueError(
          f"config.evals.{name}.batch_size={config.batch_size} must be divisible by the "
          f"{batch_devices} devices of the batch axes and the {jax.process_count()} processes.")
    self.name, self.config, self.encoders, self.mesh = name, config, encoders, mesh
    self.source, self.tokenizer = source, tokenizer

  @property
  def every_steps(self):
    return self.config.every_steps

  def _scalars(self, metrics):
    return {f"{self.name}/{k}": float(v) for k, v in metrics.items()}


def merge_config(defaults, eval_config, name):
  """`eval_config` over the type's defaults; an unknown key fails with its name.

  `data` holds free-form overrides of the training data config, checked by the data
  pipeline. Values may change type (`templates` is a set name or a list of templates).
  """
  unknown = sorted(set(eval_config.keys()) - set(defaults.keys()))
  if unknown:
    raise ValueError(f"config.evals.{name}: unknown keys {unknown}; "
                     f"known for type {defaults.type!r}: {sorted(defaults.keys())}.")
  merged = defaults.to_dict()
  merged.update(eval_config.to_dict() if hasattr(eval_config, "to_dict") else eval_config)
  return ml_collections.ConfigDict(merged)


def host_batches(arrays, global_batch_size, process_index=None, process_count=None):
  """Cuts a (nested) dict of arrays held whole by every host into this host's slices of
  global batches.

  The last batch is padded (with copies of the last row) to full size and the padding is
  marked by `valid` False, so every host runs the same number of batches.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  n = len(jax.tree.leaves(arrays)[0])
  if n == 0:
    raise ValueError("Cannot make batches from zero examples.")
  local = global_batch_size // process_count
  for start in range(0, n, global_batch_size):
    rows = start + process_index * local + np.arange(local)
    take = np.minimum(rows, n - 1)
    yield {**jax.tree.map(lambda v: np.asarray(v)[take], arrays), "valid": rows < n}


def per_example_step(fn, mesh):
  """jit of `fn(*args, batch) -> dict of per-example arrays`, run on the mesh.

  `batch` maps field paths ('images/image') to arrays. The outputs, together with the
  batch's `valid` mask, are replicated so that every host holds every row.
  """
  def step(*args):
    return {**fn(*args), "valid": args[-1]["valid"]}
  return jax.jit(step, out_shardings=sharding.replicated(mesh))


def collect(step, batches, mesh, paths, *args):
  """Runs `step(*args, batch)` over every batch and returns its valid rows, concatenated.

  Only the fields at `paths` travel to the devices; a batch without `valid` counts as all
  valid. A batch's outputs are fetched while the next one runs, so the devices stay busy
  and hold at most two batches of outputs.
  """
  def valid_rows(outputs):
    outputs = jax.device_get(outputs)
    return {k: v[outputs["valid"]] for k, v in outputs.items() if k != "valid"}

  parts, pending = [], None
  with jax.set_mesh(mesh):
    for host_batch in batches:
      local = {path: field(host_batch, path) for path in paths}
      local["valid"] = host_batch.get("valid", np.ones(len(local[paths[0]]), bool))
      outputs = step(*args, sharding.make_global_batch(local, mesh))
      if pending is not None:
        parts.append(valid_rows(pending))
      pending = outputs
  if pending is None:
    raise ValueError("The evaluation split yielded no batches.")
  parts.append(valid_rows(pending))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def replicate(x, mesh):
  """A host value (the same on every host) as an array replicated over the mesh."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding.replicated(mesh), lambda i: x[i])


def normalize(x, axis=-1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def similarity(a, b):
  """Row-by-row dot products [N, M] at full float32 precision (TPUs default to bf16)."""
  return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def first_positive_rank(scores, positives):
  """Per row, the position of its first positive column when sorted by descending score.

  Ties go to the lower column index, as with argmax and top_k, so a constant model ranks
  every row's positive by its index rather than first. A row without positives gets the
  number of columns (never a hit). scores: float [N, M]; positives: bool [N, M].
  """
  num_cols = scores.shape[1]
  best = jnp.max(jnp.where(positives, scores, -jnp.inf), axis=1, keepdims=True)
  cols = jnp.arange(num_cols)
  first = jnp.min(jnp.where(positives & (scores == best), cols, num_cols), axis=1,
                  keepdims=True)
  ahead = (scores > best) | ((scores == best) & (cols < first))
  return jnp.sum(ahead, axis=1)


def top_k_accuracy(ranks, num_classes, ks=(1, 5)):
  """{'top1': ..., 'top5': ...}; a k not below the class count (always 1.0) is left out."""
  return {f"top{k}": np.mean(ranks < k) for k in ks if k == 1 or k < num_classes}
