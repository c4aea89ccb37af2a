"""Round to nearest: every weight cast onto the format's grid independently (the baseline GPTQ improves on), and
the relative weight error every quantized matrix is reported with."""

from __future__ import annotations

import math

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


def frobenius_norm(x: torch.Tensor) -> float:
    """The Frobenius norm of ``x`` [out, in]: squares summed per row in float32, the rows in float64 (against a
    float64 copy, at under half its cost: ~1e-10 relative on a whole layer, a one-row sum's float32 error on a
    single row; a float32 norm of a whole 1.5B-model layer is off by ~1e-4)."""
    x = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # 16-bit squares would lose the sum
    return math.sqrt(float(torch.mul(x, x).sum(-1).double().sum()))


def relative_error(weight: torch.Tensor, quantized: torch.Tensor) -> float:
    """``||quantized - weight|| / ||weight||`` (0 for an all-zero ``weight``), both [out, in]: the difference is
    taken in ``weight``'s dtype (exact wherever ``quantized`` is within a factor 2 of ``weight``). For float32 CPU
    tensors both norms come from one pass of the C kernel (:func:`quantpredict.formats.native.squared_sums`: squares
    and sums in float64; the torch path below took six passes over memory, a second of a 1.5B model's RTN); otherwise
    each norm by :func:`frobenius_norm` (float32 rows, float64 sum: within ~1e-7 relative of the kernel's)."""
    from quantpredict.formats import native

    if quantized.dtype == weight.dtype == torch.float32:
        sums = native.squared_sums(weight, quantized)
        if sums is not None:
            return math.sqrt(sums[1]) / math.sqrt(sums[0]) if sums[0] > 0 else 0.0
    norm = frobenius_norm(weight)
    return frobenius_norm(quantized.to(weight.dtype) - weight) / norm if norm > 0 else 0.0
