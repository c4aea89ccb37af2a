"""Exactness tests of the layouts checkpoints ship: uintK (AutoGPTQ), NF4 / NF4-DQ (bitsandbytes), Q8_0 and the
k-quants (llama.cpp).

Each format is re-implemented here from its published description in float64 numpy, independently of
quantpredict.formats: where the description computes in float32 (every one of these does), the float64 result of
each operation is rounded to float32 with ``f32`` (a float64 op on float32 operands rounded once to float32 equals
the float32 op: 53 >= 2*24 + 2), and stored fp16 scales are rounded with numpy's float16. The outputs must be
bit-identical to ``fake_quantize`` (signs of zero included). The llama.cpp layouts are also packed into their GGUF
byte layout and dequantized with the ``gguf`` package's own dequantizer.
"""

from __future__ import annotations

import math
import re

import ggml_oracle
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT

from quantpredict.cli import main as cli_main
from quantpredict.errors import FormatError
from quantpredict.formats import (
    compute_scale,
    fake_quantize,
    fake_quantize_reference,
    fit_params,
    get_format,
    list_formats,
    native,
    quantize_with_params,
    quantize_with_scale,
    to_gguf_bytes,
)
from quantpredict.formats.nf4 import dynamic_map
from quantpredict.formats.table import GGML_TYPE_ID
from quantpredict.quantize.gptq import gptq_quantize, layer_output_error

ASYM = [f"uint{k}" for k in range(2, 9)] + [f"uint{k}_pc" for k in range(2, 9)]
GGML = ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "q3_k", "q2_k", "iq4_nl", "iq4_xs"]
SHIPPED = ASYM + ["nf4", "nf4_dq"] + GGML
GGUF_TYPE = {"q8_0": GT.Q8_0, "q5_0": GT.Q5_0, "q5_1": GT.Q5_1, "q4_0": GT.Q4_0, "q4_1": GT.Q4_1, "q4_k": GT.Q4_K,
             "q5_k": GT.Q5_K, "q6_k": GT.Q6_K, "q3_k": GT.Q3_K, "q2_k": GT.Q2_K,
             "iq4_nl": GT.IQ4_NL, "iq4_xs": GT.IQ4_XS}

# bitsandbytes' NF4 code values (bitsandbytes/functional.py, get_4bit_type("nf4")), as float32
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32).astype(np.float64)


def f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def f16(a) -> np.ndarray:
    """A float32 value stored as fp16 (nearest, ties to even), back in float64."""
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float16).astype(np.float64)


def ndiv(a, b) -> np.ndarray:
    """float32 a / b, 0 where b == 0 (never used where the description divides by 0)."""
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return f32(np.where(b == 0, 0.0, np.asarray(a, dtype=np.float64) / np.where(b == 0, 1.0, b)))


def nearest_int(v) -> np.ndarray:
    """llama.cpp's nearest_int: bits(fval + 12582912.f) & 0x7fffff minus 0x400000 (round half to even below 2^22)."""
    val = (np.asarray(v, dtype=np.float64) + 12582912.0).astype(np.float32)
    return ((val.view(np.int32) & 0x007FFFFF) - 0x00400000).astype(np.int64)


def bits(t) -> np.ndarray:
    a = t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return a.astype(np.float32).view(np.uint32)


def assert_bits_equal(got: torch.Tensor, want: np.ndarray, what: str = "") -> None:
    g, w = bits(got), bits(want)
    bad = int((g != w).sum())
    first = int(np.argmax((g != w).reshape(-1)))
    assert bad == 0, f"{what}: {bad} of {g.size} values differ, e.g. got {float(got.reshape(-1)[first])}"


# --------------------------------------------------------------------------------- independent references


def ref_asym(x: np.ndarray, k: int, group: int | None) -> np.ndarray:
    """AutoGPTQ's Quantizer (sym=False) on [rows, n] in groups of ``group`` columns (None: the whole row), values as
    the packed checkpoint dequantizes them: fp16(scale) * (q - zero)."""
    maxq = 2**k - 1
    n = x.shape[1]
    g = group or n
    out = np.empty_like(x)
    for a in range(0, n, g):
        xg = x[:, a : a + g]
        xmin = np.minimum(xg.min(1, keepdims=True), 0.0)
        xmax = np.maximum(xg.max(1, keepdims=True), 0.0)
        both = (xmin == 0) & (xmax == 0)
        xmin, xmax = np.where(both, -1.0, xmin), np.where(both, 1.0, xmax)
        scale = f32(f32(xmax - xmin) / maxq)
        zero = np.rint(f32(-xmin / scale))
        q = np.clip(np.rint(f32(xg / scale)) + zero, 0, maxq)
        out[:, a : a + g] = f32(f16(scale) * (q - zero))
    return out


def ref_dynamic_map() -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), from its description:
    for i = 0..6 the 2^i midpoints of linspace(0.1, 1, 2^i + 1) times 10^(i-6), both signs, plus 0 and 1."""
    vals = [0.0, 1.0]
    for i in range(7):
        b = np.linspace(0.1, 1.0, 2**i + 1)
        means = (b[:-1] + b[1:]) / 2
        vals += list(10.0 ** (i - 6) * means) + list(-(10.0 ** (i - 6)) * means)
    return f32(np.sort(vals))


def nearest_index(s: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest code value (exact float64 distances, the lower index on a tie)."""
    return np.argmin(np.abs(s[..., None] - code), axis=-1)


def ref_nf4(x: np.ndarray, block: int, dq: bool) -> np.ndarray:
    """bitsandbytes quantize_4bit(nf4) [+ compress_statistics] then dequantize_4bit, blocks along each row."""
    rows, n = x.shape
    nb = math.ceil(n / block)
    xp = np.pad(x, ((0, 0), (0, nb * block - n))).reshape(rows, nb, block)
    absmax = np.abs(xp).max(-1)
    inv = ndiv(1.0, absmax)
    s = np.clip(f32(xp * inv[..., None]), -1, 1)
    idx = nearest_index(s, NF4)
    scale = absmax
    if dq:
        flat = absmax.reshape(-1)
        offset = f32(math.fsum(flat) / flat.size)
        r = f32(flat - offset)
        runs = math.ceil(r.size / 256)
        a2 = np.array([np.abs(r[256 * j : 256 * (j + 1)]).max() for j in range(runs)]).repeat(256)[: r.size]
        s2 = np.clip(f32(r * ndiv(1.0, a2)), -1, 1)
        dyn = ref_dynamic_map()
        scale = f32(f32(dyn[nearest_index(s2, dyn)] * a2) + offset).reshape(rows, nb)
    return f32(NF4[idx] * scale[..., None]).reshape(rows, nb * block)[:, :n]


