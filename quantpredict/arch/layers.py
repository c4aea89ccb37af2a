"""Walking a model's layers through its adapter: the blocks, each block's linear layers (weights always seen as
``[out, in]``, GPT-2's ``Conv1D`` included), the norm -> linear pairs SmoothQuant folds into and AWQ's scaling
groups, the embeddings, final norm and head, and a few facts about the model as a whole (its width, non-embedding
parameter count, device, context length)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantpredict.arch.generic import generic_adapter
from quantpredict.arch.table import (
    ADAPTERS,
    REFUSED,
    Adapter,
    LinearFold,
    model_type_of,
    module_at,
    supported_list,
)
from quantpredict.errors import UnsupportedArchitectureError

# where adapter() caches a generically walked model's Adapter (a plain attribute, not a submodule)
_GENERIC_ATTR = "_quantpredict_generic_adapter"

def adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s architecture: its row of the table, else the generic walk's (cached on the
    model); a clear error for a model neither can take."""
    model_type = model_type_of(model)
    rows = ADAPTERS.get(model_type)
    if rows is None:
        if model_type in REFUSED:
            raise UnsupportedArchitectureError(
                f"architecture {model_type!r} ({type(model).__name__}) is not supported: {REFUSED[model_type]}; "
                f"{supported_list()}")
        cached = getattr(model, _GENERIC_ATTR, None)
        if isinstance(cached, Adapter):
            return cached
        found = generic_adapter(model)
        object.__setattr__(model, _GENERIC_ATTR, found)  # plain attribute: not a submodule, copied by deepcopy
        return found
    for row in rows:
        if row.matches(model.config):
            return row
    layouts = "; ".join(row.describe_when() for row in rows)
    attrs = sorted({a for row in rows for a, _ in row.when})
    got = ", ".join(f"{a}={getattr(model.config, a, None)!r}" for a in attrs)
    raise UnsupportedArchitectureError(
        f"model type {model_type!r} with {got} matches none of its known layouts ({layouts}); add a row for it to "
        "ADAPTERS in quantpredict/arch/table.py")


def family(model: nn.Module) -> str:
    return adapter(model).family


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, in execution order."""
    return list(module_at(model, adapter(model).blocks))


def hidden_size(model: nn.Module) -> int:
    return int(getattr(model.config, adapter(model).hidden_size_attr))


@dataclass
class LinearRef:
    """A linear layer seen as ``y = x @ W.T + b`` with ``W`` of shape ``[out, in]``, whatever its storage."""

    name: str  # full module name in the model, e.g. "model.layers.0.self_attn.q_proj"
    module: nn.Module
    block_index: int

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view of the parameter, so in-place edits reach the model)."""
        w = self.module.weight
        return w.t() if self.transposed else w

    @property
    def parameter(self) -> nn.Parameter:
        return self.module.weight

    def set_weight(self, w: torch.Tensor) -> None:
        """Overwrite the weight with ``w`` of shape ``[out, in]``."""
        target = self.module.weight
        expected = (target.shape[1], target.shape[0]) if self.transposed else tuple(target.shape)
        if tuple(w.shape) != expected:
            raise ValueError(f"{self.name}: weight of shape {tuple(w.shape)} given, expected [out, in] = {expected}")
        with torch.no_grad():
            target.copy_(w.t() if self.transposed else w)


def block_linears(model: nn.Module, index: int) -> list[LinearRef]:
    """Linear layers of block ``index``, in execution order."""
    ad = adapter(model)
    block = blocks(model)[index]
    return [LinearRef(f"{ad.blocks}.{index}.{p}", module_at(block, p), index) for p in ad.linears]


def iter_block_linears(model: nn.Module) -> Iterator[tuple[int, nn.Module, list[LinearRef]]]:
    """``(index, block, its linears)`` for every block, in order (what a block-by-block pass walks)."""
    for i, block in enumerate(blocks(model)):
        yield i, block, block_linears(model, i)


def linear_layers(model: nn.Module) -> list[LinearRef]:
    """Every quantizable linear layer of every block (embeddings and head excluded), in execution order."""
    return [ref for i in range(len(blocks(model))) for ref in block_linears(model, i)]


@dataclass(frozen=True)
class SmoothPair:
    """A norm whose output feeds ``linears`` only: SmoothQuant folds ``1/s`` into the norm and ``s`` into them.

    The norm computes ``x_hat * (norm_offset + weight) (+ bias)`` per channel, so dividing its output by ``s``
    turns ``weight`` into ``(norm_offset + weight) / s - norm_offset`` (and ``bias`` into ``bias / s``).
    """

    norm: nn.Module
    norm_name: str
    linears: list[LinearRef]
    norm_offset: float = 0.0


def smoothquant_supported(model: nn.Module) -> bool:
    return adapter(model).smoothquant


def require_scale_folds(model: nn.Module, method: str = "SmoothQuant", option: str = "smoothquant_alpha") -> None:
    """Raise :class:`UnsupportedArchitectureError` naming the model type when no norm -> linear fold can be exact for
    it (``method`` names the scaling that needs one, ``option`` the recipe field to drop)."""
    ad = adapter(model)
    if not ad.smoothquant:
        raise UnsupportedArchitectureError(
            f"{method} is not supported for model type {model_type_of(model)!r}: {ad.smoothquant_unsupported}; "
            f"quantize it without {option}")


