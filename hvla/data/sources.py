"""Finding a dataset: tfds builders, the auto-built hvla_shapes and its tokenizer."""
import contextlib
import fcntl
import io
import os

from absl import logging
import tensorflow_datasets as tfds

from hvla.data import tokenizer as tokenizer_lib
from hvla.data.text import as_str, record_captions
from hvla.data.datasets import shapes

TOKENIZER_FILE = "tokenizer.model"  # Lives in the dataset directory, next to the data.


@contextlib.contextmanager
def _file_lock(path):
  """An exclusive advisory lock: concurrent processes build a dataset only once."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_tfds():
  """Keeps tfds' build chatter off the console (a download banner for data drawn locally,
  progress bars, warnings about the custom configuration); hvla logs its own lines."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(True)  # tfds' default.
    logging.set_verbosity(verbosity)


def data_dir(config):
  """`config.data_dir`, else tfds' default: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  path = config.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return os.path.abspath(os.path.expanduser(path))


def ensure_dataset(config):
  """Builds hvla_shapes and its tokenizer when missing; returns the dataset directory.

  Safe to call from several processes at once: the build runs under a file lock and
  tfds moves the finished dataset into place with a rename. Other datasets must
  already be prepared; their directory is returned.
  """
  if config.dataset != "hvla_shapes":
    return os.fspath(dataset_builder(config).data_dir)
  name = shapes.shapes_config(**config.shapes).name
  path = os.path.join(data_dir(config), "hvla_shapes", name, str(shapes.HvlaShapes.VERSION))
  tokenizer_path = os.path.join(path, TOKENIZER_FILE)
  if os.path.exists(os.path.join(path, "dataset_info.json")) and os.path.exists(
      tokenizer_path):
    return path
  with _file_lock(os.path.dirname(path) + ".lock"):
    with _quiet_tfds():
      builder = shapes.make_builder(data_dir(config), **config.shapes)
      prepared = builder.is_prepared()  # Another process may have built it meanwhile.
    if not prepared:
      logging.info("Building hvla_shapes (%s) in %s.", name, path)
      with _quiet_tfds():
        builder.download_and_prepare(file_format="array_record")
    assert os.fspath(builder.data_dir) == path, (builder.data_dir, path)  # Same layout.
    if not os.path.exists(tokenizer_path):
      tokenizer_lib.train_tokenizer(
          dataset_texts(builder, "train", ("caption", "summary", "tags")),
          tokenizer_path, vocab_size=shapes.SHAPES_VOCAB_SIZE)
  return path


def dataset_builder(config):
  """The prepared tfds builder named by `config.dataset` (a name or a directory)."""
  name = config.dataset
  if name == "hvla_shapes":
    return tfds.builder_from_directory(ensure_dataset(config))
  if os.path.isdir(name):
    if not os.path.exists(os.path.join(name, "dataset_info.json")):
      raise ValueError(f"config.data.dataset: {name!r} has no dataset_info.json; build it "
                       "with python -m hvla.tools.build_dataset")
    return tfds.builder_from_directory(name)
  try:
    builder = tfds.builder(name, data_dir=config.data_dir)
  except Exception as e:
    raise ValueError(f"config.data.dataset: {name!r} is neither hvla_shapes, a directory "
                     f"nor a known tfds dataset ({e})") from None
  if not builder.is_prepared():
    raise ValueError(f"config.data.dataset: {name!r} is not prepared in {builder.data_dir}; "
                     f"run: tfds build {name} --file_format=array_record")
  return builder


def data_source(builder, split):
  """Random access to a split's records; images stay encoded (hvla decodes them)."""
  skip = {key: tfds.decode.SkipDecoding() for key, feature in builder.info.features.items()
          if isinstance(feature, tfds.features.Image)}
  try:
    return builder.as_data_source(split, decoders=skip)
  except Exception as e:
    raise ValueError(f"cannot read split {split!r} of {builder.info.full_name} as "
                     f"array_record (splits: {list(builder.info.splits)}): {e}") from None


def dataset_texts(builder, split, fields, limit=None):
  """Yields the non-empty text fields of a split's records (tokenizer training).

  `caption` stands for every caption of an image (`captions`, else `caption`).
  """
  source = data_source(builder, split)
  for i in range(min(len(source), limit or len(source))):
    record = source[i]
    for field in fields:
      if field == "caption":
        yield from record_captions(record)
        continue
      text = as_str(record.get(field, b"")).strip()
      if text:
        yield text


def label_features(features):
  """The names of a dataset's class-label (ClassLabel) features."""
  return sorted(k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel))


def class_names(config, name):
  """Class names of the label feature `name` (e.g. 'shape', 'color', 'label')."""
  features = dataset_builder(config).info.features
  if name not in features:
    raise ValueError(f"dataset {config.dataset!r} has no feature {name!r} "
                     f"(features: {sorted(features.keys())})")
  if not isinstance(features[name], tfds.features.ClassLabel):
    raise ValueError(f"feature {name!r} of {config.dataset!r} is not a ClassLabel")
  return list(features[name].names)


def tokenizer_for(config):
  """`config.text.tokenizer`, else the one stored with the dataset (auto for shapes)."""
  if config.text.tokenizer:
    return tokenizer_lib.Tokenizer(config.text.tokenizer)
  path = os.path.join(ensure_dataset(config), TOKENIZER_FILE)
  if not os.path.exists(path):
    raise ValueError(f"config.data.text.tokenizer: None and dataset {config.dataset!r} has "
                     f"no {path}; set it, or run python -m hvla.tools.train_tokenizer "
                     f"--dataset={config.dataset}")
  return tokenizer_lib.Tokenizer(path)
