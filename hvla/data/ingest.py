"""Image-text corpora -> hvla datasets (tfds array_record), resumable and in parallel.

Inputs, one output shard per input unit:
- `rows`: a JSONL / CSV / TSV file of (image path, caption) rows, images in a folder
  (CC3M / CC12M style); rows naming the same image (and `key`, if any) anywhere in a
  file are one record with their captions in row order and the first row's other fields
  (COCO / Flickr30k style); `shard_size` such samples per shard.
- `webdataset`: img2dataset / webdataset tar shards; a sample is the run of members
  sharing a key: an image (jpg, png, ...) plus `txt` and/or `json` (with `caption`).
- `tfrecord`: TFRecord files of tf.train.Example with encoded image and text features.

Several captions per image: a sample's captions are its `captions` list (a JSON list in
a row, the webdataset json or the sidecar) when it has one, else its caption (every
value of a multi-valued TFRecord feature). Records store them all in `captions` and the
first in `caption`.

Optional fields (summary, tags, concepts, rois, phrases, phrase_boxes) come from the row
itself, the webdataset `json`, or a `sidecar` JSONL keyed by `key`. Every image is decoded
once: grayscale / CMYK / alpha / palette images are converted to RGB and re-encoded as
JPEG, unusable records are skipped and counted by reason in the report.

Class labels (`labels`, for zero-shot evaluation and the linear probe): each named column
becomes a tfds `ClassLabel` feature. Its class names are a names file's lines (then a value
is a name or an integer index into them), else the column's distinct strings, sorted,
after the names an earlier split of the dataset already has (so ids stay valid across
splits). The report lists the columns kept and those ignored.
"""
import csv
import dataclasses
import io
import json
import multiprocessing
import os
import re
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tqdm import auto as tqdm

from hvla.data import ops
from hvla.data import writer

FORMATS = ("rows", "webdataset", "tfrecord")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_DEFAULT_KEYS = {  # Candidate feature / column names, first present wins.
    "image": ("image", "image/encoded", "jpg", "filepath", "file", "path", "url"),
    "caption": ("caption", "image/text", "text", "txt", "title"),
}
_EXAMPLES_PER_REASON = 5  # Skipped keys listed in the report per reason.
# Columns that become fields of a record besides the image, caption and label columns.
_RECORD_COLUMNS = ("key", "captions", "summary", "tags", "concepts", "rois", "phrases",
                   "phrase_boxes")


@dataclasses.dataclass(frozen=True)
class Options:
  out_dir: str
  name: str
  split: str = "train"
  image_dir: str | None = None  # rows: image paths are relative to it.
  image_key: str | None = None  # None: the first of _DEFAULT_KEYS['image'] present.
  caption_key: str | None = None
  sidecar: str | None = None
  roi_feature_dim: int = 0
  max_side: int | None = None  # Larger images are downscaled to this longer side.
  min_side: int = 8
  max_aspect: float = 20.0
  max_pixels: int = 50_000_000
  labels: tuple = ()  # Columns kept as ClassLabel features.
  label_names: tuple = ()  # ((column, names file), ...): required for integer labels.


class BadLabel(ValueError):
  """A sample whose label is absent or names no class; skipped, counted by `reason`."""

  def __init__(self, reason, detail):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Task:
  index: int
  count: int
  kind: str
  source: str
  rows: tuple = ()  # rows: this shard's samples, each the tuple of its rows.


def detect_format(path):
  lower = path.lower()
  if lower.endswith((".jsonl", ".json", ".csv", ".tsv")):
    return "rows"
  if lower.endswith(".tar"):
    return "webdataset"
  if re.search(r"\.tfrecords?|\.tfrec", lower):
    return "tfrecord"
  raise ValueError(f"cannot tell the format of {path!r}; pass format= one of {FORMATS}")


def _read_rows(path):
  if path.lower().endswith((".jsonl", ".json")):
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]
  with open(path, newline="") as f:
    return list(csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ","))


def group_rows(rows, image_key=None):
  """The rows of each sample, in order of first appearance.

  A sample is an image and its `key`: rows naming the same image are one sample unless
  their keys differ (e.g. regions of one image as samples of their own). Rows without an
  image stay alone.
  """
  groups = {}
  for i, row in enumerate(rows):
    image = _pick(row, image_key, "image")
    groups.setdefault((image, row.get("key")) if image else i, []).append(row)
  return [tuple(group) for group in groups.values()]


