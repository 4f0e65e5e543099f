"""The objective: named, weighted terms over tower passes that run once per step each.

A term is a `Term` subclass registered by type name (`@register('clip')`). It declares
the tower passes it reads, `passes() -> {alias: Pass}`, and computes its loss from their
outputs over the whole global batch, `loss(params, state, features, ctx)`, where
`features[alias]` is the dict of the pass's outputs. Passes are shared by identity
(method, inputs, options, weights): two terms reading `encode_text` on
`tokens/caption` get one pass, run once. Optionally a term owns

- parameters (`init_params`: heads, tables), stored at `params['objective'][name]`, with
  logical axis names, so the sharded init, the decay mask, freezing and checkpoints
  cover them like the towers', and `param_bounds` projected after every update;
- state that is not a parameter (`init_state` / `update_state`: EMA copies, queues), at
  `state['objective'][name]`, updated after the optimizer step;
- the inference embedding (`encoders`), when it is not the towers' own.

Passes with `weights` set (a path into the objective state, e.g. an EMA copy of the
towers) carry no gradient: gradient accumulation runs them once, in its first pass only.
Everything a pass computes is per example; examples meet only in `loss`.
"""
import abc
import dataclasses
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from hvla import optim

_TERMS = {}
EXECUTION_KEYS = ("strategy", "block_size")
OBJECTIVE_KEYS = (*EXECUTION_KEYS, "terms")


class Context(NamedTuple):
  """What a term may know of the step: for ramps, warm-ups and sampling."""
  step: jax.Array  # int32 [], the step being taken (0 first)
  total_steps: int
  rng: jax.Array  # this step's key for this term (the same on every device)
  epoch_steps: float = 0.0  # steps in one epoch of the training data; 0: unknown


class Encoders(NamedTuple):
  """The embedding functions evaluators use: `image(params, images)` and
  `text(params, tokens)`, each returning the towers' output dict (`embedding`, ...)."""
  image: Callable
  text: Callable

  @classmethod
  def of_towers(cls, model):
    """The towers' own `encode_image` / `encode_text`."""
    def method(name):
      return lambda params, x: model.apply({"params": towers(params)}, x, method=name)
    return cls(image=method("encode_image"), text=method("encode_text"))


@dataclasses.dataclass(frozen=True)
class Pass:
  """One tower pass: the model's `method` on the batch fields `inputs`.

  `options` are further keyword arguments of the method; `weights` (None: the trained
  parameters) is a '/'-path into the objective state whose copy of the tower parameters
  the pass uses without a gradient. `outputs` are the keys of the method's result that
  the term reads; they do not make a pass distinct.
  """
  method: str
  inputs: tuple[str, ...]
  outputs: tuple[str, ...] = dataclasses.field(default=("embedding",), compare=False)
  options: tuple[tuple[str, Any], ...] = ()
  weights: str | None = None

  @property
  def key(self):
    """A readable identity, also the pass's key in the features dict."""
    args = list(self.inputs) + [f"{k}={v}" for k, v in self.options]
    return f"{self.method}({', '.join(args)})" + (f"@{self.weights}" if self.weights else "")

  @property
  def grad(self):
    return self.weights is None


class Term(abc.ABC):
  """Base of every term; `name` is set by the objective that holds it."""
  name = None

  @abc.abstractmethod
  def passes(self):
    """{alias: Pass}: the tower passes this term reads."""

  @abc.abstractmethod
  def loss(self, params, state, features, ctx):
    """-> (scalar, metrics); `features[alias]` has the pass's outputs for the batch."""

  def attach(self, model):
    """Called once with the model, before anything compiles: raise ValueError if it
    cannot serve this term; read the static facts the term needs (e.g. a patch grid,
    which no pass output carries: outputs are per-example arrays)."""

  def init_params(self, rng):
    """The term's own parameters (leaves may be `nn.Partitioned`); {} for none."""
    del rng
    return {}

  def param_bounds(self):
    """{'/'-path within the term's parameters: (low, high)}, projected after updates."""
    return {}

  def init_state(self, params):
    """The term's state from the (boxed) initial parameters; {} for none."""
    del params
    return {}

  def update_state(self, state, params, features, ctx):
    """The state after the optimizer step (new `params`, this step's `features`)."""
    del params, features, ctx
    return state

  def encoders(self, model):
    """Encoders for evaluation when they differ from the towers'; None otherwise."""
    del model

  def own(self, params):
    """This term's parameters within the whole tree."""
    return params["objective"][self.name]


