"""Model towers and the dual encoder, built from `config.model` by name.

`get_model(config.model)` validates the config (unknown keys and impossible values
raise a ValueError naming the key) and returns a `TwoTowers` module. Towers are
picked from a registry by `image.name` / `text.name`; a new tower is a class with a
`from_config(config, *, dtype, remat, scan)` classmethod (image towers also take
`pyramid`, the flat fields of `model.pyramid`), added with
`register_tower('image', 'name')(cls)`.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections

from hvla.models import layers
from hvla.models.resnet import ResNet
from hvla.models.text import TextTransformer
from hvla.models.two_towers import (TwoTowers, l2_normalize, logit_scale, param_bounds,
                                    pool_boxes, whole_view_if_empty)
from hvla.models.vit import ViT

DTYPES = ("float32", "bfloat16")
ATTENTION = ("xla", "cudnn")
_TOWERS = {"image": {}, "text": {}}


def register_tower(kind, name):
  """Class decorator: makes a tower selectable as `model.<kind>.name = name`."""
  if kind not in _TOWERS:
    raise ValueError(f"Unknown tower kind {kind!r}, expected one of {sorted(_TOWERS)}.")

  def add(cls):
    _TOWERS[kind][name] = cls
    return cls
  return add


register_tower("image", "vit")(ViT)
register_tower("image", "resnet")(ResNet)
register_tower("text", "transformer")(TextTransformer)


def default_model_config():
  """CLIP ViT-B/16: ViT-B/16 image tower, 12x512x8 text transformer, joint width 512."""
  c = ml_collections.ConfigDict()
  c.embed_dim = 512
  c.dtype = "float32"  # compute dtype; parameters are always float32
  c.logit_scale_init = math.log(1 / 0.07)
  c.logit_scale_range = (1.0, 100.0)  # exp(logit_scale) is projected into it after updates
  c.remat = "none"  # 'none' | 'full' | 'dots' (jax.checkpoint policy per block)
  c.scan = False  # nn.scan over the blocks (params stacked on a 'layers' axis)
  # layers.dot_product_attention's implementation: 'xla' (einsums and a float32 softmax,
  # compiled by XLA; any backend) or 'cudnn' (jax.nn.dot_product_attention's fused
  # flash-attention kernel; NVIDIA GPU, bfloat16).
  c.attention = "xla"
  # UniCLIP's augmentation-aware embedding (TwoTowers.encode_image_with_augs): hidden width
  # of the MLP from a view's augmentation vector to the pooled feature; 0: none.
  c.aug_mlp_width = 0
  # ViCHA's visual concepts (TwoTowers.concept_tokens): blocks of the concept encoder, a
  # bidirectional text transformer of the text tower's width (ViCHA: 2 [paper]) whose
  # tokens, mapped to the image width, join the ViT's input; 0: none.
  c.concept_depth = 0
  c.image = ml_collections.ConfigDict(dict(
      name="vit", image_size=224, patch_size=16, width=768, depth=12, heads=12,
      mlp_ratio=4.0, pool="cls", patch_dropout=0.0))
  c.text = ml_collections.ConfigDict(dict(
      name="transformer", vocab_size=49408, max_len=77, width=512, depth=12, heads=8,
      mlp_ratio=4.0, pooling="eot", causal=True))
  # PyramidCLIP's image-tower parts (docs/pyramid.md); all off for plain CLIP.
  c.pyramid = ml_collections.ConfigDict(dict(
      f1_depth=ml_collections.config_dict.placeholder(int),  # None: 9 of 12 (a quarter in f2)
      leff=False,  # LeFF feed-forward in the f1 blocks (ViT)
      roi=dict(source=ml_collections.config_dict.placeholder(str),  # 'boxes' | 'features'
               feature_dim=2048)))  # width of stored detector features
  return c


def pyramid_fields(config):
  """`model.pyramid` -> the image tower's fields (f1_depth, leff, roi, roi_feature_dim)."""
  pyramid, default = config.pyramid, default_model_config().pyramid
  for path, got, want in (("model.pyramid", pyramid, default),
                          ("model.pyramid.roi", pyramid.get("roi", {}), default.roi)):
    unknown, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    if unknown or missing:
      raise ValueError(f"Unknown key(s) {[f'{path}.{k}' for k in unknown]}, missing key(s) "
                       f"{[f'{path}.{k}' for k in missing]}; expected {sorted(want)}.")
  return dict(f1_depth=pyramid.f1_depth, leff=pyramid.leff, roi=pyramid.roi.source,
              roi_feature_dim=pyramid.roi.feature_dim)


