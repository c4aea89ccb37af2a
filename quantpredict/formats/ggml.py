"""llama.cpp's Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and IQ4_NL / IQ4_XS,
reproducing its reference quantizers bit for bit.

The quantizers are ``quantize_row_q8_0_ref``, ``quantize_row_q5_0_ref``, ``quantize_row_q5_1_ref``,
``quantize_row_q4_0_ref``, ``quantize_row_q4_1_ref``, ``quantize_row_q2_K_ref``, ``quantize_row_q3_K_ref``,
``quantize_row_q4_K_ref``, ``quantize_row_q5_K_ref`` and ``quantize_row_q6_K_ref`` of ggml/src/ggml-quants.c: what
``llama-quantize`` runs for these types without an importance matrix (``quantize_q4_K`` etc. call the ``_ref``
functions when ``quant_weights`` is NULL), and for IQ4_NL / IQ4_XS ``quantize_iq4_nl`` / ``quantize_iq4_xs`` with
``quant_weights`` NULL, which run ``quantize_row_iq4_nl_impl`` with ``ntry = 7`` (what llama-quantize calls; the
``quantize_row_iq4_nl_ref`` entry point passes ``ntry = -1`` and differs). Every float
operation of the C source is done in the same order in float32 (torch's elementwise ops are correctly rounded, like
the C code's), sums over a sub-block are accumulated sequentially as the C loops do, ``nearest_int`` is its
magic-number rounding, and scales are rounded to fp16 as ``GGML_FP32_TO_FP16`` does (nearest, ties to even).

* **Q8_0** (blocks of 32): ``d = amax / 127``, ``q = roundf(x * (1/d))``, stored fp16 ``d``; value ``q * d``.
* **Q5_0** (blocks of 32): ``d = max / -16`` with ``max`` the block's value of largest magnitude (the first one),
  ``q = min(31, (int8_t)(x * (1/d) + 16.5))``, stored fp16 ``d``; value ``(q - 16) * d``.
* **Q5_1** (blocks of 32): ``d = (max - min) / 31``, ``q = (uint8_t)((x - min) * (1/d) + 0.5)``, stored fp16 ``d``
  and ``m = min``; value ``d * q + m``. Q5_0 and Q5_1 are llama.cpp's replacement types for a Q4_K or Q5_K tensor
  whose rows are not a multiple of 256 (see :data:`quantpredict.formats.table.GGML_FALLBACK`).
* **Q4_0 / Q4_1** (blocks of 32): Q5_0 and Q5_1 with 4-bit codes: ``d = max / -8``, ``q = min(15, (int8_t)(x *
  (1/d) + 8.5))``, value ``(q - 8) * d``; and ``d = (max - min) / 15``, ``q = min(15, (int8_t)((x - min) * (1/d) +
  0.5))``, value ``d * q + m``.
* **Q4_K / Q5_K** (super-blocks of 256 = 8 sub-blocks of 32): each sub-block's scale and min come from
  ``make_qkx2_quants`` (weights ``sqrt(mean x^2) + |x|``, a search over ``nstep + 1`` candidate scales, 21 for Q4_K
  and 16 for Q5_K, each refined by weighted least squares, keeping the lowest weighted squared error; as in the C
  code each candidate is scored from the best min found so far); the 8 scales and mins are quantized to 6 bits
  against fp16 super-block scales ``d = max_scale / 63`` and ``dmin = max_min / 63``; each element is then
  ``l = clamp(nearest_int((x + dm) / d), 0, nmax)`` with ``d = d * sc``, ``dm = dmin * m`` of its sub-block, and
  dequantizes to ``d * l - dm``.
* **Q6_K** (super-blocks of 256 = 16 sub-blocks of 16): each sub-block's signed scale from ``make_qx_quants(16, 32,
  rmse_type=1)`` (19 candidate scales, weights x^2, kept if they raise ``sumlx^2 / suml2``); 8-bit signed sub-block
  scales against an fp16 ``d = -max_scale / 128``; ``l = clamp(nearest_int(x / (d * sc)), -32, 31)``; value
  ``d * sc * l``.
* **Q3_K** (super-blocks of 256 = 16 sub-blocks of 16): each sub-block's signed scale from ``make_q3_quants(16, 4,
  do_rmse=true)`` (codes ``clamp(nearest_int(-4 x / max), -4, 3)``, then up to 5 passes of coordinate descent, one
  code at a time, on ``sum(w x l)^2 / sum(w l^2)`` with weights x^2; scale ``sumlx / suml2``); 6-bit signed
  sub-block scales against an fp16 ``d = -max_scale / 32`` (``max_scale`` the first of largest magnitude);
  ``l = clamp(nearest_int(x / (d * sc)), -4, 3)``; value ``d * sc * l``.
* **Q2_K** (super-blocks of 256 = 16 sub-blocks of 16): ``make_qkx2_quants(16, 3, weights |x|, rmin -0.5, rdelta
  0.1, nstep 15, use_mad=true)`` (the Q4_K search with absolute instead of squared errors); 4-bit scales and mins
  against fp16 ``d = max_scale / 15``, ``dmin = max_min / 15``; ``l = clamp(nearest_int((x + dm) / d), 0, 3)``;
  value ``d * l - dm``.
* **IQ4_NL** (blocks of 32) / **IQ4_XS** (super-blocks of 256 = 8 blocks of 32): codes index the 16 values of
  ``kvalues_iq4nl`` (-127 .. 113), chosen by ``best_index_int8`` (the nearer table value by float32 distances, the
  upper on a tie). Each block's scale: start at ``d = -max / -127``, least squares ``sum(w q x) / sum(w q^2)``
  (weights x^2) on the codes of ``x / d``, then the codes of ``(t - 127) / max * x`` for ``t = -7..7``, kept where
  they raise ``sumqx^2 / sumq2``. IQ4_NL stores that fp16 scale and the codes of ``x / d`` (float32 ``d``); IQ4_XS
  quantizes the 8 block scales to 6-bit ``l`` against ``d = -max_scale / 32`` (stored fp16) and codes each block by
  ``x / (d * l)`` with the float32 ``d``. Value ``d * kvalue`` (IQ4_NL), ``fp16(d) * l * kvalue`` (IQ4_XS).

The output of :func:`quantize` is the dequantization of those codes with the arithmetic of gguf-py's (and
llama.cpp's) dequantizers, so it matches ``gguf.quants.dequantize`` of the packed bytes bit for bit
(:func:`to_gguf_bytes` packs them).

Checked against llama.cpp's own ``quantize_row_*_ref`` (ggml-quants.c as vendored by llama-cpp-python 0.3.36,
compiled with ``-O3 -ffp-contract=off``, 4M normal values with per-row scales): identical bytes in every block, for
Q8_0, Q4_K, Q5_K and Q6_K. The optional test ``test_llama_cpp_reference`` (tests/ggml_oracle.py builds
ggml-quants.c from that sdist with ``-O2 -ffp-contract=off``) repeats this for every type here on 1M normal values
with per-row scales and the edge cases of the tests: identical bytes in every block. Q5_0, Q5_1, Q4_0 and Q4_1 are
also checked against gguf-py's quantizers, which implement the same reference functions (identical bytes), and
every type against a float64 re-implementation in the tests. Where a sub-block's ``d * sc`` is 0, llama.cpp keeps
the codes of the scale search (``if (!d) continue``); they are kept here too for Q2_K, Q3_K and Q6_K (so the bytes
match), and are 0 for Q4_K/Q5_K, whose native search returns no codes (the values are the same either way). Deviation:
llama.cpp's usual builds compile ggml-quants.c with FMA contraction (GCC's default ``-ffp-contract=fast`` with
``-march=native``), which fuses some multiply-adds of the search; against such a build
2.0% (Q4_K), 11% (Q5_K), 0.07% (Q6_K) and 0% (Q8_0) of the values differ, by a code step where the search picks a
neighbouring scale, with the relative MSE within 0.1% (not measured for the types added later). The un-fused float32
semantics of the source are followed here, as they are machine-independent. The searches of Q2_K and the IQ4 types
run in torch only (the C kernel of :mod:`~quantpredict.formats.native` covers Q3_K/Q4_K/Q5_K/Q6_K; ``use_native``
changes nothing for them). Rows must be a multiple of the block (llama.cpp's rule): a :class:`FormatError`
otherwise (naming llama.cpp's fallback type for that tensor).

With an importance matrix (llama-quantize ``--imatrix``) llama.cpp runs other searches: :mod:`.ggml_imatrix`
(:func:`~quantpredict.formats.ggml_imatrix.to_gguf_bytes` with ``imatrix``,
:func:`~quantpredict.formats.ggml_imatrix.fake_quantize_weighted`), which reuses the searches here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from quantpredict.formats import native
from quantpredict.formats.exact import nearest_int, rdiv, sqrt, to_fp16
from quantpredict.formats.table import IQ4NL_VALUES, Format

GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml-quants.c: below this a group is "all zero"
# make_qkx2_quants arguments of the reference quantizers, {type: (nmax, rmin, rdelta, nstep)}: the C kernel's table
KX2 = native.KX2_SETTINGS
CHUNK = 1 << 13  # sub-blocks per pass of the vectorised search: 8192 x 32 floats = 1 MB a tensor, cache-sized


def _f32(v: float) -> float:
    return float(np.float32(v))


def _seq_sum(terms: Tensor) -> Tensor:
    """Sum of ``terms`` [n, ...] over the first dim, accumulated in float32 in index order (as a C loop does)."""
    acc = terms[0].clone()
    for i in range(1, terms.shape[0]):
        acc += terms[i]
    return acc


# ------------------------------------------------------------------------------------------------------- Q8_0


def _fit_q8_0(blocks: Tensor, fmt: Format) -> dict[str, Tensor]:
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d != 0, rdiv(1.0, d), torch.zeros_like(d))
    return {"inv": inv, "d": to_fp16(d, "block scale (max|x| / 127)", fmt.name)}


def _codes_q8_0(x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
    """C ``roundf(x * id)`` (halves away from zero, exact: ``a - floor(a)`` is exact in float32), as float codes with
    +0 for 0, clamped to +-127 for values beyond the fitted block (GPTQ)."""
    v = x * p["inv"]
    a = v.abs()
    q = torch.floor(a)
    q.add_(a.sub_(q).ge_(0.5))
    return q.copysign_(v).clamp_(-127.0, 127.0).add_(0.0)


# ---------------------------------------------------------------------------------------- Q4_0 / Q4_1 / Q5_0 / Q5_1


def _fit_sym(half: int):
    """Q4_0 (``half`` 8) / Q5_0 (16): ``d = max / -half`` with ``max`` the block's first value of largest |x|."""

    def fit_(blocks: Tensor, fmt: Format) -> dict[str, Tensor]:
        where = blocks.abs().argmax(-1, keepdim=True)  # the first largest |x|, as the C loop's strict '<'
        big = blocks.gather(-1, where)
        # a block of zeros: the C loop never updates its initial max = +0 (argmax would give its first zero, maybe
        # -0: d = +0 where llama.cpp stores -0)
        big = torch.where(big == 0, torch.zeros_like(big), big)
        d = big / float(-half)
        inv = torch.where(d != 0, rdiv(1.0, d), torch.zeros_like(d))
        return {"inv": inv, "d": to_fp16(d, f"block scale (max / -{half})", fmt.name)}

    return fit_


