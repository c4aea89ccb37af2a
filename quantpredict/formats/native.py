"""A fused one-pass CPU kernel for fake quantization, compiled lazily with the system C compiler.

Why: the reference path makes ~15 passes over memory (abs, amax, frexp, clamp, pow2, divide, round, multiply, ...);
this kernel reads each block once into cache, finds its amax, and writes the quantized block, so a round trip costs
about what a ``clone()`` does. It is plain C called through ctypes (no torch headers), so it compiles in about a
second, once per machine: the shared library is cached under ``$QUANTPREDICT_CACHE`` (default
``~/.cache/quantpredict``), keyed by a hash of the source, the flags, the compiler and the CPU. If there is no
compiler or compilation fails, :func:`library` returns None and callers use the torch reference, which this kernel
matches bit for bit (tests/test_formats.py checks it). ``QUANTPREDICT_FORMATS_BACKEND=torch`` forces the reference.

It also quantizes llama.cpp's one-pass types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) whole (``qp_ggml_legacy``), and runs
llama.cpp's k-quant scale searches (``qp_kx2``, ``qp_qx``, ``qp_q3``), the slow part of
Q3_K/Q4_K/Q5_K/Q6_K quantization, 64 sub-blocks per vectorised pass; :mod:`quantpredict.formats.ggml` has the
same search in torch. For callers without torch (:mod:`quantpredict.checkpoint_rtn`) it also quantizes those four
K types whole (``qp_sub16_k``, ``qp_kx2_whole``: the search, then the torch path's super-block arithmetic),
through :func:`whole_sums_at`.

Exactness: all arithmetic is IEEE float32 without fast-math or FMA contraction. Rounding to the element grid uses
the add-and-subtract trick: for 0 <= a < 2^(e+1) and C = 2^(e - mbits + 23), (a + C) - C is a rounded to a multiple
of 2^(e - mbits), ties to even, by the FPU's own rounding, which equals ``torch.round(a / step) * step``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from quantpredict.formats.table import ELEMENTS, Format

if TYPE_CHECKING:
    from torch import Tensor

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* 2^k as float32, exact for k in [-149, 127] */
static inline float pow2f(int k) {
    return k >= -126 ? u2f((uint32_t)(k + 127) << 23) : u2f(1u << (k + 149));
}

/* Quantize one block x[0..len) into y. mx: the scale is the E8M0 power of two of the block amax; otherwise
   scale = amax / maxval. fp_elem: FP element (step depends on the exponent) or integer element (step 2^int_step).
   Returns 1 if the block holds a NaN or Inf. */
static inline int qblock(const float* restrict x, float* restrict y, int64_t len, int mx, int fp_elem, int mbits,
                         int emin, int emax, float maxval, int int_step) {
    uint32_t mb = 0;
    for (int64_t j = 0; j < len; j++) {
        uint32_t u = f2u(x[j]) & 0x7fffffffu;  /* for non-negative floats the integer order is the float order */
        mb = u > mb ? u : mb;
    }
    if (mb >= 0x7f800000u) return 1;
    float scale, inv;
    int divide = 0;
    if (mx) {
        int e = (int)(mb >> 23) - 127;          /* floor(log2 amax) for normal amax */
        int s = mb >= 0x00800000u ? e - emax : -127;  /* zero or subnormal amax: below the clamp anyway */
        s = s < -127 ? -127 : (s > 127 ? 127 : s);
        scale = pow2f(s);
        inv = pow2f(-s);                         /* x * 2^-s == x / 2^s exactly */
    } else {
        scale = u2f(mb) / maxval;
        inv = scale;
        divide = 1;
    }
    const float safe = scale == 0.0f ? 1.0f : scale;
    const float cint = pow2f(int_step + 23);
    for (int64_t j = 0; j < len; j++) {
        float v = divide ? x[j] / safe : x[j] * inv;
        uint32_t sign = f2u(v) & 0x80000000u;
        float a = u2f(f2u(v) & 0x7fffffffu);
        a = a < maxval ? a : maxval;
        float c;
        if (fp_elem) {
            int e = (int)(f2u(a) >> 23) - 127;
            e = e < emin ? emin : e;
            c = u2f((uint32_t)(e - mbits + 23 + 127) << 23);
        } else {
            c = cint;
        }
        float r = (a + c) - c;
        y[j] = u2f(f2u(r) | sign) * scale;
    }
    return 0;
}

/* x, y: [rows, n] contiguous; blocks of `block` along n (the last of each row may be shorter), numbered row by
   row; quantizes blocks t0 <= t < t1. Returns 1 if any of them holds a NaN or Inf (y is then unspecified). */
int qp_fake_quantize(const float* x, float* y, int64_t n, int64_t block, int64_t t0, int64_t t1, int mx,
                     int fp_elem, int mbits, int emin, int emax, float maxval, int int_step) {
    const int64_t nb = (n + block - 1) / block;
    int bad = 0;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t / nb, b = t % nb;
        const int64_t start = r * n + b * block;
        const int64_t len = (b == nb - 1) ? n - b * block : block;
        bad |= qblock(x + start, y + start, len, mx, fp_elem, mbits, emin, emax, maxval, int_step);
    }
    return bad;
}

/* ---- llama.cpp's one-pass types (ggml-quants.c quantize_row_q{4_0,4_1,5_0,5_1,8_0}_ref), quantized and
   dequantized in one pass (gguf-py's dequantization arithmetic), the same float32 operations in the same order as
   the torch path of quantpredict.formats.ggml (_fit_sym/_codes_sym, _fit_min/_codes_min, _fit_q8_0/_codes_q8_0). */

/* v rounded to fp16 (nearest, ties to even, subnormals kept) and back, by the add-and-subtract trick with
   fp16's 10 mantissa bits and emin -14; *ovf set where a finite v rounds beyond fp16's largest finite 65504 */
static inline float fp16_round(float v, int* ovf) {
    const uint32_t sign = f2u(v) & 0x80000000u;
    const float a = u2f(f2u(v) & 0x7fffffffu);
    int e = (int)(f2u(a) >> 23) - 127;
    e = e < -14 ? -14 : e;
    const float c = u2f((uint32_t)(e - 10 + 23 + 127) << 23);
    const float r = (a + c) - c;
    *ovf |= r > 65504.0f;
    return u2f(f2u(r) | sign);
}

/* The first of xb[0..31] equal to v (== compares -0 and +0 equal): a sequential scan's "strict < keeps the first"
   reduction (min, max, max |x|) only depends on the order through which zero it keeps, so the kernels below reduce
   in 16 lanes (vectorised) and take the element back from here. */
static inline float first_equal(const float* xb, float v) {
    int j = 0;
    while (j < 31 && xb[j] != v) j++;
    return xb[j];
}

/* sums[0..7] += x^2 and sums[8..15] += (y - x)^2 over one block, lane j % 8 of element j: the same additions in the
   same order as qp_sq_sums over a range starting at a multiple of 8 */
static inline void block_sq_sums(const float* restrict xb, const float* restrict yb, double* restrict sums) {
    for (int j = 0; j < 32; j += 8)
        for (int k = 0; k < 8; k++) {
            const double v = xb[j + k];
            const double d = (double)(yb[j + k] - xb[j + k]);
            sums[k] += v * v;
            sums[8 + k] += d * d;
        }
}

/* x, y: [nblocks, 32] contiguous and finite. kind: 0 Q4_0, 1 Q4_1, 2 Q5_0, 3 Q5_1, 4 Q8_0. Returns 1 where a block
   scale (or Q4_1/Q5_1 min) overflows fp16 (y is then unspecified: the caller raises through the torch path).
   sums (or NULL): [16] lanes of qp_sq_sums's two sums, added to block by block (quantize and measure the relative
   error in one pass). */
int qp_ggml_legacy(const float* restrict x, float* restrict y, int64_t nblocks, int kind, double* restrict sums) {
    int ovf = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        const float* restrict xb = x + b * 32;
        float* restrict yb = y + b * 32;
        float m[16];
        if (kind == 1 || kind == 3) {
            float n[16];
            for (int k = 0; k < 16; k++) {
                const float u = xb[k], v = xb[16 + k];
                m[k] = v < u ? v : u;
                n[k] = v > u ? v : u;
            }
            float lo = m[0], hi = n[0];
            for (int k = 1; k < 16; k++) {
                lo = m[k] < lo ? m[k] : lo;
                hi = n[k] > hi ? n[k] : hi;
            }
            lo = lo == 0.0f ? first_equal(xb, 0.0f) : lo;
            hi = hi == 0.0f ? first_equal(xb, 0.0f) : hi;
            const float top = kind == 1 ? 15.0f : 31.0f;
            const float d = (hi - lo) / top;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            const float d16 = fp16_round(d, &ovf), m16 = fp16_round(lo, &ovf);
            for (int j = 0; j < 32; j++) {
                float q = truncf((xb[j] - lo) * id + 0.5f);
                q = q < 0.0f ? 0.0f : (q > top ? top : q);
                q += 0.0f;
                yb[j] = q * d16 + m16;
            }
        } else {
            for (int k = 0; k < 16; k++) {
                const float u = fabsf(xb[k]), v = fabsf(xb[16 + k]);
                m[k] = v > u ? v : u;
            }
            float amax = m[0];
            for (int k = 1; k < 16; k++) amax = m[k] > amax ? m[k] : amax;
            if (kind == 4) {
                const float d = amax / 127.0f;
                const float id = d != 0.0f ? 1.0f / d : 0.0f;
                const float d16 = fp16_round(d, &ovf);
                for (int j = 0; j < 32; j++) {
                    const float v = xb[j] * id;
                    const float a = fabsf(v);
                    float q = floorf(a);
                    q += (a - q) >= 0.5f ? 1.0f : 0.0f;
                    q = copysignf(q, v);
                    q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
                    q += 0.0f;
                    yb[j] = q * d16;
                }
            } else {
                /* the element of largest |x|, the first of them (a zero block: +0, as the scan starting at 0 gives) */
                float big = 0.0f;
                if (amax > 0.0f) {
                    int j = 0;
                    while (j < 31 && fabsf(xb[j]) != amax) j++;
                    big = xb[j];
                }
                const float half = kind == 0 ? 8.0f : 16.0f, top = 2.0f * half - 1.0f;
                const float d = big / -half;
                const float id = d != 0.0f ? 1.0f / d : 0.0f;
                const float d16 = fp16_round(d, &ovf);
                for (int j = 0; j < 32; j++) {
                    float q = truncf(xb[j] * id + (half + 0.5f));
                    q = q < 0.0f ? 0.0f : (q > top ? top : q);
                    q += 0.0f;
                    yb[j] = (q - half) * d16;
                }
            }
        }
        if (sums != NULL) block_sq_sums(xb, yb, sums);
    }
    return ovf;
}

/* ---- llama.cpp k-quant scale searches (ggml-quants.c make_qkx2_quants / make_qx_quants, reference path) ----
   The same float32 operations in the same order as the C reference, for LANES sub-blocks at once: every loop over
   j < LANES is independent per lane, so the compiler vectorises across sub-blocks while each lane keeps the
   reference's sequential sums (no reassociation without -ffast-math; no FMA with -ffp-contract=off). */
#define LANES 64  /* sub-blocks per pass: 32 x 64 floats = 8 KB per array, in L1 */

static inline int32_t qp_nearest_int(float f) {
    float v = f + 12582912.0f;
    int32_t i;
    memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* x: [nsub, 32] row-major; scales, mins: [nsub]; codes (or NULL): [nsub, 32], the codes L the search leaves (as
   floats), which llama.cpp keeps where a sub-block's quantized scale is 0 */
void qp_kx2(const float* x, int64_t nsub, int nmax, float rmin, float rdelta, int nstep, float* scales,
            float* mins, float* codes) {
    for (int64_t s0 = 0; s0 < nsub; s0 += LANES) {
        const int64_t lanes = nsub - s0 < LANES ? nsub - s0 : LANES;
        float xs[32][LANES], w[32][LANES], best_l[32][LANES];
        float sum_x2[LANES], sum_w[LANES], sum_x[LANES], mn[LANES], mx[LANES], iscale[LANES], scale[LANES];
        float best[LANES], rng[LANES];
        int flat[LANES];
        for (int i = 0; i < 32; i++)
            for (int j = 0; j < LANES; j++) xs[i][j] = j < lanes ? x[(s0 + j) * 32 + i] : 0.0f;
        for (int j = 0; j < LANES; j++) sum_x2[j] = 0.0f;
        for (int i = 0; i < 32; i++)
            for (int j = 0; j < LANES; j++) sum_x2[j] += xs[i][j] * xs[i][j];
        for (int i = 0; i < 32; i++)
            for (int j = 0; j < LANES; j++) w[i][j] = sqrtf(sum_x2[j] / 32) + fabsf(xs[i][j]);
        for (int j = 0; j < LANES; j++) {
            mn[j] = xs[0][j]; mx[j] = xs[0][j]; sum_w[j] = w[0][j]; sum_x[j] = w[0][j] * xs[0][j];
        }
        for (int i = 1; i < 32; i++)
            for (int j = 0; j < LANES; j++) {
                mn[j] = xs[i][j] < mn[j] ? xs[i][j] : mn[j];
                mx[j] = xs[i][j] > mx[j] ? xs[i][j] : mx[j];
                sum_w[j] += w[i][j];
                sum_x[j] += w[i][j] * xs[i][j];
            }
        for (int j = 0; j < LANES; j++) {
            mn[j] = mn[j] > 0 ? 0.0f : mn[j];
            flat[j] = mx[j] == mn[j];
            iscale[j] = nmax / (mx[j] - mn[j]);
            scale[j] = 1 / iscale[j];
            best[j] = 0.0f;
        }
        for (int i = 0; i < 32; i++)
            for (int j = 0; j < LANES; j++) {
                int l = qp_nearest_int(iscale[j] * (xs[i][j] - mn[j]));
                l = l < 0 ? 0 : l;  /* two statements: a nested ?: stops GCC's vectoriser */
                l = l > nmax ? nmax : l;
                best_l[i][j] = (float)l;
                float diff = scale[j] * l + mn[j] - xs[i][j];
                best[j] += w[i][j] * (diff * diff);
            }
        for (int is = 0; is <= nstep; ++is) {
            const float num = rmin + rdelta * is + nmax;
            float sl[LANES], sl2[LANES], sxl[LANES], cur[LANES], ts[LANES], tm[LANES], D[LANES];
            float lv[32][LANES];
            for (int j = 0; j < LANES; j++) {
                rng[j] = mx[j] - mn[j];
                iscale[j] = num / rng[j];
                sl[j] = 0.0f; sl2[j] = 0.0f; sxl[j] = 0.0f; cur[j] = 0.0f;
            }
            for (int i = 0; i < 32; i++)
                for (int j = 0; j < LANES; j++) {
                    int l = qp_nearest_int(iscale[j] * (xs[i][j] - mn[j]));
                    l = l < 0 ? 0 : l;  /* two statements: a nested ?: stops GCC's vectoriser */
                l = l > nmax ? nmax : l;
                    const float fl = (float)l, wl = w[i][j] * fl;
                    lv[i][j] = fl;
                    sl[j] += wl;
                    sl2[j] += wl * fl;
                    sxl[j] += wl * xs[i][j];
                }
            for (int j = 0; j < LANES; j++) {
                D[j] = sum_w[j] * sl2[j] - sl[j] * sl[j];
                ts[j] = (sum_w[j] * sxl[j] - sum_x[j] * sl[j]) / D[j];
                tm[j] = (sl2[j] * sum_x[j] - sl[j] * sxl[j]) / D[j];
                const int pos = tm[j] > 0;
                ts[j] = pos ? sxl[j] / sl2[j] : ts[j];
                tm[j] = pos ? 0.0f : tm[j];
            }
            for (int i = 0; i < 32; i++)
                for (int j = 0; j < LANES; j++) {
                    float diff = ts[j] * lv[i][j] + tm[j] - xs[i][j];
                    cur[j] += w[i][j] * (diff * diff);
                }
            int better[LANES];
            for (int j = 0; j < LANES; j++) {
                better[j] = D[j] > 0 && cur[j] < best[j] && !flat[j];
                best[j] = better[j] ? cur[j] : best[j];
                scale[j] = better[j] ? ts[j] : scale[j];
                mn[j] = better[j] ? tm[j] : mn[j];
            }
            if (codes != NULL)
                for (int i = 0; i < 32; i++)
                    for (int j = 0; j < LANES; j++) best_l[i][j] = better[j] ? lv[i][j] : best_l[i][j];
        }
        for (int j = 0; j < lanes; j++) {
            scales[s0 + j] = flat[j] ? 0.0f : scale[j];
            mins[s0 + j] = -mn[j];
            if (codes != NULL)
                for (int i = 0; i < 32; i++) codes[(s0 + j) * 32 + i] = flat[j] ? 0.0f : best_l[i][j];
        }
    }
}

/* The sub-blocks s0 .. s0 + LANES of x [nsub, 16], position-major (xs[i][lane]; zeros past the last, whose lanes
   are never stored), with the reference's weights w = x*x and w*x, and each lane's first largest |x| (amax) with
   its sign (big), as the C loop's strict '>' finds it. */
static inline void load_sub16(const float* x, int64_t s0, int64_t lanes, float xs[16][LANES], float w[16][LANES],
                              float wx[16][LANES], float amax[LANES], float big[LANES]) {
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < LANES; j++) {
            xs[i][j] = j < lanes ? x[(s0 + j) * 16 + i] : 0.0f;
            w[i][j] = xs[i][j] * xs[i][j];
            wx[i][j] = w[i][j] * xs[i][j];
        }
    for (int j = 0; j < LANES; j++) { amax[j] = 0.0f; big[j] = 0.0f; }
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < LANES; j++) {
            const float ax = fabsf(xs[i][j]);
            const int gt = ax > amax[j];
            big[j] = gt ? xs[i][j] : big[j];
            amax[j] = gt ? ax : amax[j];
        }
}

/* make_qx_quants(16, 32, x, L, 1, NULL). x: [nsub, 16]; scales [nsub]; codes [nsub, 16] (L - 32, as floats) */
void qp_qx(const float* x, int64_t nsub, float* scales, float* codes) {
    const int nmax = 32;
    for (int64_t s0 = 0; s0 < nsub; s0 += LANES) {
        const int64_t lanes = nsub - s0 < LANES ? nsub - s0 : LANES;
        float xs[16][LANES], w[16][LANES], wx[16][LANES], best_l[16][LANES];
        float amax[LANES], big[LANES], scale[LANES], best[LANES];
        load_sub16(x, s0, lanes, xs, w, wx, amax, big);
        for (int step = -10; step <= 9; ++step) {  /* -10 stands for the initial attempt (is = 0) */
            if (step == 0) continue;
            const int is = step == -10 ? 0 : step;
            const float num = -(nmax + 0.1f * is);
            float sumlx[LANES], suml2[LANES], iscale[LANES], lv[16][LANES];
            for (int j = 0; j < LANES; j++) { iscale[j] = num / big[j]; sumlx[j] = 0.0f; suml2[j] = 0.0f; }
            for (int i = 0; i < 16; i++)
                for (int j = 0; j < LANES; j++) {
                    int l = qp_nearest_int(iscale[j] * xs[i][j]);
                    l = l < -nmax ? -nmax : l;
                    l = l > nmax - 1 ? nmax - 1 : l;
                    const float fl = (float)l;
                    lv[i][j] = fl;
                    sumlx[j] += wx[i][j] * fl;
                    suml2[j] += w[i][j] * fl * fl;
                }
            if (step == -10) {
                for (int j = 0; j < LANES; j++) {
                    scale[j] = suml2[j] != 0 ? sumlx[j] / suml2[j] : 0.0f;
                    best[j] = scale[j] * sumlx[j];
                }
                for (int i = 0; i < 16; i++)
                    for (int j = 0; j < LANES; j++) best_l[i][j] = lv[i][j];
            } else {
                int better[LANES];
                for (int j = 0; j < LANES; j++) {
                    better[j] = suml2[j] > 0 && sumlx[j] * sumlx[j] > best[j] * suml2[j];
                    scale[j] = better[j] ? sumlx[j] / suml2[j] : scale[j];
                    best[j] = better[j] ? scale[j] * sumlx[j] : best[j];
                }
                for (int i = 0; i < 16; i++)
                    for (int j = 0; j < LANES; j++) best_l[i][j] = better[j] ? lv[i][j] : best_l[i][j];
            }
        }
        for (int j = 0; j < lanes; j++) {
            const int zero = amax[j] < 1e-15f;
            scales[s0 + j] = zero ? 0.0f : scale[j];
            for (int i = 0; i < 16; i++) codes[(s0 + j) * 16 + i] = zero ? -32.0f : best_l[i][j];
        }
    }
}

/* make_q3_quants(16, 4, x, L, do_rmse=true). x: [nsub, 16]; scales [nsub]; codes [nsub, 16] (L - 4, as floats).
   The C reference stops its 5 coordinate-descent passes once a pass changes nothing; a pass over an unchanged state
   changes nothing either, so all 5 run here (as in the torch search). */
void qp_q3(const float* x, int64_t nsub, float* scales, float* codes) {
    const int nmax = 4;
    for (int64_t s0 = 0; s0 < nsub; s0 += LANES) {
        const int64_t lanes = nsub - s0 < LANES ? nsub - s0 : LANES;
        float xs[16][LANES], w[16][LANES], wx[16][LANES], lv[16][LANES];
        float amax[LANES], big[LANES], sumlx[LANES], suml2[LANES], iscale[LANES];
        load_sub16(x, s0, lanes, xs, w, wx, amax, big);
        for (int j = 0; j < LANES; j++) { iscale[j] = -4.0f / big[j]; sumlx[j] = 0.0f; suml2[j] = 0.0f; }
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < LANES; j++) {
                int l = qp_nearest_int(iscale[j] * xs[i][j]);
                l = l < -nmax ? -nmax : l;
                l = l > nmax - 1 ? nmax - 1 : l;
                lv[i][j] = (float)l;
                sumlx[j] += wx[i][j] * lv[i][j];
                suml2[j] += w[i][j] * lv[i][j] * lv[i][j];
            }
        for (int pass = 0; pass < 5; pass++)
            for (int i = 0; i < 16; i++)
                for (int j = 0; j < LANES; j++) {
                    const float li = lv[i][j];
                    const float slx = sumlx[j] - wx[i][j] * li;
                    const float sl2 = suml2[j] - w[i][j] * li * li;
                    int l = qp_nearest_int(xs[i][j] * sl2 / slx);
                    l = l < -nmax ? -nmax : l;
                    l = l > nmax - 1 ? nmax - 1 : l;
                    const float fl = (float)l;
                    const float slx_new = slx + wx[i][j] * fl;
                    const float sl2_new = sl2 + w[i][j] * fl * fl;
                    const int take = slx > 0 && fl != li && sl2_new > 0
                                     && slx_new * slx_new * suml2[j] > sumlx[j] * sumlx[j] * sl2_new;
                    lv[i][j] = take ? fl : li;
                    sumlx[j] = take ? slx_new : sumlx[j];
                    suml2[j] = take ? sl2_new : suml2[j];
                }
        for (int j = 0; j < lanes; j++) {
            const int zero = amax[j] < 1e-15f;
            scales[s0 + j] = zero ? 0.0f : (suml2[j] > 0 ? sumlx[j] / suml2[j] : 0.0f);
            for (int i = 0; i < 16; i++) codes[(s0 + j) * 16 + i] = zero ? -4.0f : lv[i][j];
        }
    }
}

/* One sub-block of 16 of Q3_K or Q6_K: codes clamp(nearest_int(x / d), lo, hi), or where d is 0 the codes the
   search left (fallback; C: if (!d) continue), dequantized as code * d (formats.ggml _codes_with_fallback,
   _times_d) */
static inline void sub16_with_fallback(const float* restrict xs, float* restrict ys, float d, const float* fallback,
                                       int lo, int hi) {
    for (int k = 0; k < 16; k++) {
        float q;
        if (d == 0.0f) {
            q = fallback[k];
        } else {
            int c = qp_nearest_int(xs[k] / d);
            c = c < lo ? lo : (c > hi ? hi : c);
            q = (float)c;
        }
        ys[k] = q * d;
    }
}

/* Q3_K (six = 0) or Q6_K (six = 1) whole (ggml-quants.c quantize_row_q3_K_ref / quantize_row_q6_K_ref,
   dequantized with gguf-py's d * q): x, y [nsuper, 256] contiguous and finite; qp_q3's or qp_qx's sub-block search,
   then the torch path's float32 operations in the same order (quantpredict.formats.ggml _fit_q3_k / q6_k_params,
   _codes_with_fallback, _times_d). They differ in the 16 sub-block scales: Q3_K's are 6-bit (int8_t wrap, then
   -32..31; a block without a non-zero scale has d = 0 and every scale -32), Q6_K's 8-bit (at most 127; a block whose
   largest |scale| is below 1e-15 is stored as zeros, its codes -32). Returns 1 where a super-block scale overflows
   fp16 (y is then unspecified: the caller raises through the torch path). sums: as qp_ggml_legacy's, block_sq_sums
   over each 32 elements in order. */
int qp_sub16_k(const float* restrict x, float* restrict y, int64_t nsuper, int six, double* restrict sums) {
    static const float all_zero[16] = {-32, -32, -32, -32, -32, -32, -32, -32,
                                       -32, -32, -32, -32, -32, -32, -32, -32};
    int ovf = 0;
    float scales[LANES], codes[LANES * 16];
    for (int64_t s0 = 0; s0 < nsuper; s0 += LANES / 16) {
        const int64_t ns = nsuper - s0 < LANES / 16 ? nsuper - s0 : LANES / 16;
        if (six) qp_qx(x + s0 * 256, ns * 16, scales, codes);
        else qp_q3(x + s0 * 256, ns * 16, scales, codes);
        for (int64_t b = 0; b < ns; b++) {
            const float* restrict xb = x + (s0 + b) * 256;
            float* restrict yb = y + (s0 + b) * 256;
            const float* sc_b = scales + b * 16;
            int where = 0;  /* the first largest |scale|, with its sign */
            for (int i = 1; i < 16; i++) where = fabsf(sc_b[i]) > fabsf(sc_b[where]) ? i : where;
            const float max_scale = sc_b[where];
            const int none = six ? fabsf(max_scale) < 1e-15f : max_scale == 0.0f;
            const float iscale = none ? 1.0f : (six ? -128.0f : -32.0f) / max_scale;
            const float d16 = fp16_round(none ? 0.0f : 1.0f / iscale, &ovf);
            for (int i = 0; i < 16; i++) {
                int l = qp_nearest_int(iscale * sc_b[i]);
                if (six) {
                    l = l > 127 ? 127 : l;
                } else {
                    l = (int8_t)l;  /* int8_t l = nearest_int(...) */
                    l = l < -32 ? -32 : (l > 31 ? 31 : l);
                }
                const float d = d16 * (float)(none ? (six ? 0 : -32) : l);
                const float* fallback = none && six ? all_zero : codes + (b * 16 + i) * 16;
                sub16_with_fallback(xb + 16 * i, yb + 16 * i, d, fallback, six ? -32 : -4, six ? 31 : 3);
            }
            if (sums != NULL)
                for (int j = 0; j < 256; j += 32) block_sq_sums(xb + j, yb + j, sums);
        }
    }
    return ovf;
}

/* Q4_K / Q5_K whole (quantize_row_q{4,5}_K_ref, dequantized with gguf-py's d * q - dm): x, y [nsuper, 256]
   contiguous and finite; the sub-block search is qp_kx2's with (nmax, rmin, rdelta, nstep), then the torch path's
   float32 operations in order (formats.ggml _fit_kx2, _codes_with_fallback, _d_times_q_minus_dm): the largest sub-block
   scale and min as torch's amax (the first of equal values) and maximum with 0 (which keeps a -0) give them.
   Returns 1 where a super-block scale or min scale overflows fp16; sums as qp_sub16_k's. */
int qp_kx2_whole(const float* restrict x, float* restrict y, int64_t nsuper, int nmax, float rmin, float rdelta,
                 int nstep, double* restrict sums) {
    int ovf = 0;
    float scales[LANES], mins[LANES];
    for (int64_t s0 = 0; s0 < nsuper; s0 += LANES / 8) {
        const int64_t ns = nsuper - s0 < LANES / 8 ? nsuper - s0 : LANES / 8;
        qp_kx2(x + s0 * 256, ns * 8, nmax, rmin, rdelta, nstep, scales, mins, NULL);  /* d = 0: the value is -dm */
        for (int64_t b = 0; b < ns; b++) {
            const float* restrict xb = x + (s0 + b) * 256;
            float* restrict yb = y + (s0 + b) * 256;
            const float* sc = scales + b * 8;
            const float* mn = mins + b * 8;
            float max_scale = sc[0], max_min = mn[0];
            for (int i = 1; i < 8; i++) {
                max_scale = sc[i] > max_scale ? sc[i] : max_scale;
                max_min = mn[i] > max_min ? mn[i] : max_min;
            }
            max_scale = 0.0f > max_scale ? 0.0f : max_scale;
            max_min = 0.0f > max_min ? 0.0f : max_min;
            const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
            const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
            const float d16 = fp16_round(max_scale / 63.0f, &ovf), dmin16 = fp16_round(max_min / 63.0f, &ovf);
            for (int i = 0; i < 8; i++) {
                int ls = qp_nearest_int(inv_scale * sc[i]) & 0xFF;  /* uint8_t ls = nearest_int(...) */
                int lm = qp_nearest_int(inv_min * mn[i]) & 0xFF;
                ls = ls > 63 ? 63 : ls;
                lm = lm > 63 ? 63 : lm;
                const float d = d16 * (float)ls, dm = dmin16 * (float)lm;
                const float* restrict xs = xb + 32 * i;
                float* restrict ys = yb + 32 * i;
                for (int k = 0; k < 32; k++) {
                    int c = 0;  /* d = 0: the value is -dm whatever the code (the packed file keeps the search's) */
                    if (d != 0.0f) {
                        c = qp_nearest_int((xs[k] + dm) / d);
                        c = c < 0 ? 0 : (c > nmax ? nmax : c);
                    }
                    ys[k] = (float)c * d - dm;
                }
            }
            if (sums != NULL)
                for (int j = 0; j < 256; j += 32) block_sq_sums(xb + j, yb + j, sums);
        }
    }
    return ovf;
}

/* lanes[k] += x^2 and lanes[8 + k] += (y - x)^2 over x, y [n] (y may be NULL), lane k taking the elements k mod 8:
   each difference in float32, each square and sum in double, so the result does not depend on how the compiler
   vectorises; the caller adds the lanes in order (native.py _lane_sums), as for qp_ggml_legacy's lanes. */
void qp_sq_sums(const float* x, const float* y, int64_t n, double* lanes) {
    double a[8], b[8];
    for (int k = 0; k < 8; k++) { a[k] = lanes[k]; b[k] = lanes[8 + k]; }
    const int64_t whole = n - n % 8;
    for (int64_t i = 0; i < whole; i += 8)  /* whole rows of 8 lanes: vectorised across the lanes */
        for (int k = 0; k < 8; k++) {
            const double v = x[i + k];
            a[k] += v * v;
        }
    if (y != NULL)
        for (int64_t i = 0; i < whole; i += 8)
            for (int k = 0; k < 8; k++) {
                const double d = (double)(y[i + k] - x[i + k]);
                b[k] += d * d;
            }
    for (int64_t i = whole; i < n; i++) {
        const double v = x[i];
        a[i % 8] += v * v;
        if (y != NULL) {
            const double d = (double)(y[i] - x[i]);
            b[i % 8] += d * d;
        }
    }
    for (int k = 0; k < 8; k++) { lanes[k] = a[k]; lanes[8 + k] = b[k]; }
}
"""

