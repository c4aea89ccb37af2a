"""bitsandbytes NF4 (Dettmers et al., "QLoRA", 2023), with and without double quantization of its absmax scales.

NF4 follows bitsandbytes' ``quantize_4bit(quant_type="nf4")`` (its default torch backend and its CUDA kernel agree on
the steps): each block of ``block_size`` elements (64 by default) keeps its fp32 absmax; an element is normalised as
``s = clamp(x * (1 / absmax), -1, 1)`` in float32 (a multiply by the reciprocal, as both backends do) and stored as
the index of the nearest of the 16 NF4 code values (:data:`~quantpredict.formats.table.NF4_VALUES`); it
dequantizes to ``code[q] * absmax``.

Double quantization (``nf4_dq``, bitsandbytes' ``compress_statistics=True``): the fp32 absmaxes of the whole tensor
(row-major over blocks) have their mean ``offset`` subtracted; the differences are quantized in runs of 256 with
bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``) and one fp32 absmax per run, the same way as
above; an element dequantizes to ``code[q] * (dyn[q2] * absmax2 + offset)``. The NF4 codes are chosen with the
exact fp32 absmax, as bitsandbytes does (it quantizes the absmaxes after the elements).

Where this differs from bitsandbytes (ulp-level, documented so that results are exact and machine-independent):

* *Nearest code.* Ties and near-ties are decided by exact distance to the code values (a tie goes to the lower
  code). bitsandbytes' torch backend takes ``argmin`` of float32 ``|s - code|`` and its CUDA kernel compares with
  float32-rounded midpoints; all three agree except for ``s`` within an ulp of a midpoint.
* *Dynamic map.* bitsandbytes builds it with float32 ``torch.linspace``, whose last bit depends on the CPU's vector
  width; here each value is the float32 nearest to its exact definition ``10^(i-6) * (b_k + b_(k+1)) / 2`` with
  ``b = linspace(0.1, 1, 2^i + 1)`` (i = 0..6), with 0 and 1 added.
* *Mean.* bitsandbytes' float32 ``mean`` depends on the device's reduction order; here it is the float32 nearest to
  the exact mean (a float64 sum).
* *Layout.* Blocks run along ``axis`` within each row (a shorter last block per row); bitsandbytes blocks the
  flattened tensor, which is the same when the row length is a multiple of the block.
* *Zero blocks.* A block whose absmax is 0 stays 0 (bitsandbytes computes ``0 * inf`` there and stores code 0).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from fractions import Fraction

import torch
from torch import Tensor

from quantpredict.formats.exact import lookup_for, nearest_code, nearest_code_thresholds, nearest_float32, rdiv
from quantpredict.formats.table import NF4_VALUES, Format


@functools.lru_cache(maxsize=1)
def dynamic_map() -> tuple[float, ...]:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True, max_exponent_bits=7,
    total_bits=8)``), 256 float32 values, ascending, each the float32 nearest to its exact value."""
    values = [Fraction(0), Fraction(1)]
    for i in range(7):  # exponent 10^(i-6); 2^i fraction values, the midpoints of linspace(0.1, 1, 2^i + 1)
        for k in range(2**i):
            mean = Fraction(1, 10) + Fraction(9, 10) * Fraction(2 * k + 1, 2 ** (i + 1))
            v = Fraction(10) ** (i - 6) * mean
            values += [v, -v]
    return tuple(nearest_float32(v) for v in sorted(values))


@functools.lru_cache(maxsize=4)
def _table(name: str) -> tuple[Tensor, Tensor]:
    values = NF4_VALUES if name == "nf4" else dynamic_map()
    return torch.tensor(values, dtype=torch.float32), nearest_code_thresholds(values)


def _reciprocal(a: Tensor) -> Tensor:
    """``1 / a`` in float32 with 0 for a == 0 (a zero block then normalises to 0 and keeps code 0.0)."""
    return torch.where(a == 0, torch.zeros_like(a), rdiv(1.0, a))


