"""The one place that knows model architectures.

For a Hugging Face causal LM this module gives its transformer blocks, each block's linear layers (weights always
seen as ``[out, in]``, GPT-2's ``Conv1D`` included), the norm -> linear pairs that SmoothQuant folds scales into,
the embedding and the head, and block-by-block execution for calibration. ``quantize``, ``features`` and ``qat``
walk models only through here: a new architecture is one entry in ``_ADAPTERS``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantpredict.errors import ModelError, UnsupportedArchitectureError


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its parts (attribute paths relative to the model or a block)."""

    family: str
    blocks: str  # path from the model to the ModuleList of blocks
    embeddings: tuple[str, ...]  # token (and position) embeddings
    head: str
    final_norm: str
    linears: tuple[str, ...]  # per block, in execution order
    # norm -> the linears that read its output (SmoothQuant folds into these)
    smooth_pairs: tuple[tuple[str, tuple[str, ...]], ...]
    hidden_size_attr: str = "hidden_size"


_ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(
        family="llama",
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        head="lm_head",
        final_norm="model.norm",
        linears=(
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        ),
        smooth_pairs=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
    ),
    "opt": Adapter(
        family="opt",
        blocks="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        head="lm_head",
        final_norm="model.decoder.final_layer_norm",
        linears=(
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2",
        ),
        smooth_pairs=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
        ),
    ),
    "gpt2": Adapter(
        family="gpt2",
        blocks="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        head="lm_head",
        final_norm="transformer.ln_f",
        linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        smooth_pairs=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        hidden_size_attr="n_embd",
    ),
    "gpt_neox": Adapter(
        family="gpt_neox",
        blocks="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        head="lm_head",
        final_norm="gpt_neox.final_layer_norm",
        linears=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        smooth_pairs=(
            ("input_layernorm", ("attention.query_key_value",)),
            ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        ),
    ),
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_ADAPTERS)


def adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s architecture; a clear error for any other."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}. Add an adapter in quantpredict/arch.py to support it."
        )
    return _ADAPTERS[model_type]


def family(model: nn.Module) -> str:
    return adapter(model).family


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, in execution order."""
    return list(_get(model, adapter(model).blocks))


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
    return [LinearRef(f"{ad.blocks}.{index}.{p}", _get(block, p), index) for p in ad.linears]


def linear_layers(model: nn.Module) -> list[LinearRef]:
    """Every quantizable linear layer of every block (embeddings and head excluded), in execution order."""
    return [ref for i in range(len(blocks(model))) for ref in block_linears(model, i)]


@dataclass
class SmoothPair:
    """A norm whose output feeds ``linears`` only: SmoothQuant folds ``1/s`` into the norm and ``s`` into them."""

    norm: nn.Module
    norm_name: str
    linears: list[LinearRef]


def smooth_pairs(model: nn.Module, index: int) -> list[SmoothPair]:
    ad = adapter(model)
    block = blocks(model)[index]
    pairs = []
    for norm_path, lin_paths in ad.smooth_pairs:
        refs = [LinearRef(f"{ad.blocks}.{index}.{p}", _get(block, p), index) for p in lin_paths]
        pairs.append(SmoothPair(_get(block, norm_path), f"{ad.blocks}.{index}.{norm_path}", refs))
    return pairs


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    return [_get(model, p) for p in adapter(model).embeddings]


def head(model: nn.Module) -> nn.Module:
    return _get(model, adapter(model).head)


def final_norm(model: nn.Module) -> nn.Module:
    return _get(model, adapter(model).final_norm)


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside the token/position embeddings and the (possibly tied) head, as in Kaplan et al."""
    skip = {id(p) for m in embedding_modules(model) for p in m.parameters()}
    skip |= {id(p) for p in head(model).parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def check_finite(model: nn.Module) -> None:
    """Raise :class:`ModelError` naming the first parameter holding NaN or Inf."""
    for name, p in model.named_parameters():
        bad = (~torch.isfinite(p.detach())).sum().item()
        if bad:
            raise ModelError(
                f"parameter {name!r} holds {bad} NaN/Inf value(s) of {p.numel()}; the model's weights are corrupt "
                "(re-load or re-train it) and cannot be quantized or measured"
            )


# ---- block-by-block execution --------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


_CACHE_ARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


@dataclass
class BlockInputs:
    """What block 0 receives for a batch of windows: the hidden states and the keyword arguments (masks, positions,
    rotary embeddings) that every block of the model receives alike."""

    hidden: torch.Tensor  # [n, seq_len, hidden]
    kwargs: dict[str, Any]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """Run the embeddings on ``input_ids`` ([n, seq_len]) and capture block 0's inputs.

    The keyword arguments (attention mask, position ids and embeddings) depend on the sequence length and batch
    size only, so they are captured once for ``batch_size`` windows and reused for every batch of the same size.
    """
    first = blocks(model)[0]
    captured: list[torch.Tensor] = []
    kwargs_holder: dict[str, Any] = {}

    signature = inspect.signature(first.forward)

    def hook(_module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}))  # a trailing **kwargs binds as one dict
        first_name = next(iter(signature.parameters))
        captured.append(bound.pop(first_name).detach())
        if not kwargs_holder:
            kwargs_holder.update({k: v for k, v in bound.items() if k not in _CACHE_ARGS})
            kwargs_holder["use_cache"] = False
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return BlockInputs(torch.cat(captured), kwargs_holder)