def _codes_sym(half: int):
    """C ``MIN(2*half - 1, (int8_t)(x * id + half + 0.5f))`` (truncation), clamped at 0 too for values beyond the
    fitted block (GPTQ)."""

    def codes_(x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        v = x * p["inv"]
        v.add_(half + 0.5)
        return v.trunc_().clamp_(0.0, 2 * half - 1.0).add_(0.0)

    return codes_


def _fit_min(top: int):
    """Q4_1 (``top`` 15) / Q5_1 (31): ``d = (max - min) / top``, fp16 ``d`` and ``m = min``."""

    def fit_(blocks: Tensor, fmt: Format) -> dict[str, Tensor]:
        lo = blocks.amin(-1, keepdim=True)
        hi = blocks.amax(-1, keepdim=True)
        d = (hi - lo) / float(top)
        inv = torch.where(d != 0, rdiv(1.0, d), torch.zeros_like(d))
        return {"inv": inv, "min": lo, "d": to_fp16(d, f"block scale ((max - min) / {top})", fmt.name),
                "m": to_fp16(lo, "block min", fmt.name)}

    return fit_


def _codes_min(top: int):
    """C ``MIN(top, (int8_t)((x - min) * id + 0.5f))`` (truncation), clamped to 0..top for values beyond the
    fitted block."""

    def codes_(x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        v = x - p["min"]
        v.mul_(p["inv"]).add_(0.5)
        return v.trunc_().clamp_(0.0, float(top)).add_(0.0)

    return codes_


# ------------------------------------------------------------------------------------------------ Q4_K / Q5_K


def _levels(x: Tensor, shift: Tensor, iscale: Tensor, lo: int, hi: int) -> Tensor:
    """``clamp(nearest_int(iscale * (x - shift)), lo, hi)`` as float32 ([n, M] with per-column shift and iscale)."""
    v = x - shift
    v.mul_(iscale)
    return nearest_int(v).clamp_(lo, hi).to(torch.float32)


def _weighted_error(x: Tensor, w: Tensor, lv: Tensor, scale: Tensor, shift: Tensor, mad: bool = False) -> Tensor:
    """Sequential float32 sum over positions of ``w * ((scale * l + shift) - x)^2`` (``w * |...|`` with ``mad``)
    ([n, M] -> [M])."""
    diff = lv * scale
    diff.add_(shift).sub_(x)
    if mad:
        diff.abs_().mul_(w)
    else:
        diff.mul_(diff).mul_(w)
    return _seq_sum(diff)


def _qkx2_chunk(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                mad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad)`` on sub-blocks ``x`` [n, M]
    (position-major) with weights ``w`` [n, M]: (scale, the_min, the codes L it leaves [n, M]), each [M]."""
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    mn = x.amin(0)
    mx = x.amax(0)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn  # C: L = 0, the_min = -min, scale 0
    iscale = rdiv(float(nmax), mx - mn)
    scale = rdiv(1.0, iscale)
    codes = _levels(x, mn, iscale, 0, nmax)
    best = _weighted_error(x, w, codes, scale, mn, mad)
    terms = torch.empty(x.shape[0], 3, x.shape[1])  # per position: w*l, w*l*l, w*l*x
    for step in range(nstep + 1):
        num = _f32(_f32(rmin + _f32(_f32(rdelta) * step)) + nmax)  # (rmin + rdelta*is + nmax) in float32
        lv = _levels(x, mn, rdiv(num, mx - mn), 0, nmax)
        wl = torch.mul(w, lv, out=terms[:, 0])
        torch.mul(wl, lv, out=terms[:, 1])
        torch.mul(wl, x, out=terms[:, 2])
        sums = _seq_sum(terms)  # [3, M]: sum_l, sum_l2, sum_xl
        sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        cur = _weighted_error(x, w, lv, this_scale, this_min, mad)
        better = (det > 0) & (cur < best) & ~flat
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
        codes = torch.where(better, lv, codes)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    return scale, -mn, codes


def _kx2_weights(x: Tensor) -> Tensor:
    """Q4_K/Q5_K's weights of a sub-block of 32 [32, M]: ``sqrtf(sum_x2 / 32) + fabsf(x)``."""
    av_x = sqrt(_seq_sum(x * x) / 32.0)
    return x.abs().add_(av_x)


def _fit_kx2(blocks: Tensor, fmt: Format, use_native: bool) -> dict[str, Tensor]:
    nmax, rmin, rdelta, nstep = KX2[fmt.name]
    sub = blocks.reshape(-1, 32)  # [M, 32]: sub-blocks in order, 8 per super-block
    found = native.kx2_search(sub, nmax, _f32(rmin), _f32(rdelta), nstep) if use_native else None
    if found is not None:
        scales, mins, fallback = found
    else:
        scales, mins, fallback = torch.empty(sub.shape[0]), torch.empty(sub.shape[0]), torch.empty_like(sub)
        for a in range(0, sub.shape[0], CHUNK):
            xt = sub[a : a + CHUNK].t().contiguous()
            s, m, c = _qkx2_chunk(xt, _kx2_weights(xt), nmax, rmin, rdelta, nstep)
            scales[a : a + CHUNK], mins[a : a + CHUNK], fallback[a : a + CHUNK] = s, m, c.t()
    scales = scales.reshape(-1, 8)
    mins = mins.reshape(-1, 8)
    zero = torch.zeros(())
    # C: max_scale/max_min start at 0 and take any larger value
    max_scale = torch.maximum(scales.amax(-1, keepdim=True), zero)
    max_min = torch.maximum(mins.amax(-1, keepdim=True), zero)
    inv_scale = torch.where(max_scale > 0, rdiv(63.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, rdiv(63.0, max_min), zero)
    # uint8_t ls = nearest_int(...); ls = MIN(63, ls): the conversion to uint8_t wraps negative values
    ls = torch.clamp_max(nearest_int(inv_scale * scales) & 0xFF, 63).to(torch.float32)
    lm = torch.clamp_max(nearest_int(inv_min * mins) & 0xFF, 63).to(torch.float32)
    d16 = to_fp16(max_scale / 63.0, "super-block scale (max sub-block scale / 63)", fmt.name)
    dmin16 = to_fp16(max_min / 63.0, "super-block min scale (max sub-block min / 63)", fmt.name)
    # per sub-block [S, 8, 1]: the d * sc and dmin * m every element of the sub-block is rounded with; per element
    # [S, 8, 32]: the codes the search left, which llama.cpp keeps where d * sc is 0
    return {"d": (d16 * ls).unsqueeze(-1), "dm": (dmin16 * lm).unsqueeze(-1), "d16": d16, "dmin16": dmin16,
            "sc": ls, "m": lm, "fallback": fallback.reshape(-1, 8, 32)}


def _rounded(v: Tensor, lo: int, hi: int) -> Tensor:
    """``clamp(nearest_int(v), lo, hi)`` as float32 (+0 for 0, as an int converted to float), in place in ``v``'s
    storage where possible."""
    lo_v, hi_v = torch.aminmax(v)
    if max(-float(lo_v), float(hi_v)) < 4194304.0:  # nearest_int is round-half-even below 2^22
        return v.round_().clamp_(lo, hi).add_(0.0)
    return nearest_int(v).clamp_(lo, hi).to(torch.float32)


# ------------------------------------------------------------------------------------------------------- Q6_K


def _qx_chunk(x: Tensor) -> tuple[Tensor, Tensor]:
    """``make_qx_quants(16, 32, x, L, rmse_type=1, NULL)`` on sub-blocks ``x`` [16, M] (position-major):
    (scale [M], the codes L - 32 it leaves [16, M])."""
    return qx_search(x, x * x, 32)


def qx_search(x: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` on groups ``x`` [n, M] (position-major) with weights ``w``
    [n, M] (``qw``, or ``x * x`` for qw NULL): (scale [M], the codes L - nmax it leaves [n, M], in -nmax..nmax-1)."""
    amax, where_max = x.abs().max(0)  # first index of the largest |x|, as the C loop's strict '>'
    big = x.gather(0, where_max.unsqueeze(0))[0]
    zero_sub = amax < GROUP_MAX_EPS
    wx = w * x
    no_shift = torch.zeros(())
    terms = torch.empty(x.shape[0], 2, x.shape[1])  # per position: w*x*l, w*l*l

    def attempt(step: int) -> tuple[Tensor, Tensor, Tensor]:
        num = -_f32(nmax + _f32(_f32(0.1) * step))  # -(nmax + 0.1f*is); the initial iscale is -nmax/max (is = 0)
        lv = _levels(x, no_shift, rdiv(num, big), -nmax, nmax - 1)
        torch.mul(wx, lv, out=terms[:, 0])
        torch.mul(w, lv, out=terms[:, 1]).mul_(lv)
        sums = _seq_sum(terms)
        return lv, sums[0], sums[1]

    codes, sumlx, suml2 = attempt(0)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in [*range(-9, 0), *range(1, 10)]:
        lv, sumlx, suml2 = attempt(step)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
        codes = torch.where(better, lv, codes)
    scale = torch.where(zero_sub, torch.zeros_like(scale), scale)
    codes = torch.where(zero_sub, torch.full_like(codes, -nmax), codes)  # C: L = 0, i.e. code -nmax
    return scale, codes


def _fit_q6_k(blocks: Tensor, fmt: Format, use_native: bool) -> dict[str, Tensor]:
    sub = blocks.reshape(-1, 16)  # [M, 16]
    found = native.qx_search(sub) if use_native else None
    if found is not None:
        scales, fallback = found
    else:
        scales, fallback = _chunked(sub, _qx_chunk)
    return q6_k_params(scales, fallback, fmt)


def q6_k_params(scales: Tensor, fallback: Tensor, fmt: Format) -> dict[str, Tensor]:
    """Q6_K's super-block scale and 8-bit sub-block scales from the searched sub-block ``scales`` [M] (and the codes
    ``fallback`` [M, 16] the search left), M = 16 per super-block."""
    scales = scales.reshape(-1, 16)
    max_abs, where_max = scales.abs().max(-1, keepdim=True)
    max_scale = scales.gather(-1, where_max)
    zero_block = max_abs < GROUP_MAX_EPS  # C: the whole block is stored as zeros (d = 0, scales 0, L = 0)
    iscale = torch.where(zero_block, torch.ones_like(max_scale), rdiv(-128.0, max_scale))
    d16 = to_fp16(torch.where(zero_block, torch.zeros_like(iscale), rdiv(1.0, iscale)),
                  "super-block scale (max sub-block scale / 128)", fmt.name)
    sc = torch.clamp_max(nearest_int(iscale * scales), 127).to(torch.float32)
    sc = torch.where(zero_block, torch.zeros_like(sc), sc)
    fallback = fallback.reshape(-1, 16, 16)
    if bool(zero_block.any()):
        fallback = torch.where(zero_block[..., None], torch.full_like(fallback, -32.0), fallback)
    # per sub-block [S, 16, 1]: d * sc; per element [S, 16, 16]: the codes left where that is 0
    return {"d": (d16 * sc).unsqueeze(-1), "fallback": fallback, "d16": d16, "sc": sc}


# ------------------------------------------------------------------------------------------------------- Q3_K


def _q3_chunk(x: Tensor) -> tuple[Tensor, Tensor]:
    """``make_q3_quants(16, 4, x, L, do_rmse=true)`` on sub-blocks ``x`` [16, M] (position-major): (scale [M], the
    codes L - 4 it leaves [16, M]). The C code's up to 5 passes of coordinate descent stop early once a pass changes
    nothing; a further pass over an unchanged state changes nothing either, so all 5 run here."""
    nmax = 4
    amax, where_max = x.abs().max(0)  # first index of the largest |x|, as the C loop's strict '>'
    big = x.gather(0, where_max.unsqueeze(0))[0]
    zero_sub = amax < GROUP_MAX_EPS
    codes = _levels(x, torch.zeros(()), rdiv(float(-nmax), big), -nmax, nmax - 1)  # iscale = -nmax / max
    w = x * x
    wx = w * x
    sumlx = _seq_sum(wx * codes)  # w*x[i]*l
    suml2 = _seq_sum(w * codes * codes)  # w*l*l
    for _ in range(5):
        for i in range(x.shape[0]):
            li = codes[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = nearest_int(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1).to(torch.float32)
            slx_new = slx + wx[i] * new_l
            sl2_new = sl2 + w[i] * new_l * new_l
            take = ((slx > 0) & (new_l != li) & (sl2_new > 0)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            codes[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(zero_sub, torch.zeros_like(scale), scale)
    codes = torch.where(zero_sub, torch.full_like(codes, -nmax), codes)  # C: L = 0, i.e. code -4
    return scale, codes


def _int8(v: Tensor) -> Tensor:
    """An int converted to C's ``int8_t`` (wrapping)."""
    return ((v + 128) & 0xFF) - 128


def _chunked(sub: Tensor, search: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """A sub-block scale search over ``sub`` [M, 16] in chunks of CHUNK sub-blocks (``search`` takes them transposed,
    [16, chunk], and returns their scales [chunk] and codes [16, chunk]): scales [M] and codes [M, 16]."""
    scales, codes = torch.empty(sub.shape[0]), torch.empty_like(sub)
    for a in range(0, sub.shape[0], CHUNK):
        s, c = search(sub[a : a + CHUNK].t().contiguous())
        scales[a : a + CHUNK] = s
        codes[a : a + CHUNK] = c.t()
    return scales, codes


def _fit_q3_k(blocks: Tensor, fmt: Format, use_native: bool) -> dict[str, Tensor]:
    sub = blocks.reshape(-1, 16)  # [M, 16]
    found = native.q3_search(sub) if use_native else None
    scales, fallback = found if found is not None else _chunked(sub, _q3_chunk)
    scales = scales.reshape(-1, 16)
    _, where_max = scales.abs().max(-1, keepdim=True)  # the first largest |scale|, with its sign
    max_scale = scales.gather(-1, where_max)
    some = max_scale != 0  # C: if (max_scale); else d = 0 and every 6-bit scale 0 (sub-block scale 0 - 32)
    iscale = torch.where(some, rdiv(-32.0, max_scale), torch.ones_like(max_scale))
    sc = _int8(nearest_int(iscale * scales)).clamp_(-32, 31).to(torch.float32)  # int8_t l = nearest_int(...)
    sc = torch.where(some, sc, torch.full_like(sc, -32.0))
    d16 = to_fp16(torch.where(some, rdiv(1.0, iscale), torch.zeros_like(iscale)),
                  "super-block scale (max sub-block scale / 32)", fmt.name)
    # per sub-block [S, 16, 1]: d * sc (gguf-py's dl); per element [S, 16, 16]: the codes left where that is 0
    return {"d": (d16 * sc).unsqueeze(-1), "fallback": fallback.reshape(-1, 16, 16), "d16": d16, "sc": sc}


def _codes_with_fallback(lo: int, hi: int):
    """``clamp(nearest_int(x / d), lo, hi)`` (Q3_K, Q6_K) or, with a ``dm`` parameter, ``clamp(nearest_int((x + dm)
    / d), lo, hi)`` (Q2_K, Q4_K, Q5_K); where ``d`` (d * sc) is 0 (a sub-block scale that rounds to 0 beside a much
    larger one) the codes the search left (C: ``if (!d) continue``). The value is then +-0, or ``-dm``, whatever
    the code, but the file stores the code."""

    def codes_(x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        d = p["d"]
        dead = d == 0
        v = x / d if "dm" not in p else (x + p["dm"]).div_(d)
        if bool(dead.any()):
            v.masked_fill_(dead.expand_as(v), 0.0)
            return torch.where(dead, p["fallback"], _rounded(v, lo, hi))
        return _rounded(v, lo, hi)

    return codes_


# ------------------------------------------------------------------------------------------------------- Q2_K


def _fit_q2_k(blocks: Tensor, fmt: Format, use_native: bool) -> dict[str, Tensor]:
    sub = blocks.reshape(-1, 16)  # [M, 16]
    scales, mins, fallback = torch.empty(sub.shape[0]), torch.empty(sub.shape[0]), torch.empty_like(sub)
    for a in range(0, sub.shape[0], CHUNK):
        xt = sub[a : a + CHUNK].t().contiguous()
        s, m, c = _qkx2_chunk(xt, xt.abs(), 3, -0.5, 0.1, 15, mad=True)  # weights |x|, use_mad
        scales[a : a + CHUNK], mins[a : a + CHUNK], fallback[a : a + CHUNK] = s, m, c.t()
    scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
    zero = torch.zeros(())
    max_scale = torch.maximum(scales.amax(-1, keepdim=True), zero)  # C: start at 0, take any larger value
    max_min = torch.maximum(mins.amax(-1, keepdim=True), zero)
    inv_scale = torch.where(max_scale > 0, rdiv(15.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, rdiv(15.0, max_min), zero)
    # y.scales[j] = l (uint8_t: wraps); then |= l_min << 4 (truncated to the byte); the dequantizer reads the low
    # and high nibbles
    byte = (nearest_int(inv_scale * scales) & 0xFF) | ((nearest_int(inv_min * mins) << 4) & 0xFF)
    byte = torch.where(max_scale > 0, byte, byte & 0xF0)
    sc = (byte & 0xF).to(torch.float32)
    m = (byte >> 4).to(torch.float32)
    d16 = to_fp16(max_scale / 15.0, "super-block scale (max sub-block scale / 15)", fmt.name)
    dmin16 = to_fp16(max_min / 15.0, "super-block min scale (max sub-block min / 15)", fmt.name)
    return {"d": (d16 * sc).unsqueeze(-1), "dm": (dmin16 * m).unsqueeze(-1), "fallback": fallback.reshape(-1, 16, 16),
            "d16": d16, "dmin16": dmin16, "sc": sc, "m": m}


# ------------------------------------------------------------------------------------------------ IQ4_NL / IQ4_XS

KVALUES_IQ4NL = torch.tensor(IQ4NL_VALUES, dtype=torch.float32)  # kvalues_iq4nl (ggml-common.h), ascending
NTRY_IQ4 = 7  # quantize_iq4_nl / quantize_iq4_xs pass ntry = 7 to quantize_row_iq4_nl_impl


def _midpoint_table() -> tuple[int, Tensor]:
    """``(lo, T)`` with ``T[j - lo]`` = best_index_int8 of every ``al`` in ``[j/2, (j+1)/2)`` (``j = floor(2 al)``).

    Every midpoint ``(v_k + v_{k+1}) / 2`` of two table values is a multiple of 1/2, so the number of midpoints at or
    below ``al`` -- the C function's answer, a tie at a midpoint going to the upper value -- is constant on each such
    half-unit cell. Below the first value every cell gives 0, above the last 15 (clamped cells)."""
    vals = [float(v) for v in IQ4NL_VALUES]
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    lo, hi = int(2 * vals[0]), int(2 * vals[-1])  # -254, 226
    return lo, torch.tensor([sum(m <= j / 2 for m in mids) for j in range(lo, hi + 1)], dtype=torch.int64)


_IQ4_CELL_LO, _IQ4_CELL_INDEX = _midpoint_table()
_IQ4_CELL_VALUE = KVALUES_IQ4NL[_IQ4_CELL_INDEX]  # the table value best_index_int8 picks in each cell


def _cell(al: Tensor) -> Tensor:
    """The flat int64 row of ``al``'s half-unit cell in the tables of :func:`_midpoint_table` (``al`` float32). A NaN
    (``inf * 0`` in an all-zero block's trial) goes to the last cell: best_index_int8 fails both end tests and every
    comparison for it and returns 15."""
    top = _IQ4_CELL_INDEX.numel() - 1
    twice = torch.nan_to_num(al * 2.0, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    return twice.floor_().sub_(_IQ4_CELL_LO).clamp_(0, top).to(torch.int64).view(-1)


def _best_index(al: Tensor) -> Tensor:
    """``best_index_int8(16, kvalues_iq4nl, al)``: 0 at or below the first value, 15 at or above the last, else the
    nearer of the two values around ``al`` by float32 distances (a tie goes to the upper one). int64, al's shape.

    Read off a table by the half-unit cell of ``al`` (:func:`_midpoint_table`) instead of a binary search per
    element (the whole IQ4_NL / IQ4_XS search 4.0x / 4.7x faster: reports/benchmarks.md, ``ab-iq4``), and the same
    index for every float32 ``al``: the C code compares the float32 distances
    ``al - v_lo < v_hi - al``, which are exact (no rounding) wherever ``al`` is within a unit of a midpoint (there
    ``al`` and the two distances share one binade's grid of integers and half-integers), and farther away a rounding
    cannot swap their order. Checked against the C rule on every float32 in +-2^16 ulps of every midpoint
    (tests/test_formats_shipped.py) and on every float32 of magnitude below 256 (once, by hand)."""
    return _IQ4_CELL_INDEX.index_select(0, _cell(al)).view(al.shape)


def _iq4_sums(x: Tensor, w: Tensor, al: Tensor) -> tuple[Tensor, Tensor]:
    """``sumqx = sum(w * q * x)`` and ``sumq2 = sum(w * q * q)`` with ``q = kvalues[best_index(al)]`` ([32, M] ->
    [M] each, sequential float32 sums)."""
    q = _IQ4_CELL_VALUE.index_select(0, _cell(al)).view(al.shape)  # kvalues[best_index(al)], one lookup
    wq = w * q
    return _seq_sum(wq * x), _seq_sum(wq * q)


def _iq4_chunk(x: Tensor, w: Tensor | None = None) -> Tensor:
    """The block scale search of ``quantize_row_iq4_nl_impl`` (ntry 7) on blocks ``x`` [32, M] (position-major) with
    weights ``w`` [32, M] (quant_weights NULL: x^2): the scale ``d`` of each block [M] (0 for a block below
    GROUP_MAX_EPS)."""
    amax, where_max = x.abs().max(0)  # first index of the largest |x|, as the C loop's strict '>'
    big = x.gather(0, where_max.unsqueeze(0))[0]
    zero_block = amax < GROUP_MAX_EPS
    w = x * x if w is None else w
    v0 = float(IQ4NL_VALUES[0])
    d = -big / v0  # ntry > 0: d = -max / values[0]
    sumqx, sumq2 = _iq4_sums(x, w, rdiv(1.0, d) * x)
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for itry in range(-NTRY_IQ4, NTRY_IQ4 + 1):
        iscale = rdiv(float(itry + IQ4NL_VALUES[0]), big)  # (itry + values[0]) / max
        sumqx, sumq2 = _iq4_sums(x, w, iscale * x)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero_block, torch.zeros_like(d), d)


def iq4_scales(blocks: Tensor, weights: Tensor | None = None) -> Tensor:
    """Every 32-block's searched scale, [M] for ``blocks`` reshaped to [M, 32] (``weights`` the same shape as
    ``blocks``, or None for x^2)."""
    sub = blocks.reshape(-1, 32)
    wsub = None if weights is None else weights.reshape(-1, 32)
    scales = torch.empty(sub.shape[0])
    for a in range(0, sub.shape[0], CHUNK):
        w = None if wsub is None else wsub[a : a + CHUNK].t().contiguous()
        scales[a : a + CHUNK] = _iq4_chunk(sub[a : a + CHUNK].t().contiguous(), w)
    return scales


def _inverse_or_zero(d: Tensor) -> Tensor:
    """C ``d ? 1/d : 0``."""
    return torch.where(d != 0, rdiv(1.0, d), torch.zeros_like(d))


def _fit_iq4_nl(blocks: Tensor, fmt: Format, use_native: bool) -> dict[str, Tensor]:
    return iq4_nl_params(iq4_scales(blocks).reshape(*blocks.shape[:-1], 1), fmt)


def iq4_nl_params(scale: Tensor, fmt: Format) -> dict[str, Tensor]:
    """IQ4_NL's parameters from the searched block scales ``scale`` [R, nb, 1]."""
    # one block per super-block: dh = fp16(scale), codes best_index((1/scale) * x) with the float32 scale
    return {"id": _inverse_or_zero(scale), "d": to_fp16(scale, "block scale", fmt.name)}


def _fit_iq4_xs(blocks: Tensor, fmt: Format, use_native: bool) -> dict[str, Tensor]:
    return iq4_xs_params(iq4_scales(blocks), fmt)


def iq4_xs_params(scales: Tensor, fmt: Format) -> dict[str, Tensor]:
    """IQ4_XS's super-block scale and 6-bit block scales from the searched 32-block ``scales`` [M], M = 8 per
    super-block."""
    scales = scales.reshape(-1, 8)  # [S, 8]
    amax, where_max = scales.abs().max(-1, keepdim=True)
    max_scale = torch.where(amax > 0, scales.gather(-1, where_max), torch.zeros_like(amax))  # C: strict '>' from 0
    d = -max_scale / 32.0
    d16 = to_fp16(d, "super-block scale (max block scale / 32)", fmt.name)
    ls = nearest_int(_inverse_or_zero(d) * scales).clamp_(-32, 31).to(torch.float32)  # with the float32 d
    dl = d * ls
    # per 32-block [S, 8, 1]: codes best_index((1 / (d * l)) * x) with the float32 d; value fp16(d) * l * kvalue
    return {"id": _inverse_or_zero(dl).unsqueeze(-1), "d": (d16 * ls).unsqueeze(-1), "d16": d16, "sc": ls}


def _codes_iq4(x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
    """Indices 0..15 into kvalues_iq4nl (float32): ``best_index_int8(16, kvalues_iq4nl, id * x)``."""
    return _best_index(x * p["id"]).to(torch.float32)


def _dequantize_iq4(q: Tensor, p: Mapping[str, Tensor]) -> Tensor:
    """``d * kvalues[q]`` (gguf-py: d, or fp16 d times the block scale, times the table value)."""
    return KVALUES_IQ4NL[q.to(torch.int64)].mul_(p["d"])


# ----------------------------------------------------------------------------------------------------- public


def fit(blocks: Tensor, fmt: Format, use_native: bool = True) -> dict[str, Tensor]:
    """Parameters of each block of ``blocks`` [R, nb, B] (float32, finite, B the layout's block), broadcasting
    against ``blocks``: ``inv``/``d`` (Q8_0, Q5_0, Q4_0, per block), ``inv``/``min``/``d``/``m`` (Q5_1, Q4_1, per
    block), ``d``/``fallback`` (Q6_K, Q3_K: ``d * sc`` and the codes left where that is 0) or
    ``d``/``dm``/``fallback`` (Q4_K, Q5_K, Q2_K: also the sub-block's ``dmin * m``) or ``id``/``d`` (IQ4_NL,
    IQ4_XS: the inverse scale the codes are chosen with and the scale the value is dequantized with).

    ``use_native``: run the k-quant scale search in the C kernel of :mod:`quantpredict.formats.native` when it is
    available (bit-identical to the torch search here, which runs otherwise: without a compiler, with
    ``QUANTPREDICT_FORMATS_BACKEND=torch``, or for :func:`~quantpredict.formats.fake_quantize_reference`)."""
    t = _TYPES[fmt.name]
    p = t.fit(blocks, fmt, use_native and native.available())
    return {k: _per_element(p[k], blocks.shape) for k in t.elementwise}


def _per_element(t: Tensor, shape: torch.Size) -> Tensor:
    """Per-block [R, nb, 1] stays; per-sub-block [S, nsub, 1] or [S, nsub, sub] -> per element of ``shape``."""
    if t.dim() == 3 and t.shape[:2] == shape[:2]:
        return t
    sub = shape[-1] // t.shape[1]
    return t.expand(-1, -1, sub).reshape(shape)


def _sub_blocks(blocks: Tensor, fmt: Format) -> Tensor:
    """[R, nb, B] -> [S, nsub, sub] (sub-blocks of each super-block; Q8_0 blocks unchanged)."""
    if fmt.sub_block is None:
        return blocks
    return blocks.reshape(-1, fmt.default_block_size // fmt.sub_block, fmt.sub_block)


def fake_quantize_blocks(blocks: Tensor, fmt: Format, use_native: bool = True) -> Tensor:
    """``quantize(blocks, fmt, fit(blocks, fmt))`` without spreading the sub-block parameters over the elements
    (the same values: each element meets the same operands). [R, nb, B] float32 -> the same shape."""
    if use_native and fmt.name in native.LEGACY_KINDS:
        y = native.ggml_legacy(blocks, fmt.name)  # None without the kernel, or for a scale fp16 cannot hold
        if y is not None:
            return y
    t = _TYPES[fmt.name]
    p = t.fit(blocks, fmt, use_native and native.available())
    xs = _sub_blocks(blocks, fmt)
    return quantize(xs, fmt, {k: p[k] for k in t.elementwise}).reshape(blocks.shape)


def codes(x: Tensor, fmt: Format, p: Mapping[str, Tensor]) -> Tensor:
    """The integer codes (float32, x's shape): Q8_0 -127..127, Q6_K -32..31 (before llama.cpp's +32), Q3_K -4..3
    (before its +4), Q2_K 0..3, Q4_K, Q4_0 and Q4_1 0..15, Q5_K, Q5_0 and Q5_1 0..31, IQ4_NL and IQ4_XS 0..15
    (indices into kvalues_iq4nl)."""
    return _TYPES[fmt.name].codes(x, p)


def quantize(x: Tensor, fmt: Format, p: Mapping[str, Tensor]) -> Tensor:
    """The dequantized value of each element with gguf-py's arithmetic: ``q * d`` (Q8_0), ``(q - 16) * d`` (Q5_0),
    ``(q - 8) * d`` (Q4_0), ``d * q + m`` (Q5_1, Q4_1), ``d * q - dm`` (Q4_K, Q5_K, Q2_K), ``d * q`` (Q6_K, Q3_K; d =
    fp16 d times the sub-block scale), ``d * kvalues_iq4nl[q]`` (IQ4_NL, IQ4_XS). float32, x's shape."""
    t = _TYPES[fmt.name]
    return t.dequantize(t.codes(x, p), p)


# ---------------------------------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class Encoded:
    """One tensor in a ggml layout: ``codes`` [rows, n] and the stored scales per (super-)block, [rows, nb, ...]."""

    fmt: str
    codes: Tensor
    d: Tensor  # fp16 values as float32: [rows, nb]
    dmin: Tensor | None  # k-quants with mins
    sc: Tensor | None  # sub-block scales [rows, nb, 8 or 16]
    m: Tensor | None  # sub-block mins [rows, nb, 8]; Q5_1: the fp16 block min [rows, nb]


def encode(x: Tensor, fmt: Format) -> Encoded:
    """The codes and stored scales llama.cpp's reference quantizer writes for ``x`` [rows, n] (n a multiple of the
    block). Codes of sub-blocks whose scale is 0 are 0 for Q4_K/Q5_K (llama.cpp leaves its search's codes there; the
    dequantized values are the same)."""
    x32 = x.detach().to(torch.float32)
    rows, n = x32.shape
    fmt.check_row_length(n)
    block = fmt.default_block_size
    blocks = x32.reshape(rows, n // block, block)
    t = _TYPES[fmt.name]
    p = t.fit(blocks, fmt, native.available())
    q = t.codes(_sub_blocks(blocks, fmt), {k: p[k] for k in t.elementwise}).reshape(rows, n)
    return Encoded(fmt.name, q, *t.stored(p, rows, n // block))


def _fp16_bytes(v: Tensor) -> np.ndarray:
    return v.to(torch.float16).numpy().reshape(-1, 1).view(np.uint8)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12 bytes of 6-bit scales and mins of Q4_K/Q5_K (``get_scale_min_k4``'s layout), [nblocks, 12]."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def _pack_q8_0(e: Encoded) -> np.ndarray:
    q = e.codes.to(torch.int8).numpy().reshape(-1, 32).view(np.uint8)
    return np.concatenate([_fp16_bytes(e.d), q], axis=1)


def _low_high_5bit(codes: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``qh`` (4 bytes: bit j is bit 4 of code j) and ``qs`` (16 bytes: code j in the low nibble, j + 16 in the high)
    of Q5_0/Q5_1 blocks of 32 codes 0..31."""
    q = codes.to(torch.uint8).numpy().reshape(-1, 32)
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    qh = np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little")
    return qh, qs


def _nibbles_32(codes: Tensor) -> np.ndarray:
    """``qs`` (16 bytes: code j in the low nibble, j + 16 in the high) of Q4_0/Q4_1/IQ4_NL blocks of 32 codes
    0..15."""
    q = codes.to(torch.uint8).numpy().reshape(-1, 32)
    return q[:, :16] | (q[:, 16:] << 4)


def _pack_q4_0(e: Encoded) -> np.ndarray:
    return np.concatenate([_fp16_bytes(e.d), _nibbles_32(e.codes)], axis=1)


def _pack_q4_1(e: Encoded) -> np.ndarray:
    return np.concatenate([_fp16_bytes(e.d), _fp16_bytes(e.m), _nibbles_32(e.codes)], axis=1)


def _pack_q5_0(e: Encoded) -> np.ndarray:
    qh, qs = _low_high_5bit(e.codes)
    return np.concatenate([_fp16_bytes(e.d), qh, qs], axis=1)


def _pack_q5_1(e: Encoded) -> np.ndarray:
    qh, qs = _low_high_5bit(e.codes)
    return np.concatenate([_fp16_bytes(e.d), _fp16_bytes(e.m), qh, qs], axis=1)


def _pack_q4_k(e: Encoded) -> np.ndarray:
    q = e.codes.to(torch.uint8).numpy().reshape(-1, 4, 2, 32)  # 4 pairs of sub-blocks: low nibble, high nibble
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    sc = _k_scales(e.sc.to(torch.uint8).numpy().reshape(-1, 8), e.m.to(torch.uint8).numpy().reshape(-1, 8))
    return np.concatenate([_fp16_bytes(e.d), _fp16_bytes(e.dmin), sc, qs], axis=1)


def _pack_q5_k(e: Encoded) -> np.ndarray:
    q = e.codes.to(torch.uint8).numpy().reshape(-1, 4, 2, 32)
    lo = q & 0xF
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    hi = (q >> 4).reshape(-1, 8, 32)  # bit 4 of sub-block j goes to bit j of qh[l]
    qh = np.zeros((hi.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= hi[:, j] << j
    sc = _k_scales(e.sc.to(torch.uint8).numpy().reshape(-1, 8), e.m.to(torch.uint8).numpy().reshape(-1, 8))
    return np.concatenate([_fp16_bytes(e.d), _fp16_bytes(e.dmin), sc, qh, qs], axis=1)


def _pack_q6_k(e: Encoded) -> np.ndarray:
    L = (e.codes.to(torch.int16) + 32).to(torch.uint8).numpy().reshape(-1, 2, 4, 32)  # two halves of 128
    lo = L & 0xF
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)  # [nb,2,64]
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [nb, 2, 32]
    sc = e.sc.to(torch.int8).numpy().reshape(-1, 16).view(np.uint8)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc, _fp16_bytes(e.d)], axis=1)


def _qs_2bit(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K ``qs`` (64 bytes) of 2-bit codes L [nb, 256]: byte l of each half of 128 holds L[l], L[l + 32],
    L[l + 64], L[l + 96] in bits 0-1, 2-3, 4-5, 6-7."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_q3_k(e: Encoded) -> np.ndarray:
    L = (e.codes.to(torch.int16) + 4).to(torch.uint8).numpy().reshape(-1, 256)  # 0..7
    high = (L >> 2).reshape(-1, 8, 32)  # bit 2 of element 32 * b + m goes to bit b of hmask[m]
    hmask = np.zeros((high.shape[0], 32), dtype=np.uint8)
    for b in range(8):
        hmask |= high[:, b] << b
    l6 = (e.sc.to(torch.int16) + 32).to(torch.uint8).numpy().reshape(-1, 16)  # 0..63
    scales = np.zeros((l6.shape[0], 12), dtype=np.uint8)
    scales[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    hi = l6 >> 4
    for j in range(16):
        scales[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    return np.concatenate([hmask, _qs_2bit(L & 3), scales, _fp16_bytes(e.d)], axis=1)


def _pack_q2_k(e: Encoded) -> np.ndarray:
    L = e.codes.to(torch.uint8).numpy().reshape(-1, 256)
    sc = e.sc.to(torch.uint8).numpy().reshape(-1, 16) | (e.m.to(torch.uint8).numpy().reshape(-1, 16) << 4)
    return np.concatenate([sc, _qs_2bit(L), _fp16_bytes(e.d), _fp16_bytes(e.dmin)], axis=1)


def _pack_iq4_nl(e: Encoded) -> np.ndarray:
    return np.concatenate([_fp16_bytes(e.d), _nibbles_32(e.codes)], axis=1)


def _pack_iq4_xs(e: Encoded) -> np.ndarray:
    l6 = (e.sc.to(torch.int16) + 32).numpy().astype(np.uint16).reshape(-1, 8)  # 0..63
    scales_h = np.zeros(l6.shape[0], dtype=np.uint16)
    for ib in range(8):
        scales_h |= (l6[:, ib] >> 4) << (2 * ib)
    lo = (l6 & 0xF).astype(np.uint8)
    scales_l = lo[:, 0::2] | (lo[:, 1::2] << 4)
    qs = _nibbles_32(e.codes).reshape(-1, 128)
    return np.concatenate([_fp16_bytes(e.d), scales_h.reshape(-1, 1).view(np.uint8), scales_l, qs], axis=1)


# ------------------------------------------------------------------------------------------------ the types


class _GgmlType(NamedTuple):
    """One llama.cpp type: how it fits, codes, dequantizes, stores and packs a tensor."""

    fit: Callable[[Tensor, Format, bool], dict[str, Tensor]]  # (blocks [R, nb, B], fmt, use_native) -> parameters
    elementwise: tuple[str, ...]  # the parameters that codes and dequantize read (fit spreads them per element)
    codes: Callable[[Tensor, Mapping[str, Tensor]], Tensor]
    dequantize: Callable[[Tensor, Mapping[str, Tensor]], Tensor]  # codes -> values, in place (gguf-py's arithmetic)
    stored: Callable[[Mapping[str, Tensor], int, int], tuple]  # (p, rows, nb) -> Encoded's (d, dmin, sc, m)
    pack: Callable[[Encoded], np.ndarray]


def _simple_fit(fit_: Callable[[Tensor, Format], dict[str, Tensor]]):
    """A one-pass fit (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1: no scale search, so ``use_native`` has nothing to run)."""
    return lambda blocks, fmt, use_native: fit_(blocks, fmt)


def _times_d(q: Tensor, p: Mapping[str, Tensor]) -> Tensor:
    return q.mul_(p["d"])  # q * d (Q8_0), d * q (Q6_K): the same product


def _d_times_q_minus_dm(q: Tensor, p: Mapping[str, Tensor]) -> Tensor:
    return q.mul_(p["d"]).sub_(p["dm"])


def _d_stored(p: Mapping[str, Tensor], rows: int, nb: int) -> tuple:
    return p["d"].reshape(rows, nb), None, None, None


def _d_m_stored(p: Mapping[str, Tensor], rows: int, nb: int) -> tuple:
    return p["d"].reshape(rows, nb), None, None, p["m"].reshape(rows, nb)


def _kx2_stored(p: Mapping[str, Tensor], rows: int, nb: int) -> tuple:
    return (p["d16"].reshape(rows, nb), p["dmin16"].reshape(rows, nb), p["sc"].reshape(rows, nb, 8),
            p["m"].reshape(rows, nb, 8))


#: Every llama.cpp type, by format name.
_TYPES: dict[str, _GgmlType] = {
    "q8_0": _GgmlType(fit=_simple_fit(_fit_q8_0), elementwise=("inv", "d"), codes=_codes_q8_0,
                      dequantize=_times_d, stored=_d_stored, pack=_pack_q8_0),
    "q4_0": _GgmlType(fit=_simple_fit(_fit_sym(8)), elementwise=("inv", "d"), codes=_codes_sym(8),
                      dequantize=lambda q, p: q.sub_(8.0).mul_(p["d"]), stored=_d_stored, pack=_pack_q4_0),
    "q4_1": _GgmlType(fit=_simple_fit(_fit_min(15)), elementwise=("inv", "min", "d", "m"),
                      codes=_codes_min(15), dequantize=lambda q, p: q.mul_(p["d"]).add_(p["m"]),
                      stored=_d_m_stored, pack=_pack_q4_1),
    "q5_0": _GgmlType(fit=_simple_fit(_fit_sym(16)), elementwise=("inv", "d"), codes=_codes_sym(16),
                      dequantize=lambda q, p: q.sub_(16.0).mul_(p["d"]), stored=_d_stored, pack=_pack_q5_0),
    "q5_1": _GgmlType(fit=_simple_fit(_fit_min(31)), elementwise=("inv", "min", "d", "m"),
                      codes=_codes_min(31), dequantize=lambda q, p: q.mul_(p["d"]).add_(p["m"]),
                      stored=_d_m_stored, pack=_pack_q5_1),
    "q4_k": _GgmlType(fit=_fit_kx2, elementwise=("d", "dm", "fallback"),
                      codes=_codes_with_fallback(0, KX2["q4_k"][0]),
                      dequantize=_d_times_q_minus_dm, stored=_kx2_stored, pack=_pack_q4_k),
    "q5_k": _GgmlType(fit=_fit_kx2, elementwise=("d", "dm", "fallback"),
                      codes=_codes_with_fallback(0, KX2["q5_k"][0]),
                      dequantize=_d_times_q_minus_dm, stored=_kx2_stored, pack=_pack_q5_k),
    "q3_k": _GgmlType(fit=_fit_q3_k, elementwise=("d", "fallback"), codes=_codes_with_fallback(-4, 3),
                      dequantize=_times_d,
                      stored=lambda p, rows, nb: (p["d16"].reshape(rows, nb), None, p["sc"].reshape(rows, nb, 16),
                                                  None),
                      pack=_pack_q3_k),
    "q2_k": _GgmlType(fit=_fit_q2_k, elementwise=("d", "dm", "fallback"),
                      codes=_codes_with_fallback(0, 3),
                      dequantize=_d_times_q_minus_dm,
                      stored=lambda p, rows, nb: (p["d16"].reshape(rows, nb), p["dmin16"].reshape(rows, nb),
                                                  p["sc"].reshape(rows, nb, 16), p["m"].reshape(rows, nb, 16)),
                      pack=_pack_q2_k),
    "iq4_nl": _GgmlType(fit=_fit_iq4_nl, elementwise=("id", "d"), codes=_codes_iq4,
                        dequantize=_dequantize_iq4, stored=_d_stored, pack=_pack_iq4_nl),
    "iq4_xs": _GgmlType(fit=_fit_iq4_xs, elementwise=("id", "d"), codes=_codes_iq4,
                        dequantize=_dequantize_iq4,
                        stored=lambda p, rows, nb: (p["d16"].reshape(rows, nb), None, p["sc"].reshape(rows, nb, 8),
                                                    None),
                        pack=_pack_iq4_xs),
    "q6_k": _GgmlType(fit=_fit_q6_k, elementwise=("d", "fallback"), codes=_codes_with_fallback(-32, 31),
                      dequantize=_times_d,
                      stored=lambda p, rows, nb: (p["d16"].reshape(rows, nb), None, p["sc"].reshape(rows, nb, 16),
                                                  None),
                      pack=_pack_q6_k),
}


def to_gguf_bytes(x: Tensor, fmt: Format | str) -> np.ndarray:
    """``x`` [rows, n] quantized by llama.cpp's reference quantizer and packed in its block layout (``block_q8_0``,
    ``block_q4_K``, ...), as stored in a GGUF file: uint8 [rows, n / block * bytes per block]. ``gguf.quants.
    dequantize(out, GGMLQuantizationType.Q4_K)`` gives :func:`quantpredict.formats.fake_quantize` of ``x``. With an
    importance matrix: :func:`quantpredict.formats.ggml_imatrix.to_gguf_bytes` (that module builds on this one)."""
    from quantpredict.formats.table import get_format

    f = get_format(fmt)
    if f.name == "nvfp4":  # GGUF's NVFP4 type: where it meets NVIDIA's definition, see formats.tensor_scale
        from quantpredict.formats.tensor_scale import to_gguf_bytes as nvfp4_bytes

        return nvfp4_bytes(x, f)
    if f.family != "ggml":
        raise ValueError(f"{f.name} is not a llama.cpp format; ggml formats: {', '.join(_TYPES)}")
    if x.dim() != 2:
        raise ValueError(f"to_gguf_bytes needs a 2-D [rows, n] tensor, got shape {tuple(x.shape)}")
    e = encode(x, f)
    return _TYPES[f.name].pack(e).reshape(x.shape[0], -1)
