"""``fake_quantize``: validate, then run the fused kernel when it applies, else the torch reference."""

from __future__ import annotations

import torch
from torch import Tensor

from quantpredict.errors import FormatError
from quantpredict.formats import native
from quantpredict.formats.params import fake_quantize_shipped, is_shipped
from quantpredict.formats.reference import (
    fake_quantize_scaled,
    non_finite_error,
    resolve_axis,
    resolve_block,
)
from quantpredict.formats.table import Format, get_format


def fake_quantize(x: Tensor, fmt: str, *, axis: int = -1, block_size: int | None = None,
                  importance: Tensor | None = None) -> Tensor:
    """Quantize ``x`` to the format ``fmt`` and back: same shape and dtype, every value on the format's grid.

    MX formats: blocks of ``block_size`` (default 32) consecutive elements along ``axis`` share an E8M0 scale; the
    last block may be shorter. int/fp8: one scale per slice along ``axis`` (for an [out, in] weight and axis=-1, one
    per output row), or per group of ``block_size``. bf16/fp16: a plain cast (no scale; ``block_size`` ignored).
    Shipped layouts: uintK (AutoGPTQ's asymmetric quantizer, groups of 128 by default; uintK_pc per channel), nf4 /
    nf4_dq (bitsandbytes, blocks of 64), q8_0 / q5_* / q4_0 / q4_1 / q2_k .. q6_k / iq4_nl / iq4_xs (llama.cpp's
    reference quantizers; the rows along ``axis`` must be a multiple of 32 or 256); their values are what the stored
    checkpoint dequantizes to.
    bf16/fp16/float64 inputs are computed in float32 and returned in their dtype. The result carries no autograd
    history; for training use a straight-through estimator, ``x + (fake_quantize(x, fmt) - x).detach()``.

    ``importance`` (llama.cpp formats only, ``axis`` -1 only): an importance matrix, one float >= 0 per element of
    the last axis (the columns of an [out, in] weight; llama-quantize's ``--imatrix`` weights, see
    :func:`quantpredict.imatrix.quant_weights`), the same for every row: quantize as llama.cpp does with it
    (:func:`quantpredict.formats.ggml_imatrix.fake_quantize_weighted`). None: without one.

    Raises :class:`~quantpredict.errors.FormatError` (a ValueError) for unknown formats, NaN/Inf input, a
    non-floating tensor, or a bad axis / block size / importance.
    """
    f = get_format(fmt)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise FormatError(f"fake_quantize needs a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if importance is not None:
        return _fake_quantize_importance(x, f, axis, block_size, importance)
    if is_shipped(f):
        return fake_quantize_shipped(x, f, axis, block_size)
    if f.family == "float" or x.device.type != "cpu" or x.numel() == 0 or not native.available():
        return fake_quantize_reference(x, f, axis=axis, block_size=block_size)
    x = x.detach()
    squeeze = x.dim() == 0
    x32 = x.reshape(1) if squeeze else x
    ax = resolve_axis(x32, axis)
    n = x32.shape[ax]
    block = resolve_block(f, block_size, n)
    xm = x32.to(torch.float32).movedim(ax, -1)
    rows_shape = xm.shape
    y = native.fake_quantize_rows(xm.reshape(-1, n).contiguous(), f, min(block, n))
    if y is None:
        raise non_finite_error(x32, f.name)
    y = y.reshape(rows_shape).movedim(-1, ax)
    return (y.reshape(()) if squeeze else y).to(x.dtype)


def fake_quantize_reference(x: Tensor, fmt: str | Format, *, axis: int = -1, block_size: int | None = None) -> Tensor:
    """Reference :func:`quantpredict.formats.fake_quantize` (plain torch, any device). Same shape and dtype."""
    f = get_format(fmt)
    if not x.is_floating_point():
        raise FormatError(f"fake_quantize needs a floating-point tensor, got dtype {x.dtype}")
    if is_shipped(f):
        return fake_quantize_shipped(x, f, axis, block_size, use_native=False)
    return fake_quantize_scaled(x, f, axis=axis, block_size=block_size)


def _fake_quantize_importance(x: Tensor, f: Format, axis: int, block_size: int | None, importance: Tensor) -> Tensor:
    """``fake_quantize`` with an importance matrix: llama.cpp's formats, along the last axis. Same shape and dtype."""
    from quantpredict.formats import ggml_imatrix

    if f.family != "ggml":
        raise FormatError(f"importance (an imatrix) applies to llama.cpp's formats only, not {f.name!r}")
    if x.dim() == 0 or resolve_axis(x, axis) != x.dim() - 1:
        raise FormatError(f"importance: quantize along the last axis (axis=-1; llama.cpp's rows), got axis {axis} for "
                          f"a tensor of shape {tuple(x.shape)}")
    f.check_block(block_size)
    n = x.shape[-1]
    return ggml_imatrix.fake_quantize_weighted(x.reshape(-1, n), f, importance).reshape(x.shape)
