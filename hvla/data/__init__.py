"""hvla's data layer; the entry points are in hvla.data.pipeline (docs/data.md)."""
