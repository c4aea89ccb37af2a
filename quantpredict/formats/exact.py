"""Float32 building blocks that reproduce C reference code bit for bit.

The shipped formats are defined by reference code in C (llama.cpp) or torch (bitsandbytes, AutoGPTQ) that computes in
float32 and stores scales in fp16. Torch's elementwise float32 add, sub, mul and div are correctly rounded IEEE
operations, so the same sequence of ops gives the same bits (its ``sqrt`` is not: see :func:`sqrt`); these helpers
cover what has no direct torch equivalent.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from quantpredict.errors import FormatError

FP16_MAX = 65504.0
_MAGIC = 12582912.0  # 1.5 * 2^23


def rdiv(c: float, t: Tensor) -> Tensor:
    """``c / t`` as a true float32 division (same shape as ``t``). Python's ``c / t`` on a tensor is computed as
    ``t.reciprocal() * c``, which differs from ``c / t`` in the last bit for about a quarter of inputs."""
    return torch.tensor(c, dtype=t.dtype, device=t.device) / t


def sqrt(v: Tensor) -> Tensor:
    """Correctly rounded float32 square root (same shape). ``torch.sqrt`` on CPU is not: it misses the correctly
    rounded result in about 17% of float32 inputs (and ~1% of float64 ones) with this torch build, while C's
    ``sqrtf`` and numpy's are IEEE-exact."""
    return torch.from_numpy(np.sqrt(v.detach().to(torch.float32).cpu().numpy())).to(v.device)


def nearest_int(v: Tensor) -> Tensor:
    """llama.cpp's ``nearest_int``: ``bits(v + 1.5*2^23) & 0x7fffff) - 0x400000`` as int32 (same shape).

    For |v| < 2^22 this is round-half-to-even; beyond that it returns the same (meaningless) integer as the C code,
    whose assert is compiled out in release builds, so that out-of-range intermediate values clamp identically.
    """
    bits = (v.to(torch.float32) + _MAGIC).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def to_fp16(v: Tensor, what: str, fmt: str) -> Tensor:
    """float32 ``v`` rounded to fp16 (nearest, ties to even, subnormals kept) and back to float32, as a stored fp16
    scale. A :class:`FormatError` naming ``what`` if a finite value overflows fp16."""
    h = v.to(torch.float16).to(torch.float32)
    bad = ~torch.isfinite(h)  # the input is finite: a non-finite scale means a value overflowed on the way
    if bool(bad.any()):
        worst = float(v[bad].abs().max())
        raise FormatError(
            f"cannot quantize to {fmt!r}: a {what} of {worst:.6g} does not fit the format's fp16 storage (max "
            f"{FP16_MAX:g}); scale the tensor down before quantizing (its values are too large for this layout)")
    return h


def floor_float32(v: float) -> float:
    """The largest float32 that is <= ``v`` (a Python float)."""
    t = np.float32(v)
    if float(t) > v:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


def nearest_float32(fr: Fraction) -> float:
    """The float32 nearest to the exact rational ``fr`` (ties to even), with no double rounding."""
    t = np.float32(float(fr))
    cands = [np.nextafter(t, np.float32(-np.inf)), t, np.nextafter(t, np.float32(np.inf))]
    dist = [abs(Fraction(float(c)) - fr) for c in cands]
    best = min(dist)
    ties = [c for c, d in zip(cands, dist) if d == best]
    return float(min(ties, key=lambda c: int(np.array(c).view(np.uint32)) & 1))


def nearest_code_thresholds(values: Sequence[float]) -> Tensor:
    """float32 thresholds for :func:`nearest_code` over ascending float32 ``values``: the largest float32 at or
    below each exact midpoint (so ``s > t`` iff ``s`` lies strictly above the midpoint, for float32 ``s``)."""
    mids = [(values[i] + values[i + 1]) / 2 for i in range(len(values) - 1)]  # exact in float64
    return torch.tensor([floor_float32(m) for m in mids], dtype=torch.float32)


def nearest_code(s: Tensor, thresholds: Tensor) -> Tensor:
    """Index of the code value nearest to each float32 ``s`` (exact distances; a tie goes to the lower code), int64,
    same shape."""
    return torch.bucketize(s.contiguous(), thresholds, right=False)


LUT_SCALE = 1 << 15  # buckets of width 2^-15 over [-1, 1] for ValueLookup: an exact power-of-two multiply
_TWO23 = 8388608.0


class ValueLookup:
    """The code value nearest to each ``s`` in [-1, 1] by one table look-up (``torch.bucketize`` costs ~50 ns an
    element, a gather ~6).

    Bucket ``k = round((s + 1) * 2^15)`` (read off the bits of ``(s + 1) * 2^15 + 2^23``, no float-to-int pass)
    covers ``[(k - 1/2) / 2^15 - 1, (k + 1/2) / 2^15 - 1)``. A bucket without a threshold maps to its single nearest
    code value; one holding a threshold is marked NaN and its (rare, ~0.02%) elements are decided exactly by
    :func:`nearest_code`. The computed bucket can differ from the exact one only within 2^-9 of a bucket's width
    from an edge, which gives the same value as long as no threshold lies that close to an edge (checked,
    :func:`lookup_for`)."""

    def __init__(self, values: Tensor, thresholds: Tensor) -> None:
        k = torch.arange(2 * LUT_SCALE + 1, dtype=torch.float64)
        starts, ends = (k - 0.5) / LUT_SCALE - 1.0, (k + 0.5) / LUT_SCALE - 1.0
        t = thresholds.to(torch.float64)
        first = torch.bucketize(starts, t)  # the code of a bucket's start: thresholds below it
        last = torch.bucketize(ends, t)
        table = values.to(torch.float32)[first].clone()
        table[first != last] = float("nan")
        self.table = table
        self.values, self.thresholds = values, thresholds
        pos = (t + 1.0) * LUT_SCALE
        self.ok = bool(((pos - pos.floor() - 0.5).abs() > 2.0**-8).all())

    def __call__(self, s: Tensor) -> Tensor:
        s = s.contiguous()
        k = (s + 1.0).mul_(LUT_SCALE).add_(_TWO23).view(torch.int32).bitwise_and_(0x007FFFFF)
        y = torch.index_select(self.table, 0, k.view(-1)).view(s.shape)
        odd = torch.isnan(y).view(-1).nonzero().squeeze(1)  # the elements of buckets that hold a threshold
        if odd.numel():
            y.view(-1)[odd] = self.values[nearest_code(s.view(-1)[odd], self.thresholds)]
        return y


def lookup_for(values: Tensor, thresholds: Tensor) -> ValueLookup | None:
    """A :class:`ValueLookup` for ascending code ``values`` in [-1, 1] when its condition holds, else None (use
    :func:`nearest_code`)."""
    if float(values.abs().max()) > 1.0:
        return None
    lut = ValueLookup(values, thresholds)
    return lut if lut.ok else None