def plan(inputs, fmt=None, shard_size=5000, image_key=None):
  """Splits the inputs into tasks, one per output shard, in a fixed order."""
  inputs = sorted(inputs)
  if not inputs:
    raise ValueError("no input files")
  fmt = fmt or detect_format(inputs[0])
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
  units = []
  for path in inputs:
    if fmt == "rows":
      samples = group_rows(_read_rows(path), image_key)
      units += [(path, tuple(samples[i:i + shard_size]))
                for i in range(0, len(samples), shard_size)]
    else:
      units.append((path, ()))
  return [Task(i, len(units), fmt, path, rows) for i, (path, rows) in enumerate(units)]


# -------------------------------------------------------------------------------------
# Reading samples: (key, image bytes or None, fields dict).
# -------------------------------------------------------------------------------------
def _picked_column(fields, key, role):
  """The column that holds `role` ('image', 'caption'): `key`, else the first default."""
  if key is not None:
    return key if key in fields else None
  return next((k for k in _DEFAULT_KEYS[role] if k in fields), None)


def _pick(fields, key, role):
  column = _picked_column(fields, key, role)
  return None if column is None else fields[column]


def used_columns(fields, opts):
  """The columns of a sample that make up its record; the others are ignored."""
  picked = {_picked_column(fields, opts.image_key, "image"),
            _picked_column(fields, opts.caption_key, "caption")}
  return {c for c in fields if c in picked or c in _RECORD_COLUMNS or c in opts.labels}


def sample_captions(fields, caption_key=None):
  """A sample's non-empty captions: its `captions` list, else its caption (one or a list)."""
  def texts(value):
    values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    values = (v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
              for v in values if v is not None)
    return [v.strip() for v in values if v.strip()]
  return texts(fields.get("captions")) or texts(_pick(fields, caption_key, "caption"))


def _rows_entries(task, opts):
  """(key, image path or None, fields) per sample of a rows task, reading no image."""
  image_dir = opts.image_dir or os.path.dirname(os.path.abspath(task.source))
  for rows in task.rows:  # One sample: the first row's fields, every row's captions.
    captions = [c for r in rows for c in sample_captions(r, opts.caption_key)]
    row = {**rows[0], "captions": captions}
    rel = _pick(row, opts.image_key, "image")
    key = str(row.get("key") or (os.path.splitext(os.path.basename(rel))[0] if rel else ""))
    yield key, os.path.join(image_dir, rel) if rel else None, row


def _rows_samples(task, opts):
  for key, path, row in _rows_entries(task, opts):
    data = None
    if path and os.path.isfile(path):
      with open(path, "rb") as f:
        data = f.read()
    yield key, data, row


def _webdataset_samples(task, opts):
  del opts
  with tarfile.open(task.source) as tar:
    key, parts = None, {}
    for member in tar:
      if not member.isfile():
        continue
      base = os.path.basename(member.name)
      prefix = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
      ext = base.split(".", 1)[1].lower() if "." in base else ""
      if prefix != key and parts:
        yield _webdataset_sample(key, parts)
        parts = {}
      key = prefix
      parts[ext] = tar.extractfile(member).read()
    if parts:
      yield _webdataset_sample(key, parts)


def _webdataset_sample(key, parts):
  try:
    fields = json.loads(parts["json"]) if "json" in parts else {}
  except ValueError:  # Unreadable metadata: the caption may still come from txt.
    fields = {}
  if "txt" in parts:
    fields["caption"] = parts["txt"].decode("utf-8", errors="replace")
  image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
  return str(fields.get("key") or key), image, fields


def _tfrecord_samples(task, opts):
  import tensorflow as tf  # Only this format needs TensorFlow itself.
  for i, raw in enumerate(tf.data.TFRecordDataset(task.source).as_numpy_iterator()):
    feature = tf.train.Example.FromString(raw).features.feature
    fields = {}
    for name, value in feature.items():
      kind = value.WhichOneof("kind")
      values = list(getattr(value, kind).value) if kind else []
      fields[name] = values[0] if len(values) == 1 else values
    image = _pick(fields, opts.image_key, "image")
    key = fields.get("key", fields.get("image/source_id", f"{os.path.basename(task.source)}:{i}"))
    yield key.decode() if isinstance(key, bytes) else str(key), image, fields