def ref_q8_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref then dequantize_row_q8_0."""
    b = x.reshape(-1, 32)
    d = f32(np.abs(b).max(1, keepdims=True) / 127)
    inv = ndiv(1.0, d)
    v = f32(b * inv)
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)  # roundf: halves away from zero
    return f32(q * f16(d)).reshape(x.shape)


def ref_q5_0(x: np.ndarray, half: int = 16) -> np.ndarray:
    """quantize_row_q5_0_ref then dequantize_row_q5_0: d = max / -16 (max: the first value of largest |x|),
    q = MIN(31, (int8_t)(x * (1/d) + 16.5f)), value (q - 16) * fp16(d). ``half`` 8: quantize_row_q4_0_ref
    (d = max / -8, q = MIN(15, (int8_t)(x * (1/d) + 8.5f)), value (q - 8) * fp16(d))."""
    b = x.reshape(-1, 32)
    big = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1)
    d = f32(big / -half)
    inv = ndiv(1.0, d)
    q = np.minimum(2 * half - 1, np.trunc(f32(f32(b * inv) + (half + 0.5))))
    return f32((q - half) * f16(d)).reshape(x.shape)


def ref_q5_1(x: np.ndarray, top: int = 31) -> np.ndarray:
    """quantize_row_q5_1_ref then dequantize_row_q5_1: d = (max - min) / 31, q = (uint8_t)((x - min) * (1/d) +
    0.5f), value fp16(d) * q + fp16(min). ``top`` 15: quantize_row_q4_1_ref (d = (max - min) / 15,
    q = MIN(15, (int8_t)((x - min) * (1/d) + 0.5f)))."""
    b = x.reshape(-1, 32)
    lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
    d = f32(f32(hi - lo) / top)
    inv = ndiv(1.0, d)
    q = np.minimum(top, np.trunc(f32(f32(f32(b - lo) * inv) + 0.5)))
    return f32(f32(f16(d) * q) + f16(lo)).reshape(x.shape)


def seq_sum(terms: np.ndarray) -> np.ndarray:
    """float32 sum over the last axis in index order, starting from 0 (as the C loops)."""
    acc = np.zeros(terms.shape[:-1])
    for i in range(terms.shape[-1]):
        acc = f32(acc + terms[..., i])
    return acc


def ref_make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                  mad: bool = False):
    """make_qkx2_quants(n, use_mad=mad) on sub-blocks x [M, n] with weights w: (scale, the_min, L), [M] and [M, n].
    """

    def err(diff):
        return seq_sum(f32(w * (np.abs(diff) if mad else f32(diff * diff))))

    lo, hi = x.min(1), x.max(1)
    sum_w = w[:, 0].copy()
    sum_x = f32(sum_w * x[:, 0])
    for i in range(1, x.shape[1]):
        sum_w = f32(sum_w + w[:, i])
        sum_x = f32(sum_x + f32(w[:, i] * x[:, i]))
    mn = np.where(lo > 0, 0.0, lo)
    flat = hi == mn
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(nmax / f32(hi - mn))
        scale = f32(1.0 / iscale)
        L = np.clip(nearest_int(f32(iscale[:, None] * f32(x - mn[:, None]))), 0, nmax)
        best = err(f32(f32(f32(scale[:, None] * L) + mn[:, None]) - x))
        for step in range(nstep + 1):
            num = f32(f32(rmin + f32(f32(rdelta) * step)) + nmax)
            isc = f32(num / f32(hi - mn))
            Ls = np.clip(nearest_int(f32(isc[:, None] * f32(x - mn[:, None]))), 0, nmax).astype(np.float64)
            wl = f32(w * Ls)
            sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(f32(wl * Ls)), seq_sum(f32(wl * x))
            D = f32(f32(sum_w * sum_l2) - f32(sum_l * sum_l))
            t_scale = f32(f32(f32(sum_w * sum_xl) - f32(sum_x * sum_l)) / D)
            t_min = f32(f32(f32(sum_l2 * sum_x) - f32(sum_l * sum_xl)) / D)
            pos = t_min > 0
            t_min = np.where(pos, 0.0, t_min)
            t_scale = np.where(pos, f32(sum_xl / sum_l2), t_scale)
            cur = err(f32(f32(f32(t_scale[:, None] * Ls) + t_min[:, None]) - x))
            take = (D > 0) & (cur < best) & ~flat
            best, scale, mn = np.where(take, cur, best), np.where(take, t_scale, scale), np.where(take, t_min, mn)
            L = np.where(take[:, None], Ls, L)
    return np.where(flat, 0.0, scale), -mn, np.where(flat[:, None], 0, L)


def ref_q45_k(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> np.ndarray:
    """quantize_row_q4_K_ref / quantize_row_q5_K_ref, then their dequantization (d * q - dm)."""
    sub = x.reshape(-1, 32)
    av = f32(np.sqrt(f32(seq_sum(f32(sub * sub)) / 32)))
    w = f32(av[:, None] + np.abs(sub))
    scales, mins, _ = ref_make_qkx2(sub, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale = np.maximum(scales.max(1, keepdims=True), 0.0)
    max_min = np.maximum(mins.max(1, keepdims=True), 0.0)
    inv_s = np.where(max_scale > 0, ndiv(63.0, max_scale), 0.0)
    inv_m = np.where(max_min > 0, ndiv(63.0, max_min), 0.0)
    ls = np.minimum(nearest_int(f32(inv_s * scales)) & 0xFF, 63)  # (uint8_t) wraps, then MIN(63, .)
    lm = np.minimum(nearest_int(f32(inv_m * mins)) & 0xFF, 63)
    d = f32(f16(f32(max_scale / 63)) * ls).reshape(-1, 1)
    dm = f32(f16(f32(max_min / 63)) * lm).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(nearest_int(f32(f32(sub + dm) / d)), 0, nmax)
    q = np.where(d == 0, 0, q)  # scale 0: the value is -dm whatever the code
    return f32(f32(d * q) - dm).reshape(x.shape)


def ref_make_qx(x: np.ndarray):
    """make_qx_quants(16, 32, x, L, rmse_type=1, NULL) on sub-blocks x [M, 16]: (scale [M], L - 32 [M, 16])."""
    nmax = 32
    big = x[np.arange(x.shape[0]), np.argmax(np.abs(x), 1)]  # the first largest |x|, with its sign
    zero = np.abs(big) < f32(1e-15)
    w = f32(x * x)
    wx = f32(w * x)
    with np.errstate(divide="ignore", invalid="ignore"):
        def attempt(step):
            isc = f32(-f32(nmax + f32(f32(0.1) * step)) / big)
            L = np.clip(nearest_int(f32(isc[:, None] * x)), -nmax, nmax - 1).astype(np.float64)
            return L, seq_sum(f32(wx * L)), seq_sum(f32(f32(w * L) * L))

        L, sumlx, suml2 = attempt(0)
        scale = np.where(suml2 != 0, f32(sumlx / suml2), 0.0)
        best = f32(scale * sumlx)
        for step in [*range(-9, 0), *range(1, 10)]:
            Ls, sumlx, suml2 = attempt(step)
            take = (suml2 > 0) & (f32(sumlx * sumlx) > f32(best * suml2))
            L = np.where(take[:, None], Ls, L)
            scale = np.where(take, f32(sumlx / suml2), scale)
            best = np.where(take, f32(scale * sumlx), best)
    return np.where(zero, 0.0, scale), np.where(zero[:, None], -32.0, L)


def ref_q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref then dequantize (d * sc * q)."""
    sub = x.reshape(-1, 16)
    scales, L = ref_make_qx(sub)
    scales, L = scales.reshape(-1, 16), L.reshape(-1, 16, 16)
    j = np.argmax(np.abs(scales), 1)
    max_scale = scales[np.arange(scales.shape[0]), j][:, None]
    zero = np.abs(max_scale) < f32(1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(-128.0 / max_scale)
        d16 = np.where(zero, 0.0, f16(f32(1.0 / iscale)))
        sc = np.where(zero, 0, np.minimum(nearest_int(f32(iscale * scales)), 127))
    d = f32(d16 * sc)[..., None]  # [S, 16, 1]
    xs = sub.reshape(-1, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(nearest_int(f32(xs / d)), -32, 31).astype(np.float64)
    q = np.where(d == 0, np.where(zero[..., None], -32.0, L), q)
    return f32(d * q).reshape(x.shape)


def ref_make_q3(x: np.ndarray):
    """make_q3_quants(16, 4, x, L, do_rmse=true) on sub-blocks x [M, 16]: (scale [M], L - 4 [M, 16]), one sub-block
    at a time as the C code (up to 5 passes, stopping after a pass without a change)."""
    nmax = 4
    scales, codes = np.zeros(x.shape[0]), np.full(x.shape, -4.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        for m, xs in enumerate(x):
            big = xs[np.argmax(np.abs(xs))]
            if abs(big) < f32(1e-15):
                continue
            L = np.clip(nearest_int(f32(f32(-nmax / big) * xs)), -nmax, nmax - 1).astype(np.float64)
            w = f32(xs * xs)
            sumlx = seq_sum(f32(f32(w * xs) * L))
            suml2 = seq_sum(f32(f32(w * L) * L))
            for _ in range(5):
                changed = 0
                for i in range(16):
                    slx = f32(sumlx - f32(f32(w[i] * xs[i]) * L[i]))
                    if slx > 0:
                        sl2 = f32(suml2 - f32(f32(w[i] * L[i]) * L[i]))
                        new = float(np.clip(nearest_int(f32(f32(xs[i] * sl2) / slx)), -nmax, nmax - 1))
                        if new != L[i]:
                            slx = f32(slx + f32(f32(w[i] * xs[i]) * new))
                            sl2 = f32(sl2 + f32(f32(w[i] * new) * new))
                            if sl2 > 0 and f32(f32(slx * slx) * suml2) > f32(f32(sumlx * sumlx) * sl2):
                                L[i], sumlx, suml2 = new, slx, sl2
                                changed += 1
                if not changed:
                    break
            scales[m] = f32(sumlx / suml2) if suml2 > 0 else 0.0
            codes[m] = L
    return scales, codes


def ref_q3_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q3_K_ref then dequantize_row_q3_K (d * (sc - 32) * (q - 4), the 6-bit scales stored + 32)."""
    sub = x.reshape(-1, 16)
    scales, L = ref_make_q3(sub)
    scales, L = scales.reshape(-1, 16), L.reshape(-1, 16, 16)
    max_scale = scales[np.arange(scales.shape[0]), np.argmax(np.abs(scales), 1)][:, None]
    some = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(-32.0 / max_scale)
        l = ((nearest_int(f32(iscale * scales)) + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
        sc = np.where(some, np.clip(l, -32, 31), -32)
        d16 = np.where(some, f16(f32(1.0 / iscale)), 0.0)
    d = f32(d16 * sc)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(nearest_int(f32(sub.reshape(-1, 16, 16) / d)), -4, 3).astype(np.float64)
    q = np.where(d == 0, L, q)
    return f32(d * q).reshape(x.shape)


def ref_q2_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q2_K_ref then dequantize_row_q2_K: make_qkx2_quants(16, 3, weights |x|, -0.5, 0.1, 15,
    use_mad) per 16, 4-bit scales and mins against fp16 d = max_scale / 15 and dmin = max_min / 15, d * q - dm."""
    sub = x.reshape(-1, 16)
    scales, mins, _ = ref_make_qkx2(sub, np.abs(sub), 3, -0.5, 0.1, 15, mad=True)
    scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
    max_scale = np.maximum(scales.max(1, keepdims=True), 0.0)
    max_min = np.maximum(mins.max(1, keepdims=True), 0.0)
    ls = nearest_int(f32(np.where(max_scale > 0, ndiv(15.0, max_scale), 0.0) * scales)) & 0xFF
    lm = nearest_int(f32(np.where(max_min > 0, ndiv(15.0, max_min), 0.0) * mins))
    byte = ls | ((lm << 4) & 0xFF)
    d = f32(f16(f32(max_scale / 15)) * (byte & 0xF))[..., None]
    dm = f32(f16(f32(max_min / 15)) * (byte >> 4))[..., None]
    xs = sub.reshape(-1, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(nearest_int(f32(f32(xs + dm) / d)), 0, 3)
    q = np.where(d == 0, 0, q)  # scale 0: the value is -dm whatever the code
    return f32(f32(d * q) - dm).reshape(x.shape)


# kvalues_iq4nl of ggml-common.h
KV_IQ4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float64)


def ref_best_index(al: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, al): 0 / 15 beyond the ends, else the nearer neighbour by float32
    distances, the upper one on a tie."""
    mu = np.clip(np.searchsorted(KV_IQ4, al, side="right"), 1, 15)
    idx = np.where(f32(al - KV_IQ4[mu - 1]) < f32(KV_IQ4[mu] - al), mu - 1, mu)
    return np.where(al <= KV_IQ4[0], 0, np.where(al >= KV_IQ4[15], 15, idx))


def test_iq4_best_index_table_is_the_c_rule_at_every_midpoint():
    """The half-unit-cell table (formats.ggml._best_index) gives best_index_int8's answer on every float32 within
    2^16 ulps of every midpoint of two table values (where a rounding of the C code's float32 distances could
    matter), at the ends, and on random values; the C rule is computed here in float64 then rounded, as C does."""
    from quantpredict.formats.ggml import _best_index

    mids = (KV_IQ4[1:] + KV_IQ4[:-1]) / 2
    near = [np.arange(-(1 << 16), 1 << 16, dtype=np.int64) + np.array(m, dtype=np.float32).view(np.int32)
            for m in [*mids, *KV_IQ4]]
    bits = np.concatenate(near).astype(np.int32)
    rng = np.random.default_rng(0)
    ends = f32([-1e6, -127, 113, 1e6, 0, np.inf, -np.inf, np.nan])  # NaN: best_index_int8 fails every test, 15
    al = np.concatenate([bits.view(np.float32), f32(rng.normal(0, 80, 200_000)), ends])
    assert np.array_equal(_best_index(torch.from_numpy(al)).numpy(), ref_best_index(al.astype(np.float64)))


def ref_iq4_scale(x: np.ndarray) -> np.ndarray:
    """quantize_row_iq4_nl_impl's search (weights x^2, ntry 7) on blocks x [M, 32]: the scale d [M]."""
    big = x[np.arange(x.shape[0]), np.argmax(np.abs(x), 1)]
    w = f32(x * x)
    with np.errstate(divide="ignore", invalid="ignore"):
        def sums(iscale):
            q = KV_IQ4[ref_best_index(f32(iscale[:, None] * x))]
            wq = f32(w * q)
            return seq_sum(f32(wq * x)), seq_sum(f32(wq * q))

        sumqx, sumq2 = sums(f32(1.0 / f32(-big / -127.0)))
        d = np.where(sumq2 > 0, f32(sumqx / sumq2), 0.0)
        best = f32(d * sumqx)
        for itry in range(-7, 8):
            sumqx, sumq2 = sums(f32((itry - 127) / big))
            take = (sumq2 > 0) & (f32(sumqx * sumqx) > f32(best * sumq2))
            d = np.where(take, f32(sumqx / sumq2), d)
            best = np.where(take, f32(d * sumqx), best)
    return np.where(np.abs(big) < f32(1e-15), 0.0, d)


def ref_iq4_nl(x: np.ndarray) -> np.ndarray:
    """quantize_iq4_nl(quant_weights NULL) then dequantize_row_iq4_nl: fp16(d) * kvalues[best_index(x / d)]."""
    b = x.reshape(-1, 32)
    d = ref_iq4_scale(b)[:, None]
    idx = ref_best_index(f32(np.where(d != 0, ndiv(1.0, d), 0.0) * b))
    return f32(f16(d) * KV_IQ4[idx]).reshape(x.shape)


def ref_iq4_xs(x: np.ndarray) -> np.ndarray:
    """quantize_iq4_xs(quant_weights NULL) then dequantize_row_iq4_xs: 6-bit block scales l against d = -max / 32
    (codes from the float32 d * l), value fp16(d) * l * kvalues[code]."""
    b = x.reshape(-1, 8, 32)
    scales = ref_iq4_scale(b.reshape(-1, 32)).reshape(-1, 8)
    j = np.argmax(np.abs(scales), 1)
    max_scale = np.where(np.abs(scales).max(1) > 0, scales[np.arange(scales.shape[0]), j], 0.0)[:, None]
    d = f32(-max_scale / 32)
    ls = np.clip(nearest_int(f32(np.where(d != 0, ndiv(1.0, d), 0.0) * scales)), -32, 31)
    dl = f32(d * ls)[..., None]
    idx = ref_best_index(f32(np.where(dl != 0, ndiv(1.0, dl), 0.0) * b))
    return f32(f32(f16(d) * ls)[..., None] * KV_IQ4[idx]).reshape(x.shape)


KX2 = {"q4_k": (15, -1.0, 0.1, 20), "q5_k": (31, -0.5, 0.1, 15)}


def reference(x: torch.Tensor, fmt: str, block_size: int | None = None) -> np.ndarray:
    a = x.double().numpy()
    if fmt.startswith("uint"):
        k = int(re.match(r"uint(\d)", fmt).group(1))
        group = block_size or (None if fmt.endswith("_pc") else 128)
        return ref_asym(a, k, group)
    if fmt.startswith("nf4"):
        return ref_nf4(a, block_size or 64, fmt == "nf4_dq")
    if fmt == "q8_0":
        return ref_q8_0(a)
    if fmt == "q5_0":
        return ref_q5_0(a)
    if fmt == "q5_1":
        return ref_q5_1(a)
    if fmt == "q4_0":
        return ref_q5_0(a, half=8)
    if fmt == "q4_1":
        return ref_q5_1(a, top=15)
    if fmt == "q6_k":
        return ref_q6_k(a)
    if fmt == "q3_k":
        return ref_q3_k(a)
    if fmt == "q2_k":
        return ref_q2_k(a)
    if fmt == "iq4_nl":
        return ref_iq4_nl(a)
    if fmt == "iq4_xs":
        return ref_iq4_xs(a)
    return ref_q45_k(a, *KX2[fmt])


# ------------------------------------------------------------------------------------------------- data


def edge_cases(rows: int = 16, n: int = 512, seed: int = 0) -> torch.Tensor:
    """Random rows of varying magnitude plus: all-zero blocks and rows, a single outlier, negative-only and
    positive-only rows, exact ties on a coarse grid, constant rows, tiny values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    x[0, 3] = 60.0  # one outlier
    x[1] = -x[1].abs()  # negative only
    x[2] = x[2].abs()  # positive only
    x[3] = 0.0  # an all-zero row (every block zero)
    x[4, 32:96] = 0.0  # zero sub-blocks and a zero NF4 block
    x[5] = torch.randint(-16, 17, (n,), generator=g).float() / 8  # ties: multiples of 1/8
    x[6] = 0.375  # constant positive
    x[7] = -0.625  # constant negative
    x[8] *= 1e-4  # tiny
    x[9, ::7] = 0.0
    x[10, :256] = torch.randint(-2, 3, (min(n, 256),), generator=g).float()  # few distinct values, ties
    return x


DATA = [edge_cases(seed=s) for s in range(3)] + [torch.randn(8, 1024, generator=torch.Generator().manual_seed(7))]


# ------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("fmt", SHIPPED)
def test_bit_identical_to_reference(fmt):
    for i, x in enumerate(DATA):
        assert_bits_equal(fake_quantize(x, fmt), reference(x, fmt), f"{fmt} data {i}")
        assert_bits_equal(fake_quantize_reference(x, fmt), reference(x, fmt), f"{fmt} data {i} (reference path)")


@pytest.mark.parametrize("fmt,block", [("uint4", 32), ("uint4", 64), ("uint3", 200), ("uint8", 48), ("nf4", 32),
                                       ("nf4", 128), ("nf4_dq", 32), ("uint4_pc", 64)])
def test_bit_identical_other_blocks(fmt, block):
    x = edge_cases(rows=12, n=200, seed=3)  # 200: a shorter last group / block
    assert_bits_equal(fake_quantize(x, fmt, block_size=block), reference(x, fmt, block), f"{fmt} block {block}")


def test_nf4_dq_runs_cross_rows():
    # 300 rows x 1 block: the 256-absmax runs of double quantization span rows (bitsandbytes blocks the flat tensor)
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.1, 3, 300)[:, None]
    assert_bits_equal(fake_quantize(x, "nf4_dq"), reference(x, "nf4_dq"), "nf4_dq 300 rows")


def test_dynamic_map_matches_description():
    ours = np.array(dynamic_map())
    assert ours.shape == (256,) and np.all(np.diff(ours) > 0)
    np.testing.assert_array_equal(ours, ref_dynamic_map())
    assert ours[0] == np.float32(-(1 - 0.9 / 128)) and ours[-1] == 1.0 and 0.0 in ours
    # the smallest magnitudes: 10^-6 * 0.55 (the one midpoint of linspace(0.1, 1, 2))
    assert ours[128] == np.float32(0.55e-6) and ours[126] == np.float32(-0.55e-6)


@pytest.mark.skipif(not native.available(), reason="no C compiler: the torch search is the only path")
@pytest.mark.parametrize("fmt", ["q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_native_search_matches_torch(fmt, monkeypatch):
    # the C kernel's scale search (64 sub-blocks a pass) against the torch one, sub-block counts not a multiple of
    # 64; the one-pass types quantized whole by the C kernel against the torch path
    x = torch.cat([torch.randn(37, 1024, generator=torch.Generator().manual_seed(9)) * 3, edge_cases(n=1024, seed=11)])
    got = fake_quantize(x, fmt)
    assert_bits_equal(got, fake_quantize_reference(x, fmt).numpy(), f"{fmt} native vs torch")
    monkeypatch.setenv("QUANTPREDICT_FORMATS_BACKEND", "torch")
    assert not native.available()
    assert_bits_equal(fake_quantize(x, fmt), got.numpy(), f"{fmt} with the torch backend")


@pytest.mark.skipif(not native.available(), reason="no C compiler: the torch path is the only path")
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_native_one_pass_types_match_torch_across_the_fp16_range(fmt, monkeypatch):
    """Block scales from fp16's subnormals to its largest finite value, ties of the fp16 rounding, constant and
    all-zero blocks: the C kernel's values against the torch path's, bit for bit; a scale past 65504 raises the
    torch path's error either way."""
    g = torch.Generator().manual_seed(3)
    mags = torch.logspace(-9, 3.5, 400, dtype=torch.float64).to(torch.float32)
    x = torch.randn(400, 32, generator=g) * mags[:, None]
    ties = (torch.arange(1, 65, dtype=torch.float32) * 2.0**-24 + 2.0**-25)  # fp16 subnormal midpoints as scales
    x = torch.cat([x, ties[:, None] * torch.linspace(-8, 7, 32)[None], torch.zeros(3, 32), torch.full((3, 32), 2.5),
                   torch.full((1, 32), 65_500.0 if fmt in ("q4_1", "q5_1") else 524_000.0)])  # rounds to 65504
    big = {"q4_0": 524_300.0, "q5_0": 1_048_600.0, "q8_0": 8_400_000.0}.get(fmt)
    got = fake_quantize(x, fmt)
    monkeypatch.setenv("QUANTPREDICT_FORMATS_BACKEND", "torch")
    assert not native.available()
    assert_bits_equal(got, fake_quantize(x, fmt).numpy(), f"{fmt} native vs torch")
    monkeypatch.delenv("QUANTPREDICT_FORMATS_BACKEND")
    if big is not None:  # a scale fp16 cannot hold: the torch path's FormatError through the native one too
        with pytest.raises(FormatError, match="fp16"):
            fake_quantize(torch.full((1, 32), big), fmt)


@pytest.mark.skipif(not native.available(), reason="no C compiler: the torch path is the only path")
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_native_one_pass_reductions_keep_the_scans_element(fmt, monkeypatch):
    """The C kernel reduces each block's max |x|, min and max in 16 lanes and takes the element back from a scan
    (which matters for Q4_0/Q5_0's signed largest element and Q4_1/Q5_1's signed-zero min and max): blocks whose
    largest magnitude comes as +a and -a in either order, several times, and blocks of non-negative or non-positive
    values with zeros of both signs, bit for bit against the torch path's sequential semantics."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(64):
        b = torch.randn(32, generator=g) * 0.5
        a = 2.0 + i / 64
        idx = torch.randperm(32, generator=g)[:4]
        b[idx] = torch.tensor([a, -a, a, -a]) * (1 if i % 2 else -1)  # ties of the largest magnitude, both signs
        rows.append(b)
        z = torch.rand(32, generator=g)
        zidx = torch.randperm(32, generator=g)[:6]
        z[zidx] = torch.tensor([0.0, -0.0, 0.0, -0.0, -0.0, 0.0]) if i % 2 else torch.tensor([-0.0, 0.0] * 3)
        rows += [z, -z]  # min (or max) is a zero: which sign the scan keeps shows in Q4_1/Q5_1's stored min
    rows += [torch.full((32,), -0.0), torch.tensor([-0.0, 0.0] * 16), torch.tensor([0.0, -0.0] * 16)]
    x = torch.stack(rows)
    got = fake_quantize(x, fmt)
    monkeypatch.setenv("QUANTPREDICT_FORMATS_BACKEND", "torch")
    assert not native.available()
    assert_bits_equal(got, fake_quantize(x, fmt).numpy(), f"{fmt} native vs torch")


@pytest.mark.skipif(not native.available(), reason="no C compiler: the torch path is the only path")
@pytest.mark.parametrize("threads", [1, 2])
def test_one_pass_with_sums_is_the_kernel_and_squared_sums_bit_for_bit(threads):
    """``ggml_legacy_with_sums`` (round, then both squared sums in the same pass, into a reused buffer) gives the
    rounding of ``fake_quantize`` and the sums of ``squared_sums`` exactly, over several threads' chunks."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 1024, generator=g) * 0.05  # 307 200 elements: 5 chunks of native.SUM_CHUNK
    buf = torch.full((400 * 1024,), float("nan"))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for fmt in native.LEGACY_KINDS:
            y, sx, sd = native.ggml_legacy_with_sums(x, fmt, out=buf)
            assert y.data_ptr() == buf.data_ptr() and y.shape == x.shape
            assert_bits_equal(y, fake_quantize(x, fmt).numpy(), f"{fmt} with sums")
            assert (sx, sd) == native.squared_sums(x, y)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(not native.available(), reason="no C compiler: the torch path is the only path")
def test_the_kernels_sums_do_not_depend_on_the_thread_count():
    """The partial sums run over fixed chunks (``native.SUM_CHUNK``) whatever the thread count, so a layer's relative
    error is the same number on the direct path (the kernel's own thread count) and the model path (torch's)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(700, 1024, generator=g)  # 11 chunks, the last one short
    y = torch.empty_like(x)
    sums = {t: native.whole_sums_at(x.data_ptr(), y.data_ptr(), x.numel(), "q4_0", t) for t in (1, 2, 3, 7)}
    assert len(set(sums.values())) == 1, sums
    plain = {t: native.squared_sums_at(x.data_ptr(), y.data_ptr(), x.numel(), t) for t in (1, 2, 5)}
    assert set(plain.values()) == {sums[1]}


@pytest.mark.skipif(not native.available(), reason="no C compiler: the torch path is the only path")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", ["q3_k", "q4_k", "q5_k", "q6_k"])
def test_whole_k_kernels_are_the_torch_path_bit_for_bit(fmt, threads):
    """``whole_sums_at`` for the K types (the C kernels that quantize them whole: the sub-block search, then the
    super-block scales, codes and dequantization) against the torch path of ``formats.ggml``
    (``use_native=False``): normal rows with per-row scales, a zero super-block, zero sub-blocks of both signs (the
    search's codes kept where d = 0), super-blocks whose sub-blocks are each other's negatives (ties of the largest
    |scale| with both signs), non-negative super-blocks (every Q4_K/Q5_K min -0), a constant super-block,
    half-integer grids, tiny and large values; the sums are ``squared_sums``'; a scale fp16 cannot hold is None."""
    from quantpredict.formats.ggml import fake_quantize_blocks

    g = torch.Generator().manual_seed(7)
    x = torch.randn(96, 1024, generator=g) * torch.exp(torch.randn(96, 1, generator=g))
    x[0, :256] = 0.0
    x[1, 16:48] = -0.0
    x[2, 256:512] = torch.cat([x[2, 256:384], -x[2, 256:384]])  # sub-block scales +s and -s
    x[3, 512:768] = torch.cat([-x[3, 512:640], x[3, 512:640]])  # the same, the other sign first
    x[4] = torch.round(x[4] * 2) / 2
    x[5] *= 1e-20
    x[6, 7] = 3e4
    x[7] = x[7].abs()
    x[8, :256] = torch.clamp_min(x[8, :256], 0.0)  # non-negative, with zeros
    x[9, :256] = 1.0
    x[10, :32] = 3.0
    y = torch.full_like(x, float("nan"))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        sums = native.whole_sums_at(x.data_ptr(), y.data_ptr(), x.numel(), fmt, threads)
        ref = fake_quantize_blocks(x.reshape(96, 4, 256), get_format(fmt), use_native=False).reshape(x.shape)
        assert_bits_equal(y, ref.numpy(), f"{fmt} whole vs torch")
        assert sums == native.squared_sums(x, ref)
    finally:
        torch.set_num_threads(saved)
    big = torch.full((1, 256), 1e9)
    big[0, :128] = -1e9  # Q4_K/Q5_K: a range the 6-bit scales times fp16 cannot hold either
    assert native.whole_sums_at(big.data_ptr(), torch.empty_like(big).data_ptr(), 256, fmt, 1) is None


# --------------------------------------------------------------------------------- gguf byte layouts


def test_ggml_type_ids():
    # every llama.cpp layout of the table, with the type id a GGUF file stores for it (gguf-py's enum)
    assert set(GGML_TYPE_ID) == set(GGML) == {f for f in list_formats() if get_format(f).family == "ggml"}
    assert all(GGML_TYPE_ID[f] == int(GGUF_TYPE[f]) for f in GGML)


@pytest.mark.parametrize("fmt", GGML)
def test_gguf_dequantizer_matches(fmt):
    for i, x in enumerate(DATA):
        packed = to_gguf_bytes(x, fmt)
        block, size = gguf.GGML_QUANT_SIZES[GGUF_TYPE[fmt]]
        assert packed.dtype == np.uint8 and packed.shape == (x.shape[0], x.shape[1] // block * size)
        y = gguf.quants.dequantize(packed, GGUF_TYPE[fmt])
        assert_bits_equal(fake_quantize(x, fmt), y, f"{fmt} vs gguf.dequantize, data {i}")


@pytest.mark.parametrize("fmt", ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1"])
def test_gguf_quantize_agrees(fmt):
    # gguf-py implements the quantizers of Q8_0, Q5_0, Q5_1, Q4_0 and Q4_1 (as the reference functions do): same
    # bytes
    for x in DATA:
        np.testing.assert_array_equal(to_gguf_bytes(x, fmt), gguf.quants.quantize(x.numpy(), GGUF_TYPE[fmt]))


@pytest.mark.parametrize("fmt", ["q4_k", "q5_k", "q6_k"])
def test_gguf_has_no_k_quantizer(fmt):
    # gguf 0.19 only dequantizes the k-quants: the codes are checked against llama.cpp itself in
    # test_llama_cpp_reference (optional) and, through the float64 reference above, against its description
    with pytest.raises(NotImplementedError):
        gguf.quants.quantize(DATA[0].numpy(), GGUF_TYPE[fmt])


_NO_ORACLE = ggml_oracle.why_unavailable()


def oracle_data() -> list[torch.Tensor]:
    """The edge cases above, 1M normal values with per-row scales (1024 rows of 1024, scales e^N(0, 1)), and rows
    whose first 32 values are 1000x the rest: beside that sub-block, the others' 6-bit scales round to 0, and
    llama.cpp stores for them the codes its scale search left (Qwen2.5-Coder-1.5B's blk.4.ffn_down has such a
    super-block; the project wrote 0 there until 2026-12-08)."""
    g = torch.Generator().manual_seed(30)
    big = torch.randn(1024, 1024, generator=g) * torch.exp(torch.randn(1024, 1, generator=g))
    outlier = torch.randn(64, 512, generator=g) * 0.01
    outlier[:, :32] *= 1000
    return [*DATA, big, outlier]


@pytest.mark.llama_cpp
@pytest.mark.skipif(_NO_ORACLE is not None, reason=str(_NO_ORACLE))
@pytest.mark.parametrize("fmt", GGML)
def test_llama_cpp_reference(fmt):
    # llama.cpp's own quantizer (quantize_row_*_ref; quantize_iq4_* for the IQ4 types) through ctypes, built without
    # FMA contraction (GCC's default with -march=native contracts, and then the k-quant searches differ in a few
    # percent of values): identical bytes, and its dequantizer gives fake_quantize's values
    lib = ggml_oracle.library()
    block, size = gguf.GGML_QUANT_SIZES[GGUF_TYPE[fmt]]
    for i, x in enumerate(oracle_data()):
        want = ggml_oracle.quantize(lib, fmt, x.numpy(), block, size)
        got = to_gguf_bytes(x, fmt)
        same = (got.reshape(-1, size) == want.reshape(-1, size)).all(1)
        assert same.all(), f"{fmt} data {i}: {int((~same).sum())} of {same.size} blocks differ from llama.cpp"
        y = ggml_oracle.dequantize(lib, fmt, want, x.shape[1])
        assert_bits_equal(fake_quantize(x, fmt), y, f"{fmt} vs llama.cpp's dequantizer, data {i}")


# ------------------------------------------------------------------------------------- hand-computed values


def test_hand_uint4():
    # xmin -1, xmax 2: scale 3/15 = 0.2, zero round(1/0.2) = 5; q = round(x/0.2) + 5 = 0, round(2.5)=2 -> 7, 15,
    # round(1.25)=1 -> 6; values fp16(0.2) * (q - 5), fp16(0.2) = 0.199951171875
    x = torch.tensor([[-1.0, 0.5, 2.0, 0.25]])
    s16 = 0.199951171875
    assert fake_quantize(x, "uint4_pc").tolist() == [[-5 * s16, 2 * s16, 10 * s16, 1 * s16]]
    p = fit_params(x, "uint4_pc")
    assert p["zero"].tolist() == [[5.0] * 4] and p["scale16"][0, 0].item() == s16
    # all non-negative: xmin is clamped to 0, zero point 0: 0, 1, 2, 3 -> scale 3/15, q = 0, 5, 10, 15
    assert fake_quantize(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), "uint4_pc").tolist() == [[0, 5 * s16, 10 * s16,
                                                                                          15 * s16]]


def test_hand_nf4():
    # absmax 1: -0.5 is nearer -0.52507 (0.025) than -0.39492 (0.105); 0.1 nearer 0.07958 than 0.16093
    x = torch.tensor([[1.0, -0.5, 0.1, 0.0]])
    assert fake_quantize(x, "nf4", block_size=4).tolist() == [[1.0, NF4[2], NF4[8], 0.0]]
    assert fake_quantize(2 * x, "nf4", block_size=4).tolist() == [[2.0, 2 * NF4[2], 2 * NF4[8], 0.0]]


def test_hand_q8_0():
    # amax 127: d = 1, 1/d = 1; roundf rounds halves away from zero (0.5 -> 1, -0.5 -> -1, 2.5 -> 3)
    x = torch.zeros(1, 32)
    x[0, :5] = torch.tensor([127.0, 0.5, -0.5, 2.5, 1.49])
    assert fake_quantize(x, "q8_0")[0, :5].tolist() == [127.0, 1.0, -1.0, 3.0, 1.0]
    # d = 1000/127 is stored as fp16: values are multiples of fp16(d) = 7.875
    x[0, 0] = 1000.0
    y = fake_quantize(x, "q8_0")[0]
    assert y[0].item() == 127 * 7.875 and y[4].item() == 0.0


def test_hand_q5_0_and_q5_1():
    # Q5_0: the largest |x| is -1.6, d = -1.6 / -16 = 0.1, codes x / d + 16.5 truncated: -1.6 -> 0, 0.8 -> 24, 0 -> 16,
    # and +1.6 -> 32.5 -> 31 (the positive end is one code short: Q5_0's grid is -16..15 steps of d)
    d16 = float(np.float16(np.float32(0.1)))
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([-1.6, 0.8, 0.0, 1.6])
    y = fake_quantize(x, "q5_0")[0, :4].tolist()
    assert y == [float(np.float32(-16 * d16)), float(np.float32(8 * d16)), 0.0, float(np.float32(15 * d16))]
    # Q5_1: min 0, max 3.1, d = 0.1; 1.26 -> 12.6 + 0.5 -> 13 (truncation after adding a half: round half up)
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([3.1, 1.26, 0.0])
    y = fake_quantize(x, "q5_1")[0, :3].tolist()
    assert y == [float(np.float32(31 * d16)), float(np.float32(13 * d16)), 0.0]


def test_hand_q4_0_and_q4_1():
    # Q4_0: the largest |x| is -0.8, d = -0.8 / -8 = 0.1; codes x / d + 8.5 truncated: -0.8 -> 0, 0.44 -> 12.9 -> 12,
    # 0 -> 8, +0.8 -> 16.5 -> 15 (one code short at the positive end, as Q5_0), -0.25 -> 6.0 -> 6 (-2.5 rounds up)
    d16 = float(np.float16(np.float32(0.1)))
    x = torch.zeros(1, 32)
    x[0, :5] = torch.tensor([-0.8, 0.44, 0.0, 0.8, -0.25])
    y = fake_quantize(x, "q4_0")[0, :5].tolist()
    assert y == [float(np.float32(k * d16)) for k in (-8, 4, 0, 7, -2)]
    # Q4_1: min -0.5, max 1.0, d = 0.1; 0.26 -> 7.6 + 0.5 -> 8 (8.1 truncated); fp16(min) = -0.5 exactly
    x = torch.full((1, 32), 0.25)
    x[0, :3] = torch.tensor([-0.5, 1.0, 0.26])
    y = fake_quantize(x, "q4_1")[0, :3].tolist()
    assert y == [-0.5, float(np.float32(np.float32(15 * d16) - 0.5)), float(np.float32(np.float32(8 * d16) - 0.5))]


def test_hand_q4_k_constant_sub_blocks():
    # every sub-block constant at c >= 0: make_qkx2 sets min = 0, the search keeps scale c/15 (codes 15),
    # max_scale/63 -> d; sub-block scale codes 63 for the largest; min 0 -> values 15 * d * 63 * ...
    x = torch.full((1, 256), 0.75)
    y = fake_quantize(x, "q4_k")
    d = float(np.float16(np.float32(np.float32(0.75 / 15) / 63)))
    assert torch.all(y == np.float32(np.float32(d * 63) * 15))


# ------------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("fmt", [*SHIPPED, "int4", "mxfp4_e2m1", "fp8_e4m3", "mxint8", "bf16"])
def test_params_api_matches_fake_quantize(fmt):
    x = DATA[0]
    p = fit_params(x, fmt)
    assert all(t.shape == x.shape for t in p.tensors.values())
    assert torch.equal(quantize_with_params(x, p).view(torch.int32), fake_quantize(x, fmt).view(torch.int32))
    # any column slice with its parameters narrowed alike (GPTQ's use)
    cols = torch.cat([quantize_with_params(x[:, j : j + 1], p.narrow(-1, j, 1)) for j in range(256, 320)], 1)
    assert torch.equal(cols, fake_quantize(x, fmt)[:, 256:320])


TIE_ROWS = (5, 10)  # rows of edge_cases() on a coarse grid: groups whose -min/scale and max/scale are exact ties


@pytest.mark.parametrize("fmt", ["uint4", "uint3_pc", "uint8", "uint2", "nf4", "q8_0"])
def test_idempotent(fmt):
    keep = [r for r in range(16) if r not in TIE_ROWS]
    for x in [d[keep] if d.shape[0] == 16 else d for d in DATA]:
        y = fake_quantize(x, fmt)
        assert torch.equal(fake_quantize(y, fmt), y)


def test_uint_not_idempotent_on_symmetric_ties():
    # AutoGPTQ's min/max quantizer is not a projection: for max = -min, -min/scale = max/scale = 7.5 up to an ulp,
    # both round down (zero 7, top code 14), code 15 goes unused, and requantizing refits a smaller scale
    x = torch.tensor([[-2.0, 2.0, 0.5]])
    y = fake_quantize(x, "uint4_pc")
    assert y[0, 1].item() == -y[0, 0].item() == 7 * 0.2666015625
    assert not torch.equal(fake_quantize(y, "uint4_pc"), y)


@pytest.mark.parametrize("fmt,moved_max", [("nf4_dq", 1.0), ("q4_k", 0.05), ("q5_k", 0.1), ("q6_k", 0.05)])
def test_requantizing_is_nearly_a_fixed_point(fmt, moved_max):
    # Not exactly idempotent: nf4_dq refits its mean on the dequantized absmaxes (on random rows most values move,
    # by < 1e-3 relative; blocks far below their run's largest absmax move more), and llama.cpp's k-quant search
    # scores candidate scales with weights from the values themselves (measured: q4_k and q6_k keep random rows
    # fixed but not every outlier or tiny row, q5_k moves ~2% of values). The error barely changes.
    rand = torch.randn(64, 1024, generator=torch.Generator().manual_seed(5))
    for x in [*DATA, rand]:
        y = fake_quantize(x, fmt)
        yy = fake_quantize(y, fmt)
        assert (yy != y).float().mean().item() <= moved_max
        assert ((yy - x) ** 2).mean() <= 1.1 * ((y - x) ** 2).mean()
        if fmt == "nf4_dq" and x is rand:
            assert ((yy - y).abs() <= 1e-3 * y.abs()).all()


@pytest.mark.parametrize("fmt", SHIPPED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_shape_dtype(fmt, dtype):
    x = DATA[1][:4].to(dtype)
    y = fake_quantize(x, fmt)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, fake_quantize(x.float(), fmt).to(dtype))
    z = torch.zeros(0, 256, dtype=dtype)
    assert fake_quantize(z, fmt).shape == (0, 256)


@pytest.mark.parametrize("fmt", ["uint4", "nf4_dq", "q4_k", "q6_k", "q8_0"])
def test_axes_and_3d(fmt):
    x = torch.randn(3, 256, 5, generator=torch.Generator().manual_seed(6))
    y = fake_quantize(x, fmt, axis=1)
    assert torch.equal(y, fake_quantize(x.movedim(1, -1).contiguous(), fmt).movedim(-1, 1))
    w = torch.randn(512, 40, generator=torch.Generator().manual_seed(8))
    assert torch.equal(fake_quantize(w, fmt, axis=0), fake_quantize(w.t().contiguous(), fmt).t())
    p = fit_params(x, fmt, axis=1)
    assert torch.equal(quantize_with_params(x, p), y)


@pytest.mark.parametrize("fmt", SHIPPED)
def test_non_finite_input(fmt):
    x = torch.ones(4, 256)
    x[0, 3] = math.nan
    x[2, 255] = math.inf
    x[3, 0] = -math.inf
    for fn in (fake_quantize, fake_quantize_reference, fit_params):
        with pytest.raises(FormatError, match="1 NaN and 2 Inf") as info:
            fn(x, fmt)
        assert isinstance(info.value, ValueError)


def test_layout_errors():
    with pytest.raises(FormatError, match=r"multiple of 256.*300.*q5_0"):
        fake_quantize(torch.ones(2, 300), "q4_k")
    with pytest.raises(FormatError, match="multiple of 32"):
        fake_quantize(torch.ones(2, 40), "q8_0")
    for fmt in ("q3_k", "q2_k"):  # llama.cpp stores both as Q4_0 when the rows are not a multiple of 256
        with pytest.raises(FormatError, match=r"multiple of 256.*288.*as q4_0"):
            fake_quantize(torch.ones(2, 288), fmt)
    with pytest.raises(FormatError, match=r"multiple of 256.*288.*as iq4_nl"):
        fake_quantize(torch.ones(2, 288), "iq4_xs")
    with pytest.raises(FormatError, match="blocks of 256 elements"):
        fake_quantize(torch.ones(2, 512), "q6_k", block_size=128)
    assert torch.equal(fake_quantize(torch.ones(2, 512), "q6_k", block_size=256), fake_quantize(torch.ones(2, 512),
                                                                                               "q6_k"))
    with pytest.raises(FormatError, match="block_size"):
        fake_quantize(torch.ones(2, 64), "uint4", block_size=0)
    with pytest.raises(FormatError, match="fp16"):
        fake_quantize(torch.full((1, 32), 1e7), "q8_0")  # d = 1e7 / 127 overflows fp16
    with pytest.raises(FormatError, match="fp16"):
        fake_quantize(torch.tensor([[-1e9, 1e9]]), "uint4_pc")
    with pytest.raises(FormatError, match="fit_params"):
        compute_scale(torch.ones(2, 64), "nf4")
    with pytest.raises(FormatError, match="fit_params"):
        quantize_with_scale(torch.ones(2, 64), "uint4", torch.ones(2, 1))
    with pytest.raises(FormatError, match="floating-point"):
        fake_quantize(torch.ones(2, 256, dtype=torch.int32), "q4_k")


def test_names_and_bits():
    for name in list_formats():
        assert re.fullmatch(r"[a-z0-9_]+", name) and not re.search(r"_b\d+$", name), name
    assert get_format("q4_k").bits_per_element() == 4.5
    assert get_format("q5_k").bits_per_element() == 5.5
    assert get_format("q6_k").bits_per_element() == 6.5625
    assert get_format("q8_0").bits_per_element(row_length=4096) == 8.5
    assert get_format("q5_0").bits_per_element() == 5.5 and get_format("q5_1").bits_per_element() == 6.0
    assert get_format("q4_0").bits_per_element() == 4.5 and get_format("q4_1").bits_per_element() == 5.0
    assert get_format("q3_k").bits_per_element() == 110 * 8 / 256  # block_q3_K: 110 bytes per 256 = 3.4375
    assert get_format("q2_k").bits_per_element() == 84 * 8 / 256  # block_q2_K: 84 bytes per 256 = 2.625
    assert get_format("iq4_nl").bits_per_element() == 4.5  # block_iq4_nl: 18 bytes per 32
    assert get_format("iq4_xs").bits_per_element() == 136 * 8 / 256  # block_iq4_xs: 136 bytes per 256 = 4.25
    assert get_format("nf4").bits_per_element() == 4.5
    assert get_format("nf4").bits_per_element(128) == 4 + 32 / 128
    assert get_format("nf4_dq").bits_per_element() == 4 + 8 / 64 + 32 / (64 * 256)
    assert abs(get_format("nf4_dq").bits_per_element() - 4.127) < 1e-3
    assert get_format("uint4").bits_per_element() == 4 + (16 + 4) / 128  # fp16 scale + 4-bit zero per group
    assert get_format("uint4").bits_per_element(32) == 4 + 20 / 32
    assert get_format("uint3").bits_per_element(128, row_length=200) == 3 + 2 * 19 / 200  # short last group
    assert get_format("uint4_pc").bits_per_element(row_length=4096) == 4 + 20 / 4096
    assert get_format("uint8_pc").bits_per_element() == 8
    assert get_format("uint4").default_block_size == 128 and get_format("uint4_pc").default_block_size is None
    with pytest.raises(FormatError, match="blocks of 256"):
        get_format("q4_k").bits_per_element(128)
    with pytest.raises(FormatError, match="multiple of 256"):
        get_format("q4_k").bits_per_element(row_length=300)


def test_cli_lists_shipped_formats(capsys):
    assert cli_main(["formats"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln and ln.split()[0] in SHIPPED}
    assert set(lines) == set(SHIPPED)
    assert "4.5000" in lines["q4_k"] and "6.5625" in lines["q6_k"] and "8.5000" in lines["q8_0"]
    assert "4.1270" in lines["nf4_dq"] and "4.1562" in lines["uint4"] and "4.0049" in lines["uint4_pc"]


# ------------------------------------------------------------------------------------------------------ GPTQ


def _on_grid(q: torch.Tensor, fmt: str, p) -> bool:
    """Every value of ``q`` is the dequantized value of a valid code under the parameters ``p`` it was rounded
    with (checked from the stored values, independently of the quantizer)."""
    f = get_format(fmt)
    v = q.double().numpy()
    t = {k: x.double().numpy() for k, x in p.tensors.items()}
    if f.family == "asym":
        m = np.rint(v / t["scale16"])
        ok = (f32(t["scale16"] * m) == v) & (m + t["zero"] >= 0) & (m + t["zero"] <= 2**f.element_bits - 1)
    elif f.family == "nf4":
        ok = (f32(NF4 * t["absmax"][..., None]) == v[..., None]).any(-1)
    elif fmt == "q8_0":
        m = np.rint(ndiv(v, t["d"]))
        ok = (f32(m * t["d"]) == v) & (np.abs(m) <= 127)
    elif fmt.startswith("iq4"):
        ok = (f32(t["d"][..., None] * KV_IQ4) == v[..., None]).any(-1)
    elif fmt in ("q6_k", "q3_k"):
        half = 32 if fmt == "q6_k" else 4
        m = np.rint(ndiv(v, t["d"]))
        ok = (f32(t["d"] * m) == v) & (m >= -half) & (m <= half - 1)
    elif fmt in ("q5_0", "q4_0"):
        half = 16 if fmt == "q5_0" else 8
        m = np.rint(ndiv(v, t["d"]))
        ok = (f32(m * t["d"]) == v) & (m >= -half) & (m <= half - 1)
    elif fmt in ("q5_1", "q4_1"):
        m = np.rint(ndiv(v - t["m"], t["d"]))
        ok = (f32(f32(t["d"] * m) + t["m"]) == v) & (m >= 0) & (m <= (31 if fmt == "q5_1" else 15))
    else:
        m = np.rint(ndiv(v + t["dm"], t["d"]))
        ok = (f32(f32(t["d"] * m) - t["dm"]) == v) & (m >= 0) & (m <= (3 if fmt == "q2_k" else KX2[fmt][0]))
    return bool(ok.all())


def _problem(rows=32, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(cols, 2048, generator=g) * torch.linspace(0.2, 3, cols)[:, None]
    x = x + 0.6 * x.roll(1, 0)  # correlated inputs: where GPTQ's updates help
    return w, 2 * x @ x.T / x.shape[1]


@pytest.mark.parametrize("fmt", SHIPPED)
def test_gptq_on_grid_and_better_than_rtn(fmt):
    w, h = _problem()
    q, p = gptq_quantize(w, h, fmt, return_params=True)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert _on_grid(q, fmt, p)
    assert layer_output_error(w, q, h) <= layer_output_error(w, fake_quantize(w, fmt), h)


@pytest.mark.parametrize("fmt", ["uint4", "q4_k", "nf4_dq"])
def test_gptq_act_order(fmt):
    w, h = _problem(rows=16, seed=1)
    q, p = gptq_quantize(w, h, fmt, act_order=True, return_params=True)
    assert _on_grid(q, fmt, p)
    assert layer_output_error(w, q, h) <= layer_output_error(w, fake_quantize(w, fmt), h)


def test_gptq_identity_hessian_is_rtn_for_fixed_params():
    # with H = I no error propagates: every group is fitted on the original values, so GPTQ is RTN exactly
    w, _ = _problem(rows=8, cols=256)
    for fmt in ("uint4", "nf4", "q4_k", "q6_k", "q8_0"):
        assert torch.equal(gptq_quantize(w, torch.eye(256), fmt, percdamp=0.0), fake_quantize(w, fmt))


def test_gptq_layout_errors():
    w, h = _problem(rows=4, cols=300)
    with pytest.raises(FormatError, match="multiple of 256"):
        gptq_quantize(w, h, "q4_k")
