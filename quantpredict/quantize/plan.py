"""Which linear layers a recipe quantizes, and with what format: the plan both :mod:`.model` (quantizing) and
:mod:`.act` (activation hooks) read, kept apart from both so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantpredict import arch
from quantpredict.arch import LinearRef
from quantpredict.recipe import Recipe

__all__ = ["PlannedLayer", "keeps_head_and_embeddings", "layer_plan", "quantized_linears"]


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


def keeps_head_and_embeddings(model: nn.Module, recipe: Recipe) -> bool:
    """True when quantizing ``model`` as ``recipe`` says leaves its LM head and input embeddings as they are: no
    planned layer is (or shares a weight with) one of them. Today no plan can name them (they are not in
    ``arch.linear_layers``); this is the check for a future mix that would, which a caller relying on an unchanged
    head (``runs.execute_run``'s one-copy comparison) must make rather than assume."""
    protected = [arch.head(model), *arch.embedding_modules(model)]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        protected.append(out_emb)
    modules = {id(m) for m in protected}
    storages = {p.untyped_storage().data_ptr() for m in protected for p in m.parameters()}
    for p in layer_plan(model, recipe):
        if id(p.ref.module) in modules or p.ref.weight.untyped_storage().data_ptr() in storages:
            return False
    return True
