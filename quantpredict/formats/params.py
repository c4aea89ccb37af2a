"""Fitted quantization parameters for every format: fit once, then quantize any part of the tensor with them.

:func:`fit_params` fits a format's parameters on a tensor (scales for MX/int/fp8; scale and zero point for uintK;
absmax for NF4; d, dmin, sub-block scales and mins for the k-quants; the per-tensor scale and NVFP4's E4M3 block
scales), and returns them *per element*, in the tensor's
own shape, so that :func:`quantize_with_params` can quantize the whole tensor, or any slice of it (GPTQ fits a
group once and then rounds it column by column), with no knowledge of the layout::

    p = fit_params(w[:, a:a + B], "q4_k")            # [out, 256] parameters of one super-block per row
    col = quantize_with_params(w[:, a + j : a + j + 1], p.narrow(-1, j, 1))

``quantize_with_params(x, fit_params(x, f, block_size=B)) == fake_quantize(x, f, block_size=B)`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from quantpredict.errors import FormatError
from quantpredict.formats import asym, ggml, ggml_act, nf4, tensor_scale
from quantpredict.formats.table import Format, get_format

# families whose parameters are more than one scale along the axis
SHIPPED = ("asym", "nf4", "ggml", "ggml_act", "tensor")
_CODECS = {"asym": asym, "nf4": nf4, "ggml": ggml, "ggml_act": ggml_act, "tensor": tensor_scale}
# the parameters of a tensor_level format that are fitted on the whole tensor (stats_from)
_TENSOR_STATS = {"nf4": ("offset", "absmax2"), "tensor": tensor_scale.TENSOR_STATS}


@dataclass(frozen=True)
class QuantParams:
    """The parameters of ``format`` fitted on a tensor: each entry of ``tensors`` has that tensor's shape (one value
    per element, repeated over its block), float32."""

    format: str
    tensors: Mapping[str, Tensor]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def narrow(self, dim: int, start: int, length: int) -> QuantParams:
        """The parameters of ``x.narrow(dim, start, length)``."""
        return QuantParams(self.format, {k: v.narrow(dim, start, length) for k, v in self.tensors.items()})

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]


def is_shipped(fmt: Format) -> bool:
    return fmt.family in SHIPPED


def shipped_block(fmt: Format, block_size: int | None, n: int) -> int:
    """The block length along the axis for a shipped format (the whole axis for a per-channel uintK_pc), with the
    layout's checks: fixed blocks and rows that are a multiple of them for ggml."""
    block = fmt.check_block(block_size)
    fmt.check_row_length(n)
    return max(n, 1) if block is None else block


def fit_blocks(blocks: Tensor, fmt: Format, stats: Mapping[str, Tensor] | None = None,
               use_native: bool = True) -> dict[str, Tensor]:
    """Parameters of each block of ``blocks`` [R, nb, B] (float32, finite), broadcasting against ``blocks``
    (``use_native``: the k-quant searches may run in the C kernel, bit-identical to torch)."""
    if fmt.family == "nf4":
        return nf4.fit(blocks, fmt, stats)
    if fmt.family in ("ggml", "ggml_act"):
        return _CODECS[fmt.family].fit(blocks, fmt, use_native)
    if fmt.family == "tensor":
        return tensor_scale.fit(blocks, fmt, stats)
    return asym.fit(blocks, fmt)


def quantize_blocks(x: Tensor, fmt: Format, p: Mapping[str, Tensor]) -> Tensor:
    """``x`` (float32) on the format's grid with parameters ``p`` broadcasting against it."""
    return _CODECS[fmt.family].quantize(x, fmt, p)


def _expand(t: Tensor, block: int, n: int, moved_shape: torch.Size, ax: int) -> Tensor:
    """Per-block [R, nb, 1 or B] -> per element in the original layout (moved_shape with ``ax`` moved back)."""
    t = t.expand(*t.shape[:-1], block).reshape(t.shape[0], -1)[:, :n]
    return t.reshape(moved_shape).movedim(-1, ax).contiguous()