def _batch_kwargs(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """Slice batch-shaped tensors in ``kwargs`` (captured for ``batch_size`` rows) to ``n`` rows."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] > n:
            out[k] = v[:n]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t[:n] if t.dim() >= 1 and t.shape[0] > n else t for t in v)
        else:
            out[k] = v
    return out


def run_block(block: nn.Module, inputs: BlockInputs, batch_size: int = 8) -> torch.Tensor:
    """Apply ``block`` to ``inputs.hidden`` ([n, seq_len, hidden]) in batches; returns the output hidden states."""
    outs = []
    for start in range(0, inputs.hidden.shape[0], batch_size):
        h = inputs.hidden[start : start + batch_size]
        out = block(h, **_batch_kwargs(inputs.kwargs, h.shape[0]))
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def iter_block_linears(model: nn.Module) -> Iterator[tuple[int, nn.Module, list[LinearRef]]]:
    """(index, block, its linears) for every block, in order."""
    for i, block in enumerate(blocks(model)):
        yield i, block, block_linears(model, i)


# ---- block-by-block execution in bounded memory (see quantpredict.quantize.offload) --------------------------------


@torch.no_grad()
def capture_block_input_batches(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                                sink: Any) -> dict[str, Any]:
    """Like :func:`capture_block_inputs`, but hands each batch's block-0 hidden states ``[b, seq, hidden]`` to
    ``sink(hidden)`` as soon as it is computed instead of concatenating them, so a caller can keep them on disk.
    Returns the keyword arguments every block receives (captured for ``batch_size`` windows)."""
    first = blocks(model)[0]
    kwargs_holder: dict[str, Any] = {}
    signature = inspect.signature(first.forward)
    first_name = next(iter(signature.parameters))

    def hook(_module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}))  # a trailing **kwargs binds as one dict
        sink(bound.pop(first_name).detach())
        if not kwargs_holder:
            kwargs_holder.update({k: v for k, v in bound.items() if k not in _CACHE_ARGS})
            kwargs_holder["use_cache"] = False
        raise _Stop

    device = next(model.parameters()).device
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return kwargs_holder


def batch_kwargs(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """The block keyword arguments ``kwargs`` (captured for a full batch) sliced to a batch of ``n`` windows."""
    return _batch_kwargs(kwargs, n)


def linears_of(model: nn.Module, index: int, block: nn.Module) -> list[LinearRef]:
    """The linears of ``block`` (block ``index`` of ``model``, or a copy of it), named as in the model."""
    ad = adapter(model)
    return [LinearRef(f"{ad.blocks}.{index}.{p}", _get(block, p), index) for p in ad.linears]