# -fno-math-errno lets sqrtf vectorise and -fno-trapping-math truncf/floorf (errno and the floating-point exception
# flags are the only differences, which nothing here reads; results are IEEE either way): the one-pass types' loops
# vectorised ran 2.3x (Q4_0) to 2.9x (Q8_0) faster (AVX-512, GCC 12)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fno-trapping-math",
         "-fPIC", "-shared", "-std=c99"]

PARALLEL_MIN_ELEMENTS = 1 << 18  # below this, threads cost more than they save
_lock = threading.Lock()
_state: dict[str, object] = {}  # memo of the loaded library (or the reason there is none); one per process


def _cache_dir() -> Path:
    root = os.environ.get("QUANTPREDICT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "quantpredict")
    return Path(root) / "native"


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")


def _compile(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "qp_formats.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: concurrent processes never load a half-written file


def library() -> ctypes.CDLL | None:
    """The compiled kernel (compiling it on first use), or None if it cannot be built or is switched off."""
    if os.environ.get("QUANTPREDICT_FORMATS_BACKEND", "auto") == "torch":
        return None
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib = None
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler (gcc, cc or clang) on PATH")
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
            key = hashlib.sha256("\0".join([SOURCE, *FLAGS, version, _cpu_id()]).encode()).hexdigest()[:16]
            target = _cache_dir() / f"qp_formats_{key}.so"
            if not target.exists():
                try:
                    _compile(cc, target)
                except OSError:  # cache not writable: build in the temp dir instead
                    target = Path(tempfile.gettempdir()) / "quantpredict-native" / target.name
                    if not target.exists():
                        _compile(cc, target)
            lib = ctypes.CDLL(str(target))
            fn = lib.qp_fake_quantize
            fn.restype = ctypes.c_int
            i64, ci = ctypes.c_int64, ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64, i64, ci, ci, ci, ci, ci, ctypes.c_float, ci]
            cf, vp = ctypes.c_float, ctypes.c_void_p
            lib.qp_kx2.restype = None
            lib.qp_kx2.argtypes = [vp, i64, ci, cf, cf, ci, vp, vp, vp]
            lib.qp_qx.restype = None
            lib.qp_qx.argtypes = [vp, i64, vp, vp]
            lib.qp_q3.restype = None
            lib.qp_q3.argtypes = [vp, i64, vp, vp]
            lib.qp_ggml_legacy.restype = ci
            lib.qp_ggml_legacy.argtypes = [vp, vp, i64, ci, vp]
            lib.qp_sq_sums.restype = None
            lib.qp_sq_sums.argtypes = [vp, vp, i64, vp]
            lib.qp_sub16_k.restype = ci
            lib.qp_sub16_k.argtypes = [vp, vp, i64, ci, vp]
            lib.qp_kx2_whole.restype = ci
            lib.qp_kx2_whole.argtypes = [vp, vp, i64, ci, cf, cf, ci, vp]
        except Exception as exc:  # noqa: BLE001 - any failure means: use the torch reference
            warnings.warn(f"quantpredict.formats: fused kernel unavailable ({exc}); using the slower torch path",
                          RuntimeWarning, stacklevel=3)
            _state["error"] = str(exc)
            lib = None
        _state["lib"] = lib
        return lib


def available() -> bool:
    return library() is not None


def fake_quantize_rows(x: Tensor, fmt: Format, block: int) -> Tensor | None:
    """Quantize a contiguous float32 CPU tensor [rows, n] in blocks of ``block`` along n.

    Returns the result, or None if the input holds NaN/Inf (the caller raises). Requires ``available()``.
    """
    import torch

    lib = library()
    assert lib is not None and x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2
    el = ELEMENTS[fmt.element_format]
    y = torch.empty_like(x)
    rows, n = x.shape
    if x.numel() == 0:
        return y
    nb = -(-n // block)
    total = rows * nb
    args = (int(fmt.family == "mx"), int(el.kind == "fp"), el.mbits, el.emin, el.emax, el.max_normal,
            el.emin if el.kind == "int" else 0)
    px, py = x.data_ptr(), y.data_ptr()
    threads = min(torch.get_num_threads(), total) if x.numel() >= PARALLEL_MIN_ELEMENTS else 1
    if threads <= 1:
        bad = lib.qp_fake_quantize(px, py, n, block, 0, total, *args)
    else:
        # ctypes releases the GIL, so Python threads run the chunks in parallel; idle pool threads sleep (an
        # OpenMP runtime next to torch's own would spin and fight torch's threads for the cores).
        bounds = [total * i // threads for i in range(threads + 1)]
        futures = [_pool().submit(lib.qp_fake_quantize, px, py, n, block, bounds[i], bounds[i + 1], *args)
                   for i in range(threads)]
        bad = max(f.result() for f in futures)
    return None if bad else y


def _pool() -> ThreadPoolExecutor:
    # keyed by pid: a forked child (multiprocessing, Dask) inherits the pool object but none of its threads, and
    # submitting to it would wait forever
    with _lock:
        if _state.get("pool_pid") != os.getpid():
            _state["pool"] = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="qp-formats")
            _state["pool_pid"] = os.getpid()
        return _state["pool"]  # type: ignore[return-value]


def _run_chunks(fn, total: int, align: int, threads: int | None = None) -> None:
    """Call ``fn(start, stop)`` over [0, total) in chunks (multiples of ``align``) on the pool's threads, or inline
    with one thread; ``threads``: at most this many (``None``: torch's intra-op thread count)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    threads = min(threads, max(total // 4096, 1))
    if threads <= 1:
        fn(0, total)
        return
    step = -(-total // threads)
    step = -(-step // align) * align
    futures = [_pool().submit(fn, a, min(a + step, total)) for a in range(0, total, step)]
    for f in futures:
        f.result()


def kx2_search(sub: Tensor, nmax: int, rmin: float, rdelta: float,
               nstep: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """llama.cpp's ``make_qkx2_quants`` on sub-blocks ``sub`` [M, 32] (contiguous float32): (scales, mins) [M] and
    the codes L it leaves [M, 32] (as float32), or None without the kernel. Bit-identical to the torch search in
    :mod:`quantpredict.formats.ggml`."""
    import torch

    lib = library()
    if lib is None:
        return None
    sub = sub.contiguous()
    m = sub.shape[0]
    scales, mins, codes = torch.empty(m), torch.empty(m), torch.empty(m, 32)
    px, ps, pm, pc = sub.data_ptr(), scales.data_ptr(), mins.data_ptr(), codes.data_ptr()

    def run(a: int, b: int) -> None:
        lib.qp_kx2(px + 4 * 32 * a, b - a, nmax, rmin, rdelta, nstep, ps + 4 * a, pm + 4 * a, pc + 4 * 32 * a)

    _run_chunks(run, m, 8)
    return scales, mins, codes


#: llama.cpp's one-pass types the C kernel quantizes whole (the kind number it takes)
LEGACY_KINDS = {"q4_0": 0, "q4_1": 1, "q5_0": 2, "q5_1": 3, "q8_0": 4}


def ggml_legacy(blocks: Tensor, name: str) -> Tensor | None:
    """``blocks`` [..., 32] (float32, finite) quantized to the one-pass llama.cpp type ``name`` (of
    :data:`LEGACY_KINDS`) and dequantized, or None without the kernel or where a block's fp16 scale overflows (the
    torch path then raises the error that names it). Bit-identical to :mod:`quantpredict.formats.ggml`'s torch path,
    in one pass over memory instead of about ten."""
    import torch

    lib = library()
    if lib is None:
        return None
    x = blocks.contiguous()
    y = torch.empty_like(x)
    m = x.numel() // 32
    px, py, kind = x.data_ptr(), y.data_ptr(), LEGACY_KINDS[name]
    bad = []

    def run(a: int, b: int) -> None:
        bad.append(lib.qp_ggml_legacy(px + 4 * 32 * a, py + 4 * 32 * a, b - a, kind, None))

    _run_chunks(run, m, 8)
    return None if any(bad) else y


#: elements per partial sum of :func:`_lane_sums`: fixed (a multiple of every kernel's block), so that the sums do
#: not depend on the thread count
SUM_CHUNK = 1 << 16


def _lane_sums(call, n: int, threads: int | None = None) -> tuple[float, float, bool]:
    """``(sum x^2, sum (y - x)^2, flagged)`` of a kernel that adds into 16 lanes (``[0..7]`` x^2, ``[8..15]``
    (y - x)^2, lane k the elements k mod 8 of its range): ``call(a, b, lanes)`` over the elements [a, b) of [0, n),
    in chunks of :data:`SUM_CHUNK` spread over at most ``threads`` threads (``None``: torch's count), each chunk's
    lanes added in order and the chunks in order, so every kernel that keeps these lanes gives the same sums of the
    same data, whatever the thread count; ``flagged``: any call returned non-zero."""
    starts = range(0, n, SUM_CHUNK)
    parts: list[tuple[int, list[float]]] = [(0, [])] * len(starts)

    def run(i0: int, i1: int) -> None:
        for i in range(i0, i1):
            lanes = (ctypes.c_double * 16)()
            a = starts[i]
            parts[i] = (call(a, min(a + SUM_CHUNK, n), lanes) or 0, list(lanes))

    if threads is None:
        import torch

        threads = torch.get_num_threads()
    threads = min(threads, len(starts))
    if threads <= 1:
        run(0, len(starts))
    else:
        bounds = [len(starts) * i // threads for i in range(threads + 1)]
        for f in [_pool().submit(run, bounds[i], bounds[i + 1]) for i in range(threads)]:
            f.result()
    first = second = 0.0
    flagged = False
    for flag, lanes in parts:
        flagged |= bool(flag)
        sa = sb = 0.0
        for k in range(8):
            sa += lanes[k]
            sb += lanes[8 + k]
        first += sa
        second += sb
    return first, second, flagged


#: the llama.cpp types the C kernel quantizes whole (:func:`whole_sums_at`), with the elements of their blocks
WHOLE_BLOCKS = {**{name: 32 for name in LEGACY_KINDS}, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256}
#: Q4_K's and Q5_K's sub-block search settings (nmax, rmin, rdelta, nstep): ggml-quants.c's, as formats.ggml.KX2
KX2_SETTINGS = {"q4_k": (15, -1.0, 0.1, 20), "q5_k": (31, -0.5, 0.1, 15)}


def whole_sums_at(px: int, py: int, n: int, name: str, threads: int | None = None) -> tuple[float, float] | None:
    """A C kernel that quantizes a whole tensor on raw memory, for callers without torch tensors (the numpy arrays
    of :mod:`quantpredict.checkpoint_rtn`): the ``n`` float32 values at address ``px`` (finite; ``n`` a multiple of
    the type's block, :data:`WHOLE_BLOCKS`, blocks of consecutive values) quantized to ``name`` and dequantized into
    the ``n`` float32 values at ``py``, bit for bit :mod:`quantpredict.formats.ggml`'s torch path; returns ``(sum
    x^2, sum (y - x)^2)`` as :func:`squared_sums` adds them, or None without the kernel or where a scale overflows
    fp16. ``threads``: at most this many (``None``: torch's intra-op count)."""
    lib = library()
    if lib is None:
        return None
    block = WHOLE_BLOCKS[name]
    assert n % block == 0
    if name in ("q3_k", "q6_k"):
        six = int(name == "q6_k")

        def call(a: int, b: int, lanes) -> int:
            return lib.qp_sub16_k(px + 4 * a, py + 4 * a, (b - a) // 256, six, lanes)
    elif name in KX2_SETTINGS:
        nmax, rmin, rdelta, nstep = KX2_SETTINGS[name]

        def call(a: int, b: int, lanes) -> int:
            return lib.qp_kx2_whole(px + 4 * a, py + 4 * a, (b - a) // 256, nmax, rmin, rdelta, nstep, lanes)
    else:
        kind = LEGACY_KINDS[name]

        def call(a: int, b: int, lanes) -> int:
            return lib.qp_ggml_legacy(px + 4 * a, py + 4 * a, (b - a) // 32, kind, lanes)

    first, second, overflow = _lane_sums(call, n, threads)  # SUM_CHUNK: whole blocks of either size
    return None if overflow else (first, second)


def squared_sums_at(px: int, py: int | None, n: int, threads: int | None = None) -> tuple[float, float] | None:
    """The C kernel of :func:`squared_sums` on raw memory: the ``n`` float32 values at ``px`` and (``py`` not None)
    at ``py``; None without the kernel. ``threads`` as in :func:`whole_sums_at`."""
    lib = library()
    if lib is None:
        return None
    first, second, _ = _lane_sums(
        lambda a, b, lanes: lib.qp_sq_sums(px + 4 * a, (py + 4 * a) if py is not None else None, b - a, lanes),
        n, threads)
    return first, second


def ggml_legacy_with_sums(x: Tensor, name: str, out: Tensor | None = None) -> tuple[Tensor, float, float] | None:
    """:func:`ggml_legacy` of ``x`` (float32, contiguous, ``numel`` a multiple of 32, its blocks along the last
    axis) and :func:`squared_sums` of ``x`` and the result in the same pass: ``(y, sum x^2, sum (y - x)^2)``, the
    sums bit for bit :func:`squared_sums`'s (the same lanes and chunks, :func:`_lane_sums`). ``out``: a float32
    buffer of at least ``x.numel()`` elements to write ``y`` into (its first ``numel`` elements, shaped as ``x``),
    so that a caller quantizing many layers reuses one allocation. None without the kernel or where a scale
    overflows fp16; a non-finite first sum where ``x`` holds NaN or Inf (``y`` is then meaningless: the caller
    raises)."""
    import torch

    if not available():
        return None
    assert x.dtype == torch.float32 and x.is_contiguous() and x.numel() % 32 == 0
    n = x.numel()
    y = torch.empty_like(x) if out is None else out.view(-1)[:n].view(x.shape)
    sums = whole_sums_at(x.data_ptr(), y.data_ptr(), n, name)
    return None if sums is None else (y, *sums)


def squared_sums(x: Tensor, y: Tensor | None = None) -> tuple[float, float] | None:
    """``(sum x^2, sum (y - x)^2)`` of float32 CPU tensors ``x`` and ``y`` of one shape (``y`` None: the second is
    0): each difference in float32, squares and sums in float64, in one pass over memory (NaN or Inf in ``x`` shows as
    a non-finite first sum; :func:`_lane_sums` adds them). None without the kernel or for other dtypes and
    devices."""
    import torch

    ok = available() and x.dtype == torch.float32 and x.device.type == "cpu"
    if not ok or (y is not None and (y.dtype != torch.float32 or y.shape != x.shape or y.device.type != "cpu")):
        return None
    xc = x.contiguous()
    yc = None if y is None else y.contiguous()
    return squared_sums_at(xc.data_ptr(), None if yc is None else yc.data_ptr(), xc.numel())


def qx_search(sub: Tensor) -> tuple[Tensor, Tensor] | None:
    """llama.cpp's ``make_qx_quants(16, 32, ., ., 1, NULL)`` on sub-blocks ``sub`` [M, 16] (contiguous float32):
    (scales [M], codes L - 32 [M, 16]), or None without the kernel. Bit-identical to the torch search."""
    return _sub_block_search("qp_qx", sub)


def q3_search(sub: Tensor) -> tuple[Tensor, Tensor] | None:
    """llama.cpp's ``make_q3_quants(16, 4, ., ., true)`` (Q3_K's sub-block scales) on sub-blocks ``sub`` [M, 16]
    (contiguous float32): (scales [M], codes L - 4 [M, 16]), or None without the kernel. Bit-identical to the torch
    search (:func:`quantpredict.formats.ggml._q3_chunk`), about 10x faster (it was 3.4 s of Q3_K's 5.4 s on
    SmolLM2-135M)."""
    return _sub_block_search("qp_q3", sub)


def _sub_block_search(name: str, sub: Tensor) -> tuple[Tensor, Tensor] | None:
    import torch

    lib = library()
    if lib is None:
        return None
    fn = getattr(lib, name)
    sub = sub.contiguous()
    m = sub.shape[0]
    scales, codes = torch.empty(m), torch.empty(m, 16)
    px, ps, pc = sub.data_ptr(), scales.data_ptr(), codes.data_ptr()

    def run(a: int, b: int) -> None:
        fn(px + 4 * 16 * a, b - a, ps + 4 * a, pc + 4 * 16 * a)

    _run_chunks(run, m, 8)
    return scales, codes
