"""The model as the features measure it, and the loss they measure on it.

:func:`prepared` puts the model in eval mode with gradients on the quantized weights only (eager attention when
gradients are taken) and :func:`compute_placement` on the compute device in float32; both put everything back on
exit. :func:`summed_nll` / :func:`mean_nll` are the calibration loss (differentiable twice, the head in token chunks
where the vocabulary is large) and :func:`graph_bytes_per_window` what one window adds to its double-backward graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from quantpredict import arch
from quantpredict.memory import LOGITS_CHUNK_BYTES, logits_chunk_tokens


def _set_attn(model: nn.Module, impl: str | None) -> None:
    if impl is None:
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(impl)
            return
        except (ValueError, ImportError, AttributeError):
            pass
    model.config._attn_implementation = impl


@contextlib.contextmanager
def prepared(model: nn.Module, grad_params: Sequence[torch.Tensor] = (), *,
             eager: bool | None = None) -> Iterator[None]:
    """Eval mode and ``requires_grad`` on ``grad_params`` only; eager attention when gradients are taken (double
    backward fails through CPU SDPA; ``eager`` overrides), the model's own attention otherwise (faster forward
    passes). Everything is restored on exit."""
    old_attn = getattr(model.config, "_attn_implementation", None)
    old_training = model.training
    old_flags = [(p, p.requires_grad) for p in model.parameters()]
    grad_ids = {id(p) for p in grad_params}
    use_eager = bool(grad_params) if eager is None else eager
    switch = use_eager and old_attn != "eager"
    try:
        if switch:
            _set_attn(model, "eager")
        model.eval()
        for p, _ in old_flags:
            p.requires_grad_(id(p) in grad_ids)
        yield
    finally:
        for p, flag in old_flags:
            p.requires_grad_(flag)
        model.train(old_training)
        if switch:
            _set_attn(model, old_attn)


def summed_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, *,
               chunk_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
    """Summed next-token NLL (nats) over every predicted token of ``windows`` ([n, seq_len]); differentiable twice.

    Batches are summed into one graph. When a batch's ``[tokens, vocab]`` float32 logits would exceed
    ``chunk_bytes``, the head and the cross-entropy run in token chunks on the body's last hidden state
    (:func:`quantpredict.lmhead.chunked_cross_entropy`), so no larger logits block exists, also under double
    backward; otherwise the model's own logits are used, exactly as before.
    """
    from quantpredict import lmhead

    vocab = int(lmhead.head_weight(model).shape[0]) if lmhead.supports_chunking(model) else 0
    loss = None
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        target = ids[:, 1:].reshape(-1)
        if vocab and target.numel() * vocab * 4 > chunk_bytes:
            hidden = lmhead.final_hidden(model, ids)[:, :-1]
            part = lmhead.chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]),
                                                lmhead.head_weight(model).detach(), target,
                                                logits_chunk_tokens(vocab, chunk_bytes))
        else:
            logits = model(ids, use_cache=False).logits[:, :-1]
            if logits.dtype in (torch.float16, torch.bfloat16):  # a half-precision softmax loses the 1e-3 nats
                logits = logits.float()
            z = logits.reshape(-1, logits.shape[-1])
            part = lmhead.summed_cross_entropy(z, target)
        loss = part if loss is None else loss + part
    return loss


def mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, *,
             chunk_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
    """Mean next-token NLL (nats) over every predicted token of ``windows`` ([n, seq_len]); differentiable twice.

    Batches are summed into one graph, so it is exactly the full batch's mean whatever ``batch_size`` is; the head
    runs in token chunks where the vocabulary is large (see :func:`summed_nll`).
    """
    total = windows.shape[0] * (windows.shape[1] - 1)
    return summed_nll(model, windows, batch_size, chunk_bytes=chunk_bytes) / total


def graph_bytes_per_window(model: nn.Module, seq_len: int, *, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """An upper estimate of the memory one calibration window of ``seq_len`` tokens adds to a double-backward
    (Hessian-vector product) graph: per block, the saved activations of the attention (``heads x seq^2`` scores
    and probabilities) and of the MLP, several times over for the backward graph that ``create_graph`` keeps; plus
    the head's logits when they are not chunked. Calibrated on SmolLM2-135M (30 blocks, 576 wide, 49k vocabulary:
    one 256-token window measured 2.1 GB, this gives 2.1 GB) and checked on a 1.07B Llama (16 blocks, 2048 wide, 32
    heads: ~4.5 GB measured beyond weights, direction and runtime; this gives 4.3 GB)."""
    from quantpredict import lmhead

    cfg = model.config
    d = arch.hidden_size(model)
    inter = next((int(v) for k in ("intermediate_size", "ffn_dim", "n_inner") if (v := getattr(cfg, k, None))),
                 4 * d)
    heads = int(next((v for k in ("num_attention_heads", "n_head") if (v := getattr(cfg, k, None))), 1))
    itemsize = max(next(model.parameters()).element_size(), 4)
    body = len(arch.blocks(model)) * seq_len * (16 * d + 8 * inter + 8 * heads * seq_len) * itemsize
    vocab = int(lmhead.head_weight(model).shape[0])
    logits = seq_len * vocab * 4
    head = 4 * min(logits, chunk_bytes) if lmhead.supports_chunking(model) else 6 * logits
    return int(1.5 * (body + head))


@contextlib.contextmanager
def compute_placement(model: nn.Module, device: Any = None) -> Iterator[torch.device]:
    """The model on ``device`` (``None``: where it is) in float32 (float64 stays float64) for the ``with``; its
    dtype and device are put back on exit. A bf16/fp16 model upcast to float32 and cast back is bitwise unchanged,
    so the features of a half-precision model are those of its stored weights, measured in float32."""
    from quantpredict.memory import resolve_device

    old_device = arch.model_device(model)
    target = old_device if device is None else resolve_device(device, flag="device")
    old_dtype = next(model.parameters()).dtype
    upcast = old_dtype in (torch.float16, torch.bfloat16)
    try:
        if target != old_device:
            model.to(target)
        if upcast:
            model.float()
        yield target
    finally:
        if upcast:
            model.to(old_dtype)
        if target != old_device:
            model.to(old_device)
