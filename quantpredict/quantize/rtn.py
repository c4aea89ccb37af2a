"""Round to nearest: every weight cast onto the format's grid independently (the baseline GPTQ improves on)."""

from __future__ import annotations

import torch


def rtn_quantize(weight: torch.Tensor, fmt: str, *, block_size: int | None = None,
                 importance: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` [out, in] fake-quantized to ``fmt`` with blocks/groups of ``block_size`` along ``in``.

    ``block_size=None`` takes the format's default (32 for MX, one scale per output row for INT/FP8). Returns a
    tensor of the same shape and dtype. ``importance`` [in] (llama.cpp formats only): quantize as llama-quantize
    does with an importance matrix whose quant_weights these are (:func:`quantpredict.formats.fake_quantize`).
    """
    from quantpredict.formats import fake_quantize

    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    return fake_quantize(weight.detach(), fmt, axis=-1, block_size=block_size, importance=importance)
