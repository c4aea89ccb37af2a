"""Block-by-block execution for calibration: capture what block 0 receives, run one block at a time (also in
bounded memory, batch by batch, see :mod:`quantpredict.quantize.offload`), and hook the inputs of linear layers."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantpredict.arch.layers import LinearRef, adapter, blocks
from quantpredict.arch.table import module_at
from quantpredict.errors import ModelError


class _Stop(Exception):
    pass


_CACHE_ARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


@dataclass(frozen=True)
class PerBlock:
    """A block keyword argument whose value is not the same for every block: Qwen-2 and Gemma-2/3 pass each
    layer the attention mask of its type (sliding window or full), Gemma-3 also its rotary embeddings (local or
    global). ``values[i]`` is what ``blocks[i]`` receives."""

    blocks: tuple[nn.Module, ...]
    values: tuple[Any, ...]

    def for_block(self, block: nn.Module) -> Any:
        for b, v in zip(self.blocks, self.values):
            if b is block:
                return v
        raise ModelError(f"block {type(block).__name__} is not one of the blocks these inputs were captured on; "
                         "capture_block_inputs on the model whose blocks you run")


@dataclass
class BlockInputs:
    """What block 0 receives for a batch of windows: the hidden states and the keyword arguments (masks, positions,
    rotary embeddings) of every block; one that differs between blocks is a :class:`PerBlock`."""

    hidden: torch.Tensor  # [n, seq_len, hidden]
    kwargs: dict[str, Any]


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects are different
        return False


def _merge_block_kwargs(block_list: list[nn.Module], per_block: list[dict[str, Any]]) -> dict[str, Any]:
    """Block 0's kwargs, with a :class:`PerBlock` for every key whose value differs in some block."""
    first = per_block[0]
    out = dict(first)
    for key, value in first.items():
        values = tuple(kw.get(key) for kw in per_block)
        if not all(_same(value, v) for v in values[1:]):
            out[key] = PerBlock(tuple(block_list), values)
    return out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """Run the embeddings on ``input_ids`` ([n, seq_len]) and capture block 0's inputs.

    The keyword arguments (attention mask, position ids and embeddings) depend on the sequence length and batch
    size only, so they are captured once for ``batch_size`` windows and reused for every batch of the same size.
    The first batch runs through every block but the last, so that kwargs differing between blocks are seen; the
    other batches stop at block 0.
    """
    block_list = blocks(model)
    captured: list[torch.Tensor] = []
    per_block: list[dict[str, Any]] = []

    def make_hook(index: int, signature: inspect.Signature):
        first_name = next(iter(signature.parameters))

        def hook(_module, args, kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            bound.update(bound.pop("kwargs", {}))  # a trailing **kwargs binds as one dict
            hidden = bound.pop(first_name)
            if index == 0:
                captured.append(hidden.detach())
            if len(per_block) == index:  # the first batch: every block's kwargs
                kw = {k: v for k, v in bound.items() if k not in _CACHE_ARGS}
                kw["use_cache"] = False
                per_block.append(kw)
            if len(per_block) == len(block_list):
                raise _Stop

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i, inspect.signature(b.forward)), with_kwargs=True)
               for i, b in enumerate(block_list)]
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if len(per_block) != len(block_list):
        raise ModelError(f"only {len(per_block)} of the {len(block_list)} blocks ran in the model's forward; "
                         "block-by-block execution needs every block to run")
    return BlockInputs(torch.cat(captured), _merge_block_kwargs(block_list, per_block))


