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

Re-running the same command resumes an interrupted build. Train with
`--config.data.dataset=OUT_DIR`, after `python -m hvla.tools.train_tokenizer
--dataset=OUT_DIR`.
"""
import glob
import json
import os

from absl import app
from absl import flags

from hvla.data import ingest

_INPUTS = flags.DEFINE_list("inputs", None, "Input files or globs.", required=True)
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


def main(argv):
  del argv
  inputs = sorted({p for pattern in _INPUTS.value
                   for p in glob.glob(os.path.expanduser(pattern))})
  if not inputs:
    raise app.UsageError(f"--inputs={_INPUTS.value} matches no file")
  out_dir = os.path.abspath(os.path.expanduser(_OUT_DIR.value))
  opts = ingest.Options(
      out_dir=out_dir, name=_NAME.value or os.path.basename(out_dir.rstrip("/")),
      split=_SPLIT.value, image_dir=_IMAGE_DIR.value, image_key=_IMAGE_KEY.value,
      caption_key=_CAPTION_KEY.value, sidecar=_SIDECAR.value,
      roi_feature_dim=_ROI_DIM.value, max_side=_MAX_SIDE.value)
  report = ingest.build(inputs, opts, fmt=_FORMAT.value, shard_size=_SHARD_SIZE.value,
                        workers=_WORKERS.value)
  report.pop("shard_lengths")
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  app.run(main)