def _normalised(x: Tensor, inv: Tensor) -> Tensor:
    s = (x * inv).clamp_(-1.0, 1.0)
    if bool(torch.isinf(inv).any()):  # absmax below 2^-128: 1/absmax overflows and 0 * inf is NaN; 0 stays 0
        s = torch.nan_to_num_(s, nan=0.0)
    return s


def _quantize_absmax(absmax: Tensor, offset: Tensor, absmax2: Tensor) -> Tensor:
    """bitsandbytes' second level: ``dyn[q2] * absmax2 + offset`` with ``q2`` the nearest dynamic code of
    ``(absmax - offset) / absmax2`` (all float32, same shape)."""
    values, thresholds = _table("dynamic")
    q2 = nearest_code(_normalised(absmax - offset, _reciprocal(absmax2)), thresholds)
    return values[q2] * absmax2 + offset


def second_level(absmax: Tensor, run: int) -> tuple[Tensor, Tensor]:
    """(offset, absmax2) of double quantization for the block absmaxes ``absmax`` [R, nb] (float32): the float32
    nearest to their mean, and per block the max |absmax - offset| over its run of ``run`` consecutive blocks
    (row-major; the last run may be shorter), both [R, nb]."""
    offset = absmax.to(torch.float64).mean().to(torch.float32)
    centred = (absmax - offset).reshape(-1)
    n = centred.numel()
    runs = -(-n // run)
    padded = torch.nn.functional.pad(centred.abs(), (0, runs * run - n))
    per_run = padded.reshape(runs, run).amax(-1)
    absmax2 = per_run.repeat_interleave(run)[:n].reshape(absmax.shape)
    return offset.expand(absmax.shape), absmax2


def fit(blocks: Tensor, fmt: Format, stats: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Parameters of each block of ``blocks`` [R, nb, B] (float32, finite): ``inv`` = 1/absmax (the normaliser)
    and ``absmax`` (the stored scale: the absmax itself, or for nf4_dq its double-quantized value); nf4_dq also
    gives ``offset`` and ``absmax2`` (the second level, per block). All [R, nb, 1].

    ``stats`` (nf4_dq only): ``offset`` and ``absmax2`` [R, nb, 1] to use instead of fitting them on these blocks
    (GPTQ fits them once on the whole weight, then refits each block's absmax as it goes)."""
    absmax = blocks.abs().amax(-1)
    out = {"inv": _reciprocal(absmax).unsqueeze(-1)}
    if not fmt.scale2_block:
        out["absmax"] = absmax.unsqueeze(-1)
        return out
    if stats is None:
        offset, absmax2 = second_level(absmax, fmt.scale2_block)
    else:
        offset, absmax2 = stats["offset"][..., 0], stats["absmax2"][..., 0]
    out["absmax"] = _quantize_absmax(absmax, offset, absmax2).unsqueeze(-1)
    out["offset"] = offset.unsqueeze(-1).clone()
    out["absmax2"] = absmax2.unsqueeze(-1)
    return out


def codes(x: Tensor, fmt: Format, p: Mapping[str, Tensor]) -> Tensor:
    """The NF4 code index (0..15) of each element, int64, x's shape (parameters broadcast against x)."""
    return nearest_code(_normalised(x, p["inv"]), _table("nf4")[1])  # the definition; quantize uses a look-up


@functools.lru_cache(maxsize=1)
def _nf4_lookup():
    return lookup_for(*_table("nf4"))


def quantize(x: Tensor, fmt: Format, p: Mapping[str, Tensor]) -> Tensor:
    """``code[q] * absmax`` elementwise (float32, x's shape)."""
    lut = _nf4_lookup()
    s = _normalised(x, p["inv"])
    values = lut(s) if lut is not None else _table("nf4")[0][nearest_code(s, _table("nf4")[1])]
    return values.mul_(p["absmax"])