def _slice_rows(v: Any, n: int, captured: int) -> Any:
    """``v`` cut from ``captured`` windows to ``n``: batch-major tensors with ``m`` rows per window (ALiBi's
    ``[batch * heads, ...]``) keep ``m * n`` rows; others with more than ``n`` rows keep ``n``."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] <= n:
        return v
    rows = v.shape[0]
    if rows > captured and rows % captured == 0:
        return v[: rows // captured * n]
    return v[:n]


def _batch_kwargs(kwargs: dict[str, Any], n: int, captured: int) -> dict[str, Any]:
    """Slice batch-shaped tensors in ``kwargs`` (captured for ``captured`` rows) to ``n`` rows."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(_slice_rows(t, n, captured) for t in v)
        else:
            out[k] = _slice_rows(v, n, captured)
    return out


def run_block(block: nn.Module, inputs: BlockInputs, batch_size: int = 8) -> torch.Tensor:
    """Apply ``block`` to ``inputs.hidden`` ([n, seq_len, hidden]) in batches; returns the output hidden states.

    ``batch_size`` must be the one the inputs were captured with (their kwargs are shaped for it)."""
    kwargs = {k: v.for_block(block) if isinstance(v, PerBlock) else v for k, v in inputs.kwargs.items()}
    captured = min(batch_size, inputs.hidden.shape[0])
    outs = []
    for start in range(0, inputs.hidden.shape[0], batch_size):
        h = inputs.hidden[start : start + batch_size]
        out = block(h, **_batch_kwargs(kwargs, h.shape[0], captured))
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


# ---- block-by-block execution in bounded memory (see quantpredict.quantize.offload) --------------------------------


@torch.no_grad()
def capture_block_input_batches(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                                sink: Any) -> dict[str, Any]:
    """Like :func:`capture_block_inputs`, but hands each batch's block-0 hidden states ``[b, seq, hidden]`` to
    ``sink(hidden)`` as soon as it is computed instead of concatenating them, so a caller can keep them on disk.
    Every batch stops at block 0. Returns block 0's keyword arguments (captured for ``batch_size`` windows); the
    kwargs of every block, where they differ, come from :func:`capture_block_kwargs`."""
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


@torch.no_grad()
def capture_block_kwargs(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments of every block for one batch of windows ``[b, seq_len]`` (one forward through every
    block but the last's own computation): block 0's, with a :class:`PerBlock` for those that differ between
    blocks (Qwen-2 and Gemma-2/3's per-layer masks and rotary embeddings). See :func:`block_kwargs`."""
    device = next(model.parameters()).device
    return capture_block_inputs(model, input_ids.to(device), batch_size=input_ids.shape[0]).kwargs


def block_kwargs(kwargs: dict[str, Any], index: int) -> dict[str, Any]:
    """The keyword arguments block ``index`` receives (a :class:`PerBlock` resolved by position, so a compute copy
    of the block gets its original's)."""
    return {k: v.values[index] if isinstance(v, PerBlock) else v for k, v in kwargs.items()}


def batch_kwargs(kwargs: dict[str, Any], n: int, captured: int) -> dict[str, Any]:
    """The block keyword arguments ``kwargs`` (captured for ``captured`` windows) sliced to a batch of ``n``."""
    return _batch_kwargs(kwargs, n, captured)


@contextlib.contextmanager
def input_hooks(refs: Sequence[LinearRef], on_input: Callable[[LinearRef, torch.Tensor], None]) -> Iterator[None]:
    """Inside the ``with``, every forward pass calls ``on_input(ref, x)`` with the input ``x`` ``[..., in]`` of each
    linear ``ref``, as the module receives it: the hooks are prepended, so they see the input before any activation
    fake-quant pre-hook changes it. The hooks are removed on exit, also after an error."""
    handles = []
    for ref in refs:
        def hook(_module, args, _ref=ref):
            on_input(_ref, args[0])

        handles.append(ref.module.register_forward_pre_hook(hook, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def linears_of(model: nn.Module, index: int, block: nn.Module) -> list[LinearRef]:
    """The linears of ``block`` (block ``index`` of ``model``, or a copy of it), named as in the model."""
    ad = adapter(model)
    return [LinearRef(f"{ad.blocks}.{index}.{p}", module_at(block, p), index) for p in ad.linears]