def register(type_name):
  """Class decorator: makes a term type selectable as `objective.terms.<n>.type`."""
  def add(cls):
    known = _TERMS.get(type_name)
    if known is not None and _path(known) != _path(cls):
      raise ValueError(f"term type {type_name!r} is already registered by {_path(known)}")
    _TERMS[type_name] = cls
    return cls
  return add


def towers(params):
  """The towers' parameters: `params` without the objective's own."""
  return {k: v for k, v in params.items() if k != "objective"}


def field(batch, path):
  """The batch entry at '/'-path `path` ('images/global', 'rois'), or a KeyError naming
  what the batch has; for tower passes and evaluators alike."""
  node = batch
  for part in path.split("/"):
    if not isinstance(node, dict) or part not in node:
      have = sorted(optim.path_name(keys)
                    for keys, _ in jax.tree_util.tree_flatten_with_path(batch)[0])
      raise KeyError(f"Batches lack {path!r}; they have {have}.")
    node = node[part]
  return node


def _path(cls):
  return f"{cls.__module__}.{cls.__qualname__}"


class Objective:
  """Terms with weights; the distinct passes they read, in a fixed order."""

  def __init__(self, terms, weights):
    self.terms, self.weights = dict(terms), dict(weights)
    self.passes, self.reads = {}, {}
    for name, term in self.terms.items():
      term.name = name
      self.reads[name] = {}
      for alias, p in term.passes().items():
        known = self.passes.get(p.key, p)
        outputs = tuple(dict.fromkeys(known.outputs + p.outputs))
        self.passes[p.key] = dataclasses.replace(known, outputs=outputs)
        self.reads[name][alias] = p.key
    providers = [t for t in self.terms.values() if type(t).encoders is not Term.encoders]
    if len(providers) > 1:
      raise ValueError("config.objective: terms "
                       f"{[t.name for t in providers]} each define the inference embedding")
    self._inference = providers[0] if providers else None

  def attach(self, model):
    for term in self.terms.values():
      term.attach(model)

  # Passes.

  def embed(self, model, params, state, batch, *, train, rng, grad=True):
    """{pass key: {output: [B, ...]}} of the passes with (grad=True) or without a
    gradient; pass i draws its randomness from fold_in(rng, i)."""
    out = {}
    for index, (key, p) in enumerate(self.passes.items()):
      if p.grad != grad:
        continue
      weights = (towers(params) if p.grad else
                 jax.lax.stop_gradient(field(state, p.weights)))
      rngs = None if rng is None else {"dropout": jax.random.fold_in(rng, index)}
      result = model.apply({"params": weights}, *(field(batch, i) for i in p.inputs),
                           train=train, method=p.method, rngs=rngs, **dict(p.options))
      missing = sorted(set(p.outputs) - set(result))
      if missing:
        raise KeyError(f"pass {key} has no output(s) {missing}; it has {sorted(result)}")
      out[key] = {o: result[o] for o in p.outputs}
      examples = jax.tree.leaves(field(batch, p.inputs[0]))[0].shape[0]
      for name, value in out[key].items():
        if jnp.ndim(value) == 0 or jnp.shape(value)[0] != examples:
          raise ValueError(f"pass {key}: output {name!r} is not a per-example array "
                           f"(leading axis {examples}); static facts such as the patch "
                           "grid are read from the model in Term.attach")
    return out

  def _term_features(self, name, features):
    return {alias: features[key] for alias, key in self.reads[name].items()}

  # Loss and state.

  def loss(self, params, state, features, ctx):
    """(sum of weight * term loss, metrics '<term>/<metric>' and 'logit_scale')."""
    total, metrics = 0.0, {}
    for index, (name, term) in enumerate(self.terms.items()):
      term_ctx = ctx._replace(rng=jax.random.fold_in(ctx.rng, index))
      value, term_metrics = term.loss(params, state.get(name, {}),
                                      self._term_features(name, features), term_ctx)
      total = total + self.weights[name] * value
      metrics[f"{name}/loss"] = value
      metrics.update({f"{name}/{k}": v for k, v in term_metrics.items()})
    if "logit_scale" in params:
      metrics["logit_scale"] = jnp.exp(params["logit_scale"])
    return total, metrics

  def init_params(self, rng):
    """{term: its own parameters} for the terms that have any."""
    own = {name: term.init_params(jax.random.fold_in(rng, index))
           for index, (name, term) in enumerate(self.terms.items())}
    return {name: p for name, p in own.items() if p}

  def param_bounds(self):
    """{'/'-path in the whole parameter tree: (low, high)} of the terms' parameters."""
    return {f"objective/{name}/{path}": bounds for name, term in self.terms.items()
            for path, bounds in term.param_bounds().items()}

  def init_state(self, params):
    state = {name: term.init_state(params) for name, term in self.terms.items()}
    return {name: s for name, s in state.items() if s}

  def update_state(self, state, params, features, ctx):
    new = dict(state)
    for index, (name, term) in enumerate(self.terms.items()):
      if name in state:
        term_ctx = ctx._replace(rng=jax.random.fold_in(ctx.rng, index))
        new[name] = term.update_state(state[name], params,
                                      self._term_features(name, features), term_ctx)
    return new

  def encoders(self, model):
    """The embedding evaluators use: a term's own, else the towers'."""
    own = None if self._inference is None else self._inference.encoders(model)
    return Encoders.of_towers(model) if own is None else own


