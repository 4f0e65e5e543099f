"""Objectives: weighted sums of named terms over declared tower passes (docs/design.md).

`config.objective` holds how the contrastive terms run and the terms themselves:

    objective.strategy, objective.block_size   # every term's contrastive execution
    objective.terms.<name> = {type: 'clip', weight: 1.0, **the type's options}

A term type is a `Term` subclass registered with `@register('type')`. A term declares
the tower passes it reads (`passes()`); the objective runs each distinct pass once per
step, however many terms read it, so combining methods is a config. See
`hvla.losses.objective` for the term interface.
"""
from hvla.losses.objective import (Context, Encoders, Objective, Pass, Term, get_objective,
                                   register, term_config)

# Importing a term's module registers it.
from hvla.losses import clip, hierarchical, masked, momentum, unified  # noqa: E402  pylint: disable=g-import-not-at-top

TERM_MODULES = (clip, hierarchical, masked, momentum, unified)  # the built-in term types

__all__ = ["Context", "Encoders", "Objective", "Pass", "Term", "get_objective", "register",
           "term_config"]