def require_smoothquant(model: nn.Module) -> None:
    """Raise :class:`UnsupportedArchitectureError` naming the model type when SmoothQuant cannot be exact for it."""
    require_scale_folds(model)


def smooth_pairs(model: nn.Module, index: int) -> list[SmoothPair]:
    """The norm -> linears pairs of block ``index``; raises where SmoothQuant is unsupported (never an empty list)."""
    require_smoothquant(model)
    ad = adapter(model)
    block = blocks(model)[index]
    pairs = []
    for norm_path, lin_paths in ad.smooth_pairs:
        refs = [LinearRef(f"{ad.blocks}.{index}.{p}", module_at(block, p), index) for p in lin_paths]
        pairs.append(SmoothPair(module_at(block, norm_path), f"{ad.blocks}.{index}.{norm_path}", refs, ad.norm_offset))
    return pairs


@dataclass(frozen=True)
class ScaleGroup:
    """One place AWQ scales: ``linears`` read the same input, their input columns are multiplied by ``s`` and ``1/s``
    is folded into what produces that input: a norm (``pair``, as SmoothQuant folds) or the last
    ``linears[0].in_features`` output rows of a previous linear (``prev``, a :class:`LinearFold`)."""

    name: str  # "<prev module>-><linear>+<linear>", stable across copies of the model
    linears: list[LinearRef]
    pair: SmoothPair | None = None
    prev: LinearRef | None = None

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features


def _fold_applies(model: nn.Module, fold: LinearFold, prev: LinearRef, nexts: list[LinearRef]) -> bool:
    if not all(getattr(model.config, attr, None) in values for attr, values in fold.when):
        return False
    return all(prev.out_features == fold.parts * n.in_features for n in nexts)


def awq_groups(model: nn.Module, index: int) -> list[ScaleGroup]:
    """AWQ's scaling groups of block ``index``: every norm -> linears pair (as SmoothQuant folds them), then every
    :class:`LinearFold` of the adapter whose exactness conditions hold (``v -> o`` without grouped-query attention,
    ``up -> down``, OPT's ``fc1 -> fc2`` through ReLU). Raises :class:`UnsupportedArchitectureError` where no norm
    fold is exact (post-norm blocks, the generic walk), as SmoothQuant does."""
    require_scale_folds(model, "AWQ", "awq")
    ad = adapter(model)
    block = blocks(model)[index]
    prefix = f"{ad.blocks}.{index}."
    groups = [ScaleGroup(f"{pair.norm_name}->{'+'.join(r.name.removeprefix(prefix) for r in pair.linears)}",
                         pair.linears, pair=pair) for pair in smooth_pairs(model, index)]
    for fold in ad.linear_folds:
        prev = LinearRef(prefix + fold.prev, module_at(block, fold.prev), index)
        nexts = [LinearRef(prefix + p, module_at(block, p), index) for p in fold.nexts]
        if _fold_applies(model, fold, prev, nexts):
            groups.append(ScaleGroup(f"{prev.name}->{'+'.join(fold.nexts)}", nexts, prev=prev))
    return groups


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    return [module_at(model, p) for p in adapter(model).embeddings]


def head(model: nn.Module) -> nn.Module:
    return module_at(model, adapter(model).head)


def head_is_tied(model: nn.Module) -> bool:
    """Whether the LM head's weight is the token embedding's (one matrix). Hugging Face ties by sharing the
    Parameter; the storage test catches a copy made to share memory (neither works on meta tensors, whose data
    pointers are all 0, hence the identity first)."""
    emb, out = embedding_modules(model)[0].weight, head(model).weight
    return emb is out or (not emb.is_meta and emb.untyped_storage().data_ptr() == out.untyped_storage().data_ptr())


def final_norm(model: nn.Module) -> nn.Module:
    """The norm before the head (``nn.Identity`` for a generically walked model where none was found)."""
    path = adapter(model).final_norm
    return module_at(model, path) if path else nn.Identity()


def logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits ``[n, seq_len, vocab]`` from the last block's output ``hidden`` ``[n, seq_len, hidden]``:
    final norm, head, and the soft-capping some models apply after it (Gemma-2/3)."""
    out = head(model)(final_norm(model)(hidden))
    cap = logit_softcap(model)
    if cap is not None:
        out = torch.tanh(out / cap) * cap
    return out


def logit_softcap(model: nn.Module) -> float | None:
    """The ``cap`` of the ``cap * tanh(logits / cap)`` the model applies after its head (Gemma-2/3), else ``None``."""
    attr = adapter(model).logit_softcap
    cap = getattr(model.config, attr, None) if attr else None
    return None if cap is None else float(cap)


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside the token/position embeddings and the (possibly tied) head, as in Kaplan et al."""
    skip = {id(p) for m in embedding_modules(model) for p in m.parameters()}
    skip |= {id(p) for p in head(model).parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def check_finite(model: nn.Module) -> None:
    """Raise :class:`ModelError` naming the first parameter holding NaN or Inf."""
    from quantpredict.arch.finite import check_finite_tensors

    check_finite_tensors(model.named_parameters())


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover, when its config says so."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
