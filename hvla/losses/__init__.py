"""Objectives, chosen by name from `config.objective` (docs/design.md, "Objectives").

An objective is a class registered with `@register('name')` and built as
`cls(**options)`, the options being the keys of `config.objective` other than `name`.
It provides

- `embed(model, params, batch, *, train, rng) -> features`: per-example arrays; no
  operation mixes examples (what makes gradient accumulation contrastive-correct);
- `loss(params, features) -> (scalar, metrics)`: every cross-example term, each one call
  of `hvla.losses.contrastive.contrastive_loss`.
"""
import inspect

_OBJECTIVES = {}


def register(name):
  """Class decorator: makes an objective selectable as `objective.name = name`."""
  def add(cls):
    known = _OBJECTIVES.get(name)
    if known is not None and _path(known) != _path(cls):
      raise ValueError(f'objective {name!r} is already registered by {_path(known)}')
    _OBJECTIVES[name] = cls
    return cls
  return add


def get_objective(config):
  """`config.objective` (a ConfigDict or dict with `name`) -> the objective it names."""
  name = config.get('name')
  if name not in _OBJECTIVES:
    raise ValueError(f'Unknown objective.name {name!r}; known: {sorted(_OBJECTIVES)}')
  cls = _OBJECTIVES[name]
  options = {key: value for key, value in config.items() if key != 'name'}
  accepted = inspect.signature(cls).parameters
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f'Unknown key(s) {", ".join("objective." + k for k in unknown)} for '
                     f'objective {name!r}; known: {sorted(accepted)}')
  return cls(**options)


def encode(model, params, method, inputs, *, train, rng=None):
  """One tower method of the model ('encode_image', 'encode_text', ...) on `inputs`;
  `rng`, when given, feeds the model's 'dropout' stream."""
  return model.apply({'params': params}, inputs, train=train, method=method,
                     rngs=None if rng is None else {'dropout': rng})


def batch_field(batch, group, key):
  """batch[group][key] (e.g. 'images', 'global'), or a KeyError saying what there is."""
  fields = batch.get(group, {})
  if key not in fields:
    raise KeyError(f'the batch has no {group}/{key}; {group}/ has {sorted(fields)}')
  return fields[key]


def _path(cls):
  return f'{cls.__module__}.{cls.__qualname__}'


# Importing an objective's module registers it.
from hvla.losses import clip  # noqa: E402,F401  pylint: disable=g-import-not-at-top
from hvla.losses import pyramid  # noqa: E402,F401  pylint: disable=g-import-not-at-top
