"""Which linear layers a recipe quantizes, and with what format: the plan both :mod:`.model` (quantizing) and
:mod:`.act` (activation hooks) read, kept apart from both so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantpredict import arch
from quantpredict.arch import LinearRef
from quantpredict.recipe import Recipe

__all__ = ["PlannedLayer", "PlannedMatrix", "embedding_and_head_plan", "keeps_head_and_embeddings", "layer_plan",
           "quantized_linears"]


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


@dataclass(frozen=True)
class PlannedMatrix:
    """The token embedding or the LM head (``role``), as a recipe's ``embedding_format``/``head_format`` quantizes
    it: ``module`` holds the ``[vocab, hidden]`` ``weight``; ``tied``: the one matrix is both."""

    role: str
    module: nn.Module
    weight_format: str
    tied: bool


def embedding_and_head_plan(model: nn.Module, recipe: Recipe) -> list[PlannedMatrix]:
    """The embedding and head matrices ``recipe`` quantizes (none unless it sets ``embedding_format`` or
    ``head_format``). A tied model has one matrix: both formats must then agree where both are given, and the one
    given applies (llama.cpp stores a tied ``token_embd`` in the output's type). Raises :class:`RecipeError` for
    two different formats on one tied matrix."""
    from quantpredict.errors import RecipeError

    if recipe.embedding_format is None and recipe.head_format is None:
        return []
    emb, head = arch.embedding_modules(model)[0], arch.head(model)
    if arch.head_is_tied(model):
        fmts = {f for f in (recipe.embedding_format, recipe.head_format) if f is not None}
        if len(fmts) > 1:
            raise RecipeError(f"recipe {recipe.label[:80]}: this model ties its embedding and head (one matrix), "
                              f"but the recipe gives them two formats ({recipe.embedding_format}, "
                              f"{recipe.head_format}); give one, or the same for both")
        return [PlannedMatrix("embedding+head", emb, fmts.pop(), True)]
    out = []
    if recipe.embedding_format is not None:
        out.append(PlannedMatrix("embedding", emb, recipe.embedding_format, False))
    if recipe.head_format is not None:
        out.append(PlannedMatrix("head", head, recipe.head_format, False))
    return out


def keeps_head_and_embeddings(model: nn.Module, recipe: Recipe) -> bool:
    """True when quantizing ``model`` as ``recipe`` says leaves its LM head and input embeddings as they are: the
    recipe sets neither ``embedding_format`` nor ``head_format``, and no planned linear layer is (or shares a weight
    with) one of them (no linear plan names them today: they are not in ``arch.linear_layers``). A caller relying
    on an unchanged head (``runs.execute_run``'s one-copy comparison) must make this check rather than assume."""
    if embedding_and_head_plan(model, recipe):
        return False
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