_READERS = {"rows": _rows_samples, "webdataset": _webdataset_samples,
            "tfrecord": _tfrecord_samples}


# -------------------------------------------------------------------------------------
# Class labels.
# -------------------------------------------------------------------------------------
def _label_value(value):
  """A label cell as a str or int; None when absent or empty."""
  if isinstance(value, (list, tuple, np.ndarray)):
    if len(value) > 1:
      raise BadLabel("bad_label", f"one label per sample, got {list(value)!r}")
    value = value[0] if len(value) else None
  if isinstance(value, bytes):
    value = value.decode("utf-8", errors="replace")
  if isinstance(value, np.integer):
    value = int(value)
  if isinstance(value, str):
    value = value.strip() or None
  return value


def label_id(value, names, column):
  """The class id of a label cell: its name's index, else an integer index into `names`."""
  value = _label_value(value)
  if value is None:
    raise BadLabel("missing_label", f"no {column!r}")
  if isinstance(value, str) and value in names:
    return names.index(value)
  is_int = isinstance(value, int) and not isinstance(value, bool)
  if is_int or (isinstance(value, str) and value.isdigit()):
    if 0 <= int(value) < len(names):
      return int(value)
  raise BadLabel("unknown_label", f"{column}={value!r} is none of {len(names)} classes")


def _read_names(path, column):
  with open(os.path.expanduser(path)) as f:
    names = [line.strip() for line in f if line.strip()]
  if not names or len(set(names)) != len(names):
    raise ValueError(f"--label_names={column}={path}: needs one distinct class name per line")
  return names


def existing_classes(out_dir):
  """{column: names} of the ClassLabel features of a dataset already in `out_dir`."""
  if not os.path.exists(os.path.join(out_dir, "dataset_info.json")):
    return None
  features = tfds.builder_from_directory(out_dir).info.features
  return {k: list(f.names) for k, f in features.items()
          if isinstance(f, tfds.features.ClassLabel)}


def _sample_fields(tasks, opts):
  """Every sample's fields (the sidecar's included), reading no image file of rows."""
  sidecar = _load_sidecar(opts.sidecar)
  for task in tasks:
    entries = (_rows_entries(task, opts) if task.kind == "rows"
               else _READERS[task.kind](task, opts))
    for key, _, fields in entries:
      yield {**fields, **sidecar.get(key, {})}


def resolve_classes(tasks, opts):
  """{label column: class names} for the build, consistent with earlier splits."""
  files = dict(opts.label_names)
  for column in opts.labels:
    if column in writer.record_features().keys() or column in ("image", "key"):
      raise ValueError(f"--labels: {column!r} is a field of hvla's records; a label column "
                       "needs another name")
  if set(files) - set(opts.labels):
    raise ValueError(f"--label_names: {sorted(set(files) - set(opts.labels))} are not in "
                     f"--labels={list(opts.labels)}")
  existing = existing_classes(opts.out_dir)
  if existing is not None and set(existing) != set(opts.labels):
    raise ValueError(f"--labels={list(opts.labels)}: {opts.out_dir} already has the label "
                     f"columns {sorted(existing)}; every split needs the same --labels")
  existing = existing or {}
  scanned = [c for c in opts.labels if c not in files]
  seen = {c: set() for c in scanned}
  for fields in _sample_fields(tasks, opts) if scanned else ():
    for column in scanned:
      value = _label_value(fields.get(column))
      if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"--labels: column {column!r} holds integers ({value}); name "
                         f"their classes with --label_names={column}=FILE (line i names "
                         "class i)")
      if value is not None:
        seen[column].add(str(value))
  classes = {}
  for column in opts.labels:
    before = existing.get(column, [])
    if column in files:
      names = _read_names(files[column], column)
      if before and before != names:
        raise ValueError(f"--label_names={column}={files[column]}: differs from the class "
                         f"names an earlier split of {opts.out_dir} has for it")
    else:
      names = before + sorted(seen[column] - set(before))
    if not names:
      raise ValueError(f"--labels: column {column!r} has no value in any sample")
    classes[column] = names
  return classes


