r"""Builds an hvla dataset (tfds array_record) from image-text files.

  # CC3M style: a folder of images and a TSV/CSV/JSONL of (image, caption) rows.
  python -m hvla.tools.build_dataset --inputs=cc3m/train.tsv --image_dir=cc3m/images \
      --out_dir=~/tensorflow_datasets/cc3m --split=train --workers=8
  # COCO / Flickr30k style, several captions per image: rows naming the same image
  # (one per caption, in any order), or one row per image with a JSON list `captions`.
  python -m hvla.tools.build_dataset --inputs=coco_karpathy_test.jsonl \
      --image_dir=coco/images --out_dir=/data/coco --split=test
  # img2dataset / webdataset tar shards, optional sidecar fields from a JSONL.
  python -m hvla.tools.build_dataset --inputs='shards/*.tar' --out_dir=/data/cc12m \
      --sidecar=cc12m_regions.jsonl
  # TFRecords of tf.train.Example.
  python -m hvla.tools.build_dataset --inputs='tfrec/*.tfrecord' \
      --image_key=image/encoded --caption_key=caption --out_dir=/data/mine
  # Two splits at once (SPLIT=GLOB inputs) and a class-label column of names.
  python -m hvla.tools.build_dataset --inputs=train=mine/train.jsonl,validation=mine/val.jsonl \
      --labels=species --out_dir=/data/mine
  # Integer labels, named by a file with one class name per line (line i: class i).
  python -m hvla.tools.build_dataset --inputs=rows.csv --labels=y --label_names=y=names.txt \
      --out_dir=/data/mine

Re-running the same command resumes an interrupted build. The report names the columns
kept and those ignored. Train with `--config=configs/clip_vitb16.py:data=OUT_DIR` after
`python -m hvla.tools.train_tokenizer --dataset=OUT_DIR`; see docs/data.md.
"""
import glob
import json
import os
import sys

from absl import app
from absl import flags

from hvla.data import ingest

_INPUTS = flags.DEFINE_list("inputs", None, "Input files or globs; SPLIT=GLOB writes them to "
                            "SPLIT instead of --split.", required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Dataset directory.", required=True)
_NAME = flags.DEFINE_string("name", None, "Dataset name; default: basename of out_dir.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to write.")
_FORMAT = flags.DEFINE_enum("format", None, ingest.FORMATS,
                            "Input format; default: from the file extension.")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None,
                                 "rows: folder of the images; default: the rows file's.")
_IMAGE_KEY = flags.DEFINE_string("image_key", None, "Column / feature of the image.")
_CAPTION_KEY = flags.DEFINE_string("caption_key", None, "Column / feature of the caption.")
_SIDECAR = flags.DEFINE_string("sidecar", None, "JSONL of optional fields by 'key'.")
_ROI_DIM = flags.DEFINE_integer("roi_feature_dim", 0,
                                "Width of precomputed rois.features; 0: none.")
_MAX_SIDE = flags.DEFINE_integer("max_side", None, "Downscale longer sides above this.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 5000, "rows: images per output shard.")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Parallel shard writers.")
_LABELS = flags.DEFINE_list("labels", [], "Columns kept as class labels (ClassLabel "
                            "features), for zero-shot evaluation and the linear probe.")
_LABEL_NAMES = flags.DEFINE_list("label_names", [], "COLUMN=FILE: the class names of a label "
                                 "column, one per line; needed for integer labels.")


def split_inputs(entries, default_split):
  """{split: sorted input files} from `--inputs` entries GLOB or SPLIT=GLOB."""
  splits = {}
  for entry in entries:
    split, sep, pattern = entry.partition("=")
    if not sep:
      split, pattern = default_split, entry
    files = glob.glob(os.path.expanduser(pattern))
    if not files:
      raise app.UsageError(f"--inputs: {entry!r} matches no file")
    splits.setdefault(split, set()).update(files)
  return {split: sorted(files) for split, files in splits.items()}


def label_names(entries):
  """((column, file), ...) from `--label_names` entries COLUMN=FILE."""
  pairs = [entry.partition("=") for entry in entries]
  for entry, (column, sep, path) in zip(entries, pairs):
    if not (sep and column and path):
      raise app.UsageError(f"--label_names: {entry!r} is not COLUMN=FILE")
  return tuple((column, path) for column, _, path in pairs)


def main(argv):
  del argv
  out_dir = os.path.abspath(os.path.expanduser(_OUT_DIR.value))
  for split, inputs in split_inputs(_INPUTS.value, _SPLIT.value).items():
    opts = ingest.Options(
        out_dir=out_dir, name=_NAME.value or os.path.basename(out_dir.rstrip("/")),
        split=split, image_dir=_IMAGE_DIR.value, image_key=_IMAGE_KEY.value,
        caption_key=_CAPTION_KEY.value, sidecar=_SIDECAR.value,
        roi_feature_dim=_ROI_DIM.value, max_side=_MAX_SIDE.value,
        labels=tuple(_LABELS.value), label_names=label_names(_LABEL_NAMES.value))
    report = ingest.build(inputs, opts, fmt=_FORMAT.value, shard_size=_SHARD_SIZE.value,
                          workers=_WORKERS.value)
    report.pop("shard_lengths")
    print(json.dumps(report, indent=2))
    if report["columns"]["ignored"]:
      print(f"Ignored columns {report['columns']['ignored']}: keep a class label with "
            "--labels=COLUMN.", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