def fit_params(x: Tensor, fmt: str | Format, *, axis: int = -1, block_size: int | None = None,
               stats_from: QuantParams | None = None) -> QuantParams:
    """The parameters :func:`~quantpredict.formats.fake_quantize` fits on ``x`` (any shape; blocks along ``axis``),
    one value per element (each entry has ``x``'s shape).

    MX/int/fp8/float: ``scale`` (see :func:`~quantpredict.formats.compute_scale`). uintK: ``scale``, ``scale16``,
    ``zero``. NF4: ``inv``, ``absmax`` (and ``offset``, ``absmax2`` for nf4_dq). ggml: see
    :func:`quantpredict.formats.ggml.fit`. nvfp4 / fp8_e4m3_pt: ``tensor_scale``, ``scale`` (and ``block_scale``), see
    :func:`quantpredict.formats.tensor_scale.fit`. ``stats_from``: for the formats with tensor-level parameters
    (:attr:`~quantpredict.formats.Format.tensor_level`: nf4_dq's mean and per-run absmax2, the per-tensor scale of
    nvfp4 and fp8_e4m3_pt), take those from parameters fitted on the whole tensor instead of fitting them on ``x``
    (``x`` a slice of it, ``stats_from`` narrowed to the same slice); ignored by the other formats.
    """
    from quantpredict.formats.reference import (
        _blocked,
        check_finite,
        compute_scale,
        expand_scale,
        resolve_axis,
        resolve_block,
    )

    f = get_format(fmt)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise FormatError(f"fit_params needs a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    x32 = x.detach().to(torch.float32)
    squeeze = x32.dim() == 0
    x32 = x32.reshape(1) if squeeze else x32
    ax = resolve_axis(x32, axis)
    check_finite(x32, f.name)
    n = x32.shape[ax]
    if not is_shipped(f):
        s = compute_scale(x32, f, axis=ax, block_size=block_size)
        s = expand_scale(s, axis=ax, block_size=resolve_block(f, block_size, n), length=n)
        out = {"scale": s.expand_as(x32).contiguous()}
    else:
        block = shipped_block(f, block_size, n)
        xm = x32.movedim(ax, -1)
        blocks = _blocked(xm.reshape(-1, n), block)
        stats = None
        if stats_from is not None and f.tensor_level:
            stats = {k: _first_of_blocks(stats_from[k].to(torch.float32).movedim(ax, -1).reshape(-1, n), block)
                     for k in _TENSOR_STATS[f.family]}
        p = fit_blocks(blocks, f, stats)
        out = {k: _expand(v, block, n, xm.shape, ax) for k, v in p.items()}
    if squeeze:
        out = {k: v.reshape(()) for k, v in out.items()}
    return QuantParams(f.name, out)


def _first_of_blocks(t: Tensor, block: int) -> Tensor:
    """[R, n] per element -> [R, nb, 1]: the value at the start of each block."""
    return t[:, ::block].unsqueeze(-1)


def quantize_with_params(x: Tensor, params: QuantParams) -> Tensor:
    """``x`` quantized with ``params`` (fitted on ``x``, or on a tensor ``x`` is a slice of, narrowed alike): values
    on the format's grid, same shape and dtype as ``x``. Values beyond the fitted range clamp to the grid's ends."""
    from quantpredict.formats.reference import check_finite, quantize_with_scale

    f = get_format(params.format)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise FormatError(f"quantize_with_params needs a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    x32 = x.detach().to(torch.float32)
    check_finite(x32, f.name)
    if not is_shipped(f):
        return quantize_with_scale(x, f, params["scale"])
    return quantize_blocks(x32, f, params.tensors).to(x.dtype)


def fake_quantize_shipped(x: Tensor, f: Format, axis: int, block_size: int | None, use_native: bool = True) -> Tensor:
    """:func:`~quantpredict.formats.fake_quantize` for the shipped formats (torch, with llama.cpp's scale searches
    in the C kernel when ``use_native`` and it is available). Same shape and dtype."""
    from quantpredict.formats.reference import _blocked, check_finite, resolve_axis

    x = x.detach()
    x32 = x.to(torch.float32)
    squeeze = x32.dim() == 0
    x32 = x32.reshape(1) if squeeze else x32
    ax = resolve_axis(x32, axis)
    check_finite(x32, f.name)
    n = x32.shape[ax]
    block = shipped_block(f, block_size, n)
    if x32.numel() == 0:
        return x.clone()
    xm = x32.movedim(ax, -1)
    blocks = _blocked(xm.reshape(-1, n), block)
    if f.family in ("ggml", "ggml_act"):
        y = _CODECS[f.family].fake_quantize_blocks(blocks, f, use_native)
    else:
        y = quantize_blocks(blocks, f, fit_blocks(blocks, f))
    y = y.reshape(y.shape[0], -1)[:, :n].reshape(xm.shape).movedim(-1, ax)
    return (y.reshape(()) if squeeze else y).to(x.dtype)
