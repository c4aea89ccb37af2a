"""The reference implementation in plain torch: clear, a few memory passes per step, exact.

Everything is computed in float32. Scales that are powers of two (E8M0) and element grid steps are built from
their bit patterns, never from ``log2``/``exp2``: ``log2`` rounds (log2 of 2^20 * (1 - 2^-24) is 20.0 in float32)
and ``exp2`` need not be exact, so both would put values off the grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quantpredict.errors import FormatError
from quantpredict.formats.table import ELEMENTS, Element, Format, get_format

E8M0_MIN, E8M0_MAX = -127, 127


def pow2(k: Tensor) -> Tensor:
    """Exactly 2^k as float32 for an integer tensor ``k`` in [-149, 127] (subnormals included)."""
    k = k.to(torch.int32)
    normal = (k + 127).clamp_min(0) << 23
    subnormal = torch.ones_like(k) << (k + 149).clamp(0, 22)
    return torch.where(k >= -126, normal, subnormal).view(torch.float32)


def floor_log2(a: Tensor) -> Tensor:
    """floor(log2(a)) as int32 for finite a > 0 (subnormals included), via frexp (exact)."""
    return torch.frexp(a)[1] - 1


def check_finite(x: Tensor, fmt: str) -> None:
    """Raise :class:`FormatError` saying how many values of ``x`` are NaN / Inf."""
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)  # one pass without a mask: NaN propagates into both, Inf shows at an end
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise non_finite_error(x, fmt)


def non_finite_error(x: Tensor, fmt: str) -> FormatError:
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    return FormatError(
        f"cannot quantize to {fmt!r}: the input tensor of shape {tuple(x.shape)} has {n_nan} NaN and {n_inf} Inf "
        f"values (of {x.numel()}); quantize finite tensors only (find the source with arch.check_finite(model))")


def round_to_element(v: Tensor, element: Element | str) -> Tensor:
    """Round float32 ``v`` (in units of the scale) to the element grid: nearest, ties to even, saturating at
    +-max_normal, subnormals kept. Same shape as ``v``."""
    el = ELEMENTS[element] if isinstance(element, str) else element
    a = v.abs().clamp_max(el.max_normal)  # max_normal is on the grid and rounding is monotone: clamp first is exact
    if el.kind == "fp":
        exponent = floor_log2(a).clamp_min(el.emin)  # below the normal range the step stays 2^(emin - mbits)
        step = pow2(exponent - el.mbits)
    else:
        step = el.step
    return torch.copysign(torch.round(a / step) * step, v)  # torch.round rounds half to even


def scale_from_amax(amax: Tensor, fmt: Format) -> Tensor:
    """Scale of each block from its largest magnitude ``amax`` (float32, any shape)."""
    if fmt.family == "mx":
        # OCP MX: 2^(floor(log2 amax) - emax_elem), the E8M0 exponent clamped to [-127, 127]; a zero block gets the
        # smallest scale (its elements are zero whatever the scale).
        exponent = torch.where(amax > 0, floor_log2(amax) - fmt.emax_elem, E8M0_MIN)
        return pow2(exponent.clamp(E8M0_MIN, E8M0_MAX))
    if fmt.family in ("int", "fp8"):
        return amax / fmt.max_normal  # maps max|x| onto the largest element value
    return torch.ones_like(amax)


def resolve_block(fmt: Format, block_size: int | None, length: int) -> int:
    """The block length along the axis: ``block_size``, else the format's default, else the whole axis."""
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise FormatError(f"block_size must be a positive integer (or unset: the format's default), got "
                              f"{block_size!r}")
        return block_size
    return fmt.default_block_size or max(length, 1)


def resolve_axis(x: Tensor, axis: int) -> int:
    nd = max(x.dim(), 1)
    if not isinstance(axis, int) or not -nd <= axis < nd:
        raise FormatError(f"axis {axis!r} is out of range for a tensor of shape {tuple(x.shape)}")
    return axis % nd


def _blocked(xm: Tensor, block: int) -> Tensor:
    """[..., n] -> [..., ceil(n/block), block], the last block padded with zeros."""
    n = xm.shape[-1]
    nb = math.ceil(n / block)
    if nb * block != n:
        xm = torch.nn.functional.pad(xm, (0, nb * block - n))
    return xm.reshape(*xm.shape[:-1], nb, block)


