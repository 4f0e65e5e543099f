"""Host-local batches from any hvla dataset, on grain, with a resumable iterator.

    loader = make_loader(config.data, split='train', global_batch_size=256, train=True,
                         seed=0)
    it = iter(loader)
    batch = next(it)               # nested dict, see docs/design.md "Batches"
    state = it.get_state()         # bytes (JSON); it.set_state(state) resumes exactly

Orbax: save the iterator with `grain.checkpoint.CheckpointSave(it)` and restore with
`grain.checkpoint.CheckpointRestore(it)` in a CheckpointManager item (one JSON file per
process); or store `json.loads(it.get_state())` with `ocp.args.JsonSave`.

Order. Training reads a global stream: epoch e is a permutation of the split seeded by
(shuffle_seed, seed, e), and global position g goes to process g % process_count, so the
per-host shards of an epoch are disjoint and cover the split. Every random op draws from
a generator keyed by (seed, g), so an example's views do not depend on the worker count
or on restores (with workers, each worker batches its own share of the positions).
Evaluation reads the split once in order, padded with `valid=False` rows to a whole
number of global batches, so every host runs the same number of batches.
"""
import json
import sys

import grain
import numpy as np

from hvla.data import config as config_lib
from hvla.data import examples
from hvla.data import ops
from hvla.data import sources

# The public entry points of the data layer, in one place.
default_data_config = config_lib.default_data_config
validate_data_config = config_lib.validate_data_config
ensure_dataset = sources.ensure_dataset
class_names = sources.class_names
tokenizer_for = sources.tokenizer_for
label_features = sources.label_features


def dataset_features(data_config):
  """The dataset's tfds features (its description only; hvla_shapes is built if missing)."""
  return sources.dataset_builder(data_config).info.features


def dataset_splits(data_config):
  return sorted(sources.dataset_builder(data_config).info.splits)


def batch_fields(data_config, features, *, train):
  """The '/'-paths of the fields of a batch that `make_loader` gives for these features."""
  views = config_lib.validate_data_config(data_config)
  examples.check_features(data_config, features, data_config.dataset)
  spec = examples.layout(data_config, views, features, train)

  def paths(node, prefix):
    if isinstance(node, dict):
      return [p for key, child in node.items() for p in paths(child, f"{prefix}{key}/")]
    return [prefix[:-1]]
  return sorted(paths(spec, ""))


class _RecordSource:
  """A split's records, with indices past the end standing for padding rows."""

  def __init__(self, source, length):
    self._source, self._length = source, length

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    if index >= len(self._source):
      return {"pad": True}
    try:
      return {"record": self._source[index]}
    except Exception as e:  # A corrupt stored record must not stop training.
      return {"error": repr(e)}

  def __repr__(self):
    return f"_RecordSource({self._source!r}, length={self._length})"


class _Sampler:
  """Global position -> (record, rng); shuffled epochs or one pass in order."""

  def __init__(self, num_records, length, seed, shuffle):
    self._num_records, self._length, self._seed = num_records, length, seed
    self._shuffle = shuffle
    self._keys = grain.MapDataset.range(num_records).shuffle(seed=seed) if shuffle else None

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    if not 0 <= index < self._length:
      raise IndexError(f"position {index} outside [0, {self._length})")
    key = int(self._keys[index]) if self._shuffle else index
    rng = np.random.Generator(np.random.Philox(key=[self._seed, index]))
    return grain.RecordMetadata(index=index, record_key=key, rng=rng)

  def __repr__(self):
    return (f"_Sampler(num_records={self._num_records}, length={self._length}, "
            f"seed={self._seed}, shuffle={self._shuffle})")


class _DropBadRecords:
  """Drops placeholder rows of bad records, carrying their counts to the next row.

  A generator that never reads ahead, so the iterator state stays exact. A long run of
  bad records means a broken dataset or config rather than noise: it raises.
  """

  max_consecutive = 1000

  def __call__(self, records):
    skipped = np.zeros(len(ops.BAD_REASONS), np.int32)
    for record in records:
      if record.data["valid"]:
        record.data["_bad"] = record.data["_bad"] + skipped
        skipped[:] = 0
        yield record
        continue
      skipped += record.data["_bad"]
      if skipped.sum() > self.max_consecutive:
        counts = {r: int(n) for r, n in zip(ops.BAD_REASONS, skipped) if n}
        raise RuntimeError(f"{skipped.sum()} bad records in a row {counts}: check the "
                           "dataset and config.data.image_limits")