def term_config(type, weight=1.0, **options):  # pylint: disable=redefined-builtin
  """`config.objective.terms.<name>` for a term of `type`: every option present, at its
  default unless given, so that each can be set from the command line. The execution
  options (strategy, block_size) are left to `config.objective`."""
  if type not in _TERMS:
    raise ValueError(f"unknown term type {type!r}; known: {sorted(_TERMS)}")
  accepted = inspect.signature(_TERMS[type]).parameters
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f"term type {type!r} has no option(s) {unknown}; known: {sorted(accepted)}")
  defaults = {k: p.default for k, p in accepted.items() if k not in EXECUTION_KEYS}
  return {"type": type, "weight": weight, **defaults, **options}


def get_objective(config):
  """`config.objective` -> Objective, every key and option checked by name."""
  config = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  unknown = sorted(set(config) - set(OBJECTIVE_KEYS))
  if unknown:
    raise ValueError(f"Unknown key(s) {', '.join('objective.' + k for k in unknown)}; "
                     f"known: {list(OBJECTIVE_KEYS)}")
  terms = config.get("terms") or {}
  if not terms:
    raise ValueError("config.objective.terms is empty: an objective needs a term")
  shared = {k: config[k] for k in EXECUTION_KEYS if k in config}
  built, weights = {}, {}
  for name, options in terms.items():
    options = dict(options)
    where = f"objective.terms.{name}"
    type_name = options.pop("type", None)
    if type_name not in _TERMS:
      raise ValueError(f"config.{where}.type: unknown term type {type_name!r}; known: "
                       f"{sorted(_TERMS)}")
    weight = options.pop("weight", 1.0)
    if not isinstance(weight, (int, float)) or weight < 0:
      raise ValueError(f"config.{where}.weight must be a number >= 0, got {weight!r}")
    cls = _TERMS[type_name]
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
      raise ValueError(f"Unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)} for "
                       f"term type {type_name!r}; known: {sorted(accepted)}")
    options = {**{k: v for k, v in shared.items() if k in accepted}, **options}
    try:
      built[name] = cls(**options)
    except ValueError as e:
      raise ValueError(f"config.{where}: {e}") from None
    weights[name] = float(weight)
  return Objective(built, weights)