def _single_scale_only(f: Format, what: str) -> None:
    if f.family in ("asym", "nf4", "ggml", "ggml_act", "tensor"):
        raise FormatError(
            f"{what} covers the single-scale formats (MX, int, fp8, float); {f.name} also stores zero points, mins, "
            "second-level or per-tensor scales: use fit_params / quantize_with_params (quantpredict.formats) instead")


def compute_scale(x: Tensor, fmt: str | Format, *, axis: int = -1, block_size: int | None = None) -> Tensor:
    """The scales :func:`fake_quantize` would use, float32 (single-scale formats: MX, int, fp8, float; the others
    are fitted with :func:`quantpredict.formats.fit_params`).

    Same number of dims as ``x``; the ``axis`` dim has size ceil(n / block) (1 for per-channel formats); all ones
    for bf16/fp16. Example: W[:, a:a+B] of shape [out, B] with ``block_size=B`` gives [out, 1].
    """
    f = get_format(fmt)
    _single_scale_only(f, "compute_scale")
    x32 = x.detach().to(torch.float32)
    squeeze = x32.dim() == 0
    x32 = x32.reshape(1) if squeeze else x32
    ax = resolve_axis(x32, axis)
    check_finite(x32, f.name)
    xm = x32.movedim(ax, -1)
    if f.family == "float":
        out = torch.ones(*xm.shape[:-1], 1)
    else:
        amax = _blocked(xm, resolve_block(f, block_size, xm.shape[-1])).abs().amax(-1)
        out = scale_from_amax(amax, f)
    out = out.movedim(-1, ax)
    return out.reshape(()) if squeeze else out


def quantize_with_scale(x: Tensor, fmt: str | Format, scale: Tensor) -> Tensor:
    """``x / scale`` rounded onto the element grid (nearest, ties to even, saturating, subnormals kept), times
    ``scale``. ``scale`` broadcasts against ``x``; a zero scale gives zeros. Same shape and dtype as ``x``.
    Single-scale formats only (see :func:`compute_scale`)."""
    f = get_format(fmt)
    _single_scale_only(f, "quantize_with_scale")
    x32 = x.detach().to(torch.float32)
    if f.family == "float":
        return x.detach().to(_FLOAT_DTYPES[f.name]).to(x.dtype)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x32.device)
    v = x32 / torch.where(s == 0, torch.ones_like(s), s)
    return (round_to_element(v, f.element_format) * s).to(x.dtype)


_FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fake_quantize_scaled(x: Tensor, f: Format, *, axis: int = -1, block_size: int | None = None) -> Tensor:
    """The torch reference of :func:`quantpredict.formats.fake_quantize` for the element (MX, int, fp8) and float
    formats: blocks along ``axis`` share a scale from their absmax. Same shape and dtype as ``x`` (floating point).
    The shipped layouts (asym, nf4, ggml) are :func:`quantpredict.formats.params.fake_quantize_shipped`'s; the
    dispatch between the two is :func:`quantpredict.formats.core.fake_quantize_reference` (kept out of this module
    so that it and :mod:`.params`, which builds on it, do not import each other)."""
    x = x.detach()
    if f.family == "float":
        check_finite(x, f.name)
        return x.to(_FLOAT_DTYPES[f.name]).to(x.dtype)
    x32 = x.to(torch.float32)
    squeeze = x32.dim() == 0
    x32 = x32.reshape(1) if squeeze else x32
    ax = resolve_axis(x32, axis)
    check_finite(x32, f.name)
    if x32.numel() == 0:
        return x.clone()
    xm = x32.movedim(ax, -1)
    n = xm.shape[-1]
    blocks = _blocked(xm, resolve_block(f, block_size, n))
    scale = scale_from_amax(blocks.abs().amax(-1, keepdim=True), f)
    y = quantize_with_scale(blocks, f, scale)
    y = y.reshape(*y.shape[:-2], -1)[..., :n].movedim(-1, ax)
    return (y.reshape(()) if squeeze else y).to(x.dtype)


def expand_scale(scale: Tensor, *, axis: int = -1, block_size: int, length: int) -> Tensor:
    """Repeat each block's scale ``block_size`` times along ``axis`` and cut to ``length``, so that it broadcasts
    against the tensor it came from (for :func:`quantize_with_scale` on several blocks at once)."""
    ax = resolve_axis(scale, axis)
    return scale.repeat_interleave(block_size, dim=ax).narrow(ax, 0, length)