class BatchIterator:
  """Yields batches; checkpointable; counts the records skipped as bad."""

  def __init__(self, iterator):
    self._iterator = iterator
    self._bad = np.zeros(len(ops.BAD_REASONS), np.int64)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    self._bad += batch.pop("_bad").sum(axis=0)
    return batch

  def get_state(self):
    """JSON bytes: grain's state plus the bad-record counters."""
    return json.dumps({"grain": json.loads(self._iterator.get_state()),
                       "bad_records": self.bad_records()}).encode()

  def set_state(self, state):
    state = json.loads(state)
    self._iterator.set_state(json.dumps(state["grain"]).encode())
    self._bad[:] = [state["bad_records"].get(r, 0) for r in ops.BAD_REASONS]

  def start_prefetch(self):
    self._iterator.start_prefetch()

  def bad_records(self):
    """Records skipped (training) or masked (evaluation) so far, by reason."""
    return {r: int(n) for r, n in zip(ops.BAD_REASONS, self._bad)}

  def metrics(self):
    """The counters as flat scalars for the metric writer."""
    counts = self.bad_records()
    return {"data/bad_records": sum(counts.values()),
            **{f"data/bad_records/{r}": n for r, n in counts.items()}}


class Loader:
  """An iterable of host-local batches; every `iter()` starts from the beginning."""

  def __init__(self, data_loader, *, num_records, num_batches, batch_size, spec):
    self._data_loader = data_loader
    self.num_records = num_records  # Records in the split.
    self.num_batches = num_batches  # Per host (training: at most); None: infinite.
    self.batch_size = batch_size  # Host-local batch size.
    self.spec = spec  # (shape, dtype) of one example's fields.

  def __iter__(self):
    return BatchIterator(iter(self._data_loader))

  def __len__(self):
    if self.num_batches is None:
      raise TypeError("an infinite training loader has no length")
    return self.num_batches


def make_loader(data_config, *, split, global_batch_size, train, seed, process_index=None,
                process_count=None, num_epochs=None):
  """Host-local numpy batches of `global_batch_size // process_count` examples.

  train=True: shuffled epochs (infinite, or `num_epochs`), random views, one caption
  drawn per image, bad records skipped. train=False: one ordered pass, centre-crop views,
  `text.captions_per_image` captions per image, padded last batch.
  """
  views = config_lib.validate_data_config(data_config)
  if process_index is None or process_count is None:
    import jax  # Only when the caller does not say; keeps tools free of jax.
    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple "
                     f"of process_count {process_count}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  builder = sources.dataset_builder(data_config)
  features = builder.info.features
  examples.check_features(data_config, features, data_config.dataset)
  source = sources.data_source(builder, split)
  num_records = len(source)
  if not num_records:
    raise ValueError(f"split {split!r} of {data_config.dataset!r} is empty")
  tokenizer = sources.tokenizer_for(data_config) if data_config.text.fields else None
  builder_op = examples.ExampleBuilder(data_config, views, tokenizer, features, train)
  sampler_seed = int(np.random.SeedSequence(
      [data_config.shuffle_seed, seed]).generate_state(1)[0] % 2**31)
  local_batch_size = global_batch_size // process_count
  if train:
    if num_epochs is None:
      length, num_batches = sys.maxsize - sys.maxsize % global_batch_size, None
    else:
      length = num_epochs * num_records // global_batch_size * global_batch_size
      num_batches = length // global_batch_size
      if not length:
        raise ValueError(f"{num_epochs} epoch(s) of {num_records} records are less than "
                         f"one global batch of {global_batch_size}")
    operations = [builder_op, _DropBadRecords(),
                  grain.transforms.Batch(local_batch_size, drop_remainder=True)]
  else:
    num_batches = -(-num_records // global_batch_size)
    length = num_batches * global_batch_size
    operations = [builder_op, grain.transforms.Batch(local_batch_size)]
  data_loader = grain.DataLoader(
      data_source=_RecordSource(source, length),
      sampler=_Sampler(num_records, length, sampler_seed, shuffle=train),
      operations=operations,
      worker_count=data_config.worker_count,
      worker_buffer_size=data_config.prefetch,
      shard_options=grain.sharding.ShardOptions(process_index, process_count,
                                                drop_remainder=True),
  )
  return Loader(data_loader, num_records=num_records, num_batches=num_batches,
                batch_size=local_batch_size, spec=builder_op.spec)