# -------------------------------------------------------------------------------------
# Samples -> records.
# -------------------------------------------------------------------------------------
def clean_image(data, opts):
  """Validated image bytes: kept when JPEG/PNG RGB, else converted and re-encoded."""
  img = ops.decode_image(data, min_side=opts.min_side, max_aspect=opts.max_aspect,
                         max_pixels=opts.max_pixels)
  if opts.max_side and max(img.size) > opts.max_side:
    img = img.copy()
    img.thumbnail((opts.max_side, opts.max_side), Image.BICUBIC)
  elif img.format in ("JPEG", "PNG"):  # Decoded as RGB without conversion.
    return data
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _array(value, shape, dtype, name):
  try:
    arr = np.asarray(value if value is not None else [], dtype).reshape(-1, *shape)
  except (ValueError, TypeError) as e:
    raise ops.BadRecord("malformed", f"{name}: {e}") from None
  if not np.all(np.isfinite(arr)):
    raise ops.BadRecord("malformed", f"{name} has non-finite values")
  return arr


def make_record(image, fields, opts, classes=None):
  """One record of writer.record_features(classes=classes); raises BadRecord (or BadLabel)
  when unusable."""
  captions = sample_captions(fields, opts.caption_key)
  if not captions:
    raise ops.BadRecord("empty_caption")
  caption = captions[0]  # Phrases are spans into it.
  tags = fields.get("tags") or ""
  rois = fields.get("rois") or {}
  boxes = _array(rois.get("boxes"), (4,), np.float32, "rois.boxes")
  labels = [str(x) for x in rois.get("labels") or []]
  phrases = _array(fields.get("phrases"), (2,), np.int32, "phrases")
  phrase_boxes = _array(fields.get("phrase_boxes"), (4,), np.float32, "phrase_boxes")
  for name, b in (("rois.boxes", boxes), ("phrase_boxes", phrase_boxes)):
    if len(b) and (b.min() < 0 or b.max() > 1 or np.any(b[:, 2:] < b[:, :2])):
      raise ops.BadRecord("malformed", f"{name} must be (x0, y0, x1, y1) in [0, 1]")
  if labels and len(labels) != len(boxes):
    raise ops.BadRecord("malformed", "rois.labels and rois.boxes differ in length")
  if len(phrases) and (phrases.min() < 0 or phrases.max() > len(caption)
                       or np.any(phrases[:, 1] <= phrases[:, 0])):
    raise ops.BadRecord("malformed", "phrases must be [start, end) spans in the caption")
  if len(phrase_boxes) not in (0, len(phrases)):
    raise ops.BadRecord("malformed", "phrase_boxes needs one box per phrase")
  record = dict(
      image=clean_image(image, opts), caption=caption, captions=captions,
      summary=str(fields.get("summary") or ""),
      tags=", ".join(tags) if isinstance(tags, list) else str(tags),
      concepts=[str(c) for c in fields.get("concepts") or []],
      rois=dict(boxes=boxes, labels=labels or [""] * len(boxes)),
      phrases=phrases, phrase_boxes=phrase_boxes)
  for column, names in (classes or {}).items():
    record[column] = label_id(fields.get(column), names, column)
  if opts.roi_feature_dim:
    feats = _array(rois.get("features"), (opts.roi_feature_dim,), np.float16,
                   "rois.features")
    if len(feats) != len(boxes):
      raise ops.BadRecord("malformed", "rois.features needs one row per box")
    record["rois"]["features"] = feats
  return record


def _load_sidecar(path):
  if not path:
    return {}
  with open(path) as f:
    return {str(r["key"]): r for r in (json.loads(line) for line in f if line.strip())}


def _report_path(opts, task):
  return writer.shard_path(opts.out_dir, opts.name, opts.split, task.index,
                           task.count) + ".report.json"


