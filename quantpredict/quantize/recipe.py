"""The quantization recipe. It lives in the torch-free :mod:`quantpredict.recipe` (the run store, the predictors and
the reports read recipes without loading torch); this module keeps the ``quantpredict.quantize.recipe`` path."""

from __future__ import annotations

from quantpredict.recipe import METHODS, SKIP, LayerRule, Recipe, mixed_recipe, resolve_block_size

__all__ = ["METHODS", "SKIP", "LayerRule", "Recipe", "mixed_recipe", "resolve_block_size"]