def check_attention(config):
  """`model.attention` must name an implementation this process can run: cuDNN's
  fused kernel exists only on NVIDIA GPUs and only for 16-bit inputs."""
  layers.check(config.attention in ATTENTION, "model.attention",
               f"unknown implementation {config.attention!r}, expected one of {ATTENTION}")
  if config.attention == "cudnn":
    backend = jax.default_backend()
    layers.check(backend == "gpu", "model.attention",
                 f"'cudnn' needs an NVIDIA GPU, but jax's backend is {backend!r}; use 'xla'")
    layers.check(config.dtype == "bfloat16", "model.dtype",
                 f"model.attention='cudnn' needs bfloat16 compute, got {config.dtype!r}")


def get_model(config):
  """`config.model` -> TwoTowers, after checking every key and value."""
  known = set(default_model_config())
  unknown = sorted(set(config) - known)
  if unknown:
    raise ValueError(f"Unknown key(s) {', '.join('model.' + k for k in unknown)}; "
                     f"expected {sorted(known)}.")
  missing = sorted(known - set(config))
  if missing:
    raise ValueError(f"Missing key(s) {', '.join('model.' + k for k in missing)}.")
  layers.check(isinstance(config.embed_dim, int) and config.embed_dim > 0,
               "model.embed_dim", f"must be a positive integer, got {config.embed_dim!r}")
  layers.check(config.dtype in DTYPES, "model.dtype",
               f"unknown dtype {config.dtype!r}, expected one of {DTYPES}")
  layers.check(config.remat in layers.REMAT_POLICIES, "model.remat",
               f"unknown policy {config.remat!r}, expected one of "
               f"{tuple(layers.REMAT_POLICIES)}")
  layers.check(isinstance(config.scan, bool), "model.scan",
               f"must be a bool, got {config.scan!r}")
  layers.check(isinstance(config.logit_scale_init, (int, float)), "model.logit_scale_init",
               f"must be a number, got {config.logit_scale_init!r}")
  bounds = config.logit_scale_range
  low, high = tuple(bounds) if isinstance(bounds, (tuple, list)) and len(bounds) == 2 else (
      None, None)
  layers.check(isinstance(low, (int, float)) and isinstance(high, (int, float))
               and 0 < low <= high, "model.logit_scale_range",
               f"must be (low, high) with 0 < low <= high, got {config.logit_scale_range!r}")
  layers.check(math.log(low) <= config.logit_scale_init <= math.log(high),
               "model.logit_scale_init", f"{config.logit_scale_init} lies outside "
               f"log(model.logit_scale_range) = [{math.log(low):.4g}, {math.log(high):.4g}]")
  width = config.aug_mlp_width
  layers.check(isinstance(width, int) and not isinstance(width, bool) and width >= 0,
               "model.aug_mlp_width", f"must be an int >= 0, got {config.aug_mlp_width!r}")
  depth = config.concept_depth
  layers.check(isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0,
               "model.concept_depth", f"must be an int >= 0, got {config.concept_depth!r}")
  layers.check(not depth or config.image.get("name") == "vit", "model.concept_depth",
               f"concept tokens join a ViT's input; the image tower is "
               f"{config.image.get('name')!r}")
  check_attention(config)
  shared = dict(dtype=jnp.dtype(config.dtype), remat=config.remat, scan=config.scan,
                attention=config.attention)
  towers = {}
  for kind in ("image", "text"):
    name = config[kind].get("name")
    layers.check(name in _TOWERS[kind], f"model.{kind}.name",
                 f"unknown tower {name!r}, expected one of {sorted(_TOWERS[kind])}")
    extra = dict(pyramid=pyramid_fields(config)) if kind == "image" else {}
    towers[kind] = _TOWERS[kind][name].from_config(config[kind], **extra, **shared)
  concept_encoder = None
  if depth:  # the text tower's sizes, bidirectional [paper: 2 BERT layers]
    text = towers["text"]
    concept_encoder = TextTransformer(
        vocab_size=text.vocab_size, max_len=text.max_len, width=text.width, depth=depth,
        heads=text.heads, mlp_ratio=text.mlp_ratio, causal=False, **shared)
  return TwoTowers(
      img=towers["image"], txt=towers["text"], concept_encoder=concept_encoder,
      embed_dim=config.embed_dim,
      dtype=shared["dtype"], logit_scale_init=float(config.logit_scale_init),
      logit_scale_range=(float(low), float(high)), aug_mlp_width=config.aug_mlp_width)


__all__ = ["ResNet", "TextTransformer", "TwoTowers", "ViT", "default_model_config", "get_model",
           "l2_normalize", "logit_scale", "param_bounds", "pool_boxes", "pyramid_fields",
           "register_tower", "whole_view_if_empty"]
