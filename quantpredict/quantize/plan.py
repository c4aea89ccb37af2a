"""Which linear layers a recipe quantizes, and with what format: the plan both :mod:`.model` (quantizing) and
:mod:`.act` (activation hooks) read, kept apart from both so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantpredict import arch
from quantpredict.arch import LinearRef
from quantpredict.recipe import Recipe

__all__ = ["PlannedLayer", "layer_plan", "quantized_linears"]


@dataclass(frozen=True)
class PlannedLayer:
    """One linear layer a recipe quantizes, with the format and resolved block size it gets."""

    ref: LinearRef
    weight_format: str
    block_size: int | None


def layer_plan(model: nn.Module, recipe: Recipe, block_index: int | None = None) -> list[PlannedLayer]:
    """The layers ``recipe`` quantizes (of ``arch.linear_layers``, or of one block) with each one's format: the
    recipe's format, or its per-layer override or list entry; layers it leaves in full precision are left out."""
    all_refs = arch.linear_layers(model)
    formats = recipe.layer_formats_for([r.name for r in all_refs])
    plan = [PlannedLayer(ref, *fb) for ref, fb in zip(all_refs, formats) if fb is not None]
    return plan if block_index is None else [p for p in plan if p.ref.block_index == block_index]


def quantized_linears(model: nn.Module, recipe: Recipe, block_index: int | None = None) -> list[LinearRef]:
    """The linear layers ``recipe`` quantizes (all of ``arch.linear_layers`` but those it leaves in full
    precision: ``recipe.skip`` and ``skip`` overrides)."""
    return [p.ref for p in layer_plan(model, recipe, block_index)]
