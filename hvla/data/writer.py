"""Writing datasets in tfds' array_record layout, readable by tfds.builder_from_directory.

Shards are written to a temporary name and renamed, so a shard file that exists is
complete: this is what makes ingestion resumable.
"""
import os

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

FILE_FORMAT = "array_record"
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def record_features(roi_feature_dim=0, classes=None):
  """hvla's record schema (ARCHITECTURE.md "Records"); empty values mean absent.

  `classes` {column: class names} adds one ClassLabel feature per label column.
  """
  rois = {"boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
          "labels": tfds.features.Sequence(tfds.features.Text())}
  if roi_feature_dim:
    rois["features"] = tfds.features.Tensor(shape=(None, roi_feature_dim), dtype=np.float16)
  labels = {column: tfds.features.ClassLabel(names=list(names))
            for column, names in (classes or {}).items()}
  return tfds.features.FeaturesDict({
      **labels,
      "image": tfds.features.Image(shape=(None, None, 3)),  # Stored as given: JPEG/PNG.
      "caption": tfds.features.Text(),
      # Every caption of the image, `caption` first (COCO, Flickr30k: about 5).
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "summary": tfds.features.Text(),
      "tags": tfds.features.Text(),
      "concepts": tfds.features.Sequence(tfds.features.Text()),
      "rois": rois,
      "phrases": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
      "phrase_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
  })


def shard_path(out_dir, name, split, index, count):
  return os.path.join(out_dir, f"{name}-{split}.{FILE_FORMAT}-{index:05d}-of-{count:05d}")


def write_shard(path, features, examples):
  """Serialises feature dicts into one shard, atomically; returns how many."""
  tmp = f"{path}.tmp{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  count = 0
  try:
    for example in examples:
      writer.write(features.serialize_example(example))
      count += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return count


def write_info(out_dir, name, features, shard_lengths, description=""):
  """Writes dataset_info.json and features.json for {split: [examples per shard]}."""
  splits = []
  for split, lengths in shard_lengths.items():
    paths = [shard_path(out_dir, name, split, i, len(lengths)) for i in range(len(lengths))]
    splits.append(tfds.core.SplitInfo(
        name=split, shard_lengths=list(lengths),
        num_bytes=sum(os.path.getsize(p) for p in paths),
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=out_dir, template=_TEMPLATE, dataset_name=name, split=split,
            filetype_suffix=FILE_FORMAT)))
  info = tfds.core.DatasetInfo(
      builder=tfds.core.DatasetIdentity(
          name=name, version=tfds.core.Version("1.0.0"), data_dir=out_dir,
          module_name=__name__),
      description=description, features=features)
  info.set_splits(tfds.core.SplitDict(splits))
  info.set_file_format(FILE_FORMAT)
  info.write_to_directory(out_dir)


def write_dataset(out_dir, name, features, splits, shard_size=1000, description=""):
  """Writes {split: list of feature dicts} in one call; returns `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  lengths = {}
  for split, examples in splits.items():
    count = max(1, -(-len(examples) // shard_size))
    lengths[split] = [
        write_shard(shard_path(out_dir, name, split, i, count), features,
                    examples[i * shard_size:(i + 1) * shard_size])
        for i in range(count)]
  write_info(out_dir, name, features, lengths, description)
  return out_dir