def run_task(task, opts, classes=None):
  """Writes one shard and its report (written last: the completion marker)."""
  sidecar = _load_sidecar(opts.sidecar)
  report = {"written": 0, "skipped": {}, "examples": {}, "kept": [], "ignored": []}
  kept, ignored = set(), set()

  def records():
    for key, image, fields in _READERS[task.kind](task, opts):
      fields = {**fields, **sidecar.get(key, {})}
      used = used_columns(fields, opts)
      kept.update(used)
      ignored.update(set(fields) - used)
      reason = "missing_image"
      if image is not None:
        try:
          yield make_record(image, fields, opts, classes)
          continue
        except (ops.BadRecord, BadLabel) as e:
          reason = e.reason
      report["skipped"][reason] = report["skipped"].get(reason, 0) + 1
      keys = report["examples"].setdefault(reason, [])
      if len(keys) < _EXAMPLES_PER_REASON:
        keys.append(key)

  features = writer.record_features(opts.roi_feature_dim, classes)
  report["written"] = writer.write_shard(
      writer.shard_path(opts.out_dir, opts.name, opts.split, task.index, task.count),
      features, records())
  report["kept"], report["ignored"] = sorted(kept), sorted(ignored - kept)
  with open(_report_path(opts, task), "w") as f:
    json.dump(report, f)
  return report


def _run_task_star(args):
  return run_task(*args)


def build(inputs, opts, *, fmt=None, shard_size=5000, workers=1, progress=True):
  """Ingests `inputs` into `opts.out_dir` as split `opts.split`; returns the report.

  Shards whose report exists are kept, so an interrupted build resumes where it
  stopped. Other splits already in the directory are kept in dataset_info.json.
  """
  os.makedirs(opts.out_dir, exist_ok=True)
  tasks = plan(inputs, fmt, shard_size, opts.image_key)
  classes = resolve_classes(tasks, opts) if opts.labels else {}
  todo = [t for t in tasks if not os.path.exists(_report_path(opts, t))]
  if todo:
    bar = tqdm.tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="shard",
                    desc=f"{opts.name}/{opts.split}", disable=not progress)
    jobs = [(t, opts, classes) for t in todo]
    if workers > 1:
      with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
        for _ in pool.imap_unordered(_run_task_star, jobs):
          bar.update()
    else:
      for job in jobs:
        _run_task_star(job)
        bar.update()
    bar.close()
  report = summarize(opts, tasks)
  report["shards_built"] = len(todo)
  report["labels"] = {column: len(names) for column, names in classes.items()}
  _write_info(opts, classes)
  with open(os.path.join(opts.out_dir, f"{opts.name}-{opts.split}.report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def summarize(opts, tasks):
  """Adds up the shard reports of a split."""
  total = {"split": opts.split, "written": 0, "skipped": {}, "examples": {},
           "shard_lengths": []}
  kept, ignored = set(), set()
  for task in tasks:
    with open(_report_path(opts, task)) as f:
      r = json.load(f)
    kept.update(r.get("kept", ()))  # Shards of older builds did not list them.
    ignored.update(r.get("ignored", ()))
    total["written"] += r["written"]
    total["shard_lengths"].append(r["written"])
    for reason, n in r["skipped"].items():
      total["skipped"][reason] = total["skipped"].get(reason, 0) + n
      keys = total["examples"].setdefault(reason, [])
      keys += r["examples"][reason][:_EXAMPLES_PER_REASON - len(keys)]
  total["columns"] = {"kept": sorted(kept), "ignored": sorted(ignored - kept)}
  return total


def _write_info(opts, classes):
  """dataset_info.json over every split whose shards are all reported."""
  pattern = re.compile(rf"{re.escape(opts.name)}-(.+)\.{writer.FILE_FORMAT}-(\d+)-of-(\d+)"
                       r"\.report\.json$")
  shards = {}
  for fname in os.listdir(opts.out_dir):
    m = pattern.match(fname)
    if m:
      with open(os.path.join(opts.out_dir, fname)) as f:
        shards.setdefault(m[1], {})[int(m[2])] = (int(m[3]), json.load(f)["written"])
  lengths = {split: [n for _, (_, n) in sorted(found.items())]
             for split, found in shards.items()
             if len(found) == next(iter(found.values()))[0]}
  writer.write_info(opts.out_dir, opts.name,
                    writer.record_features(opts.roi_feature_dim, classes), lengths,
                    description="Ingested with hvla.tools.build_dataset.")
