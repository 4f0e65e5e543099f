"""Evaluators, chosen by `config.evals.<name>.type` (see docs/evaluation.md).

    evaluator = get_evaluator(name, config.evals[name], encoders=encoders, mesh=mesh,
                              data_config=config.data, tokenizer=tokenizer)
    scalars, images = evaluator.run(params)  # every `evaluator.every_steps` steps

`scalars` maps '<name>/<metric>' to python floats, `images` maps '<name>/<tag>' to uint8
[N, H, W, 3] heatmaps (empty except for grounding). A new evaluator is a new module whose
class is decorated with `@common.register('type')` and imported here.
"""
from hvla.evaluators import common
from hvla.evaluators import grounding, linear_probe, retrieval, zeroshot  # noqa: F401 (register)


def default_eval_config(type_name, **overrides):
  """The defaults of an evaluator type, with `overrides` applied (unknown keys fail)."""
  config = common.registered(type_name).default_config()
  return common.merge_config(config, overrides, f"<{type_name}>")


def get_evaluator(name, eval_config, *, encoders, mesh, data_config, tokenizer=None):
  """Builds the evaluator `name` from its `config.evals.<name>` entry.

  Its data is the training `data_config` with `eval_config.data` applied over it; the
  splits, labels and fields it reads are checked against the dataset first. Its
  tokenizer is its data's unless `tokenizer` is given.
  """
  if "type" not in eval_config:
    raise ValueError(f"config.evals.{name} needs a `type`; known: {sorted(common.types())}.")
  cls = common.registered(eval_config["type"])
  config = common.merge_config(cls.default_config(), eval_config, name)
  source = common.DatasetSource(data_config, config.data, config.batch_size, view=config.view,
                                labels=(config.label,) if "label" in config else ())
  source.check(name, *cls.reads(config))
  tokenizer = source.tokenizer() if tokenizer is None else tokenizer
  return cls(name, config, encoders=encoders, mesh=mesh, source=source, tokenizer=tokenizer)
