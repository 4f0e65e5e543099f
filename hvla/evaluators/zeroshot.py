"""Zero-shot classification: images against prompt-ensembled class embeddings.

Each class is embedded as the mean of the normalised text embeddings of its prompts,
renormalised (prompt ensembling as in the CLIP paper [paper]); an image is classified by
its cosine similarity to every class. Top-1 and top-5 accuracy over the split.
"""
import functools
import re

from etils import epath
import jax.numpy as jnp
import ml_collections
import numpy as np

from hvla.evaluators import common
from hvla.evaluators import templates as templates_lib


def default_config():
  return ml_collections.ConfigDict(dict(
      type="zeroshot",
      every_steps=1000,
      data={},  # Overrides of the training config.data (dataset name, views...).
      split=None,  # None: config.data.eval_split.
      view="image",  # Images are read from `images/<view>`.
      label="shape",  # Labels are read from `labels/<label>`.
      class_names=None,  # None: the dataset's names for `label`; a list; or a text file
                         # with one name per line.
      templates="clip80",  # 'clip80' | 'short' | 'none' | a list of '...{}...' strings.
      batch_size=256,
  ))


def resolve_class_names(spec, source, label):
  """Readable class names from the config (a list or a file) or the dataset.

  Underscores become spaces ('aquarium_fish') [ours]. WordNet ids (imagenet2012's
  'n01440764') cannot be prompted and fail with a request for readable names.
  """
  if spec is None:
    names = source.class_names(label)
  elif isinstance(spec, str):
    names = [line.strip() for line in epath.Path(spec).read_text().splitlines() if line.strip()]
  else:
    names = list(spec)
  if not names:
    raise ValueError(f"No class names for label {label!r}.")
  if any(re.fullmatch(r"n\d{8}", name) for name in names):
    raise ValueError(f"The class names of {label!r} are WordNet ids ({names[0]!r}...); give "
                     "readable ones with `class_names` (a list or a file, one per line).")
  return [name.replace("_", " ") for name in names]


def embed_texts(step, params, tokens, mesh, batch_size):
  """Normalised text embeddings [N, D] of token rows held whole by every host."""
  batches = common.host_batches({"tokens": tokens}, batch_size)
  return common.collect(step, batches, mesh, ("tokens",), params)["embedding"]


def class_embeddings(text_embeddings, num_classes):
  """Prompt ensembling: normalised [C * T, D] class-major prompt embeddings -> [C, D]."""
  mean = text_embeddings.reshape(num_classes, -1, text_embeddings.shape[-1]).mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


@common.register("zeroshot")
class ZeroShot(common.Evaluator):
  """Metrics: `top1`, and `top5` when there are more than 5 classes."""

  default_config = staticmethod(default_config)

  @staticmethod
  def reads(config):
    return {"split": config.split}, (f"images/{config.view}", f"labels/{config.label}")

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    if self.tokenizer is None:
      raise ValueError(f"config.evals.{name}: zero-shot classification needs a tokenizer.")
    names = resolve_class_names(config.class_names, self.source, config.label)
    prompts = templates_lib.prompts(names, templates_lib.get_templates(config.templates))
    self.num_classes = len(names)
    self.prompt_tokens = self.tokenizer.encode(prompts, self.source.text_len)
    self.keys = self.reads(config)[1]
    self._encode_text = common.per_example_step(
        functools.partial(_encode_text, self.encoders), self.mesh)
    self._label_rank = common.per_example_step(
        functools.partial(_label_rank, self.encoders, *self.keys), self.mesh)

  def run(self, params):
    prompts = embed_texts(self._encode_text, params, self.prompt_tokens, self.mesh,
                          self.config.batch_size)
    classes = common.replicate(class_embeddings(prompts, self.num_classes), self.mesh)
    out = common.collect(self._label_rank, self.source.batches(self.config.split), self.mesh,
                         self.keys, params, classes)
    if out["label"].min() < 0 or out["label"].max() >= self.num_classes:
      raise ValueError(
          f"config.evals.{self.name}: labels span [{out['label'].min()}, "
          f"{out['label'].max()}] but there are {self.num_classes} class names.")
    return self._scalars(common.top_k_accuracy(out["rank"], self.num_classes)), {}


def _encode_text(encoders, params, batch):
  return {"embedding": encoders.text(params, batch["tokens"])["embedding"]}


def _label_rank(encoders, image_key, label_key, params, classes, batch):
  image = encoders.image(params, batch[image_key])
  labels = batch[label_key]
  scores = common.similarity(image["embedding"], classes)
  return {"label": labels, "rank": common.first_positive_rank(
      scores, labels[:, None] == jnp.arange(classes.shape[0]))}
