"""llama.cpp's quantizers with an importance matrix ("imatrix"), reproducing them bit for bit.

Given ``quant_weights`` (one non-negative float per column of the row, the same for every row: llama-quantize passes
each tensor's per-column mean squared activation, see :func:`quantpredict.imatrix.quant_weights`), ``quantize_<t>``
of ggml/src/ggml-quants.c (llama-cpp-python 0.3.36) runs another algorithm than without one:

* **Q4_0 / Q5_0**: ``quantize_row_q4_0_impl`` / ``q5_0_impl``: per block of 32, ``make_qx_quants(32, 8 or 16, x,
  L, rmse_type=1, weight)`` with ``weight = qw * sqrtf(sigma2 + x^2)``, ``sigma2 = sum(x^2) / n_per_row`` over the
  whole row; stored fp16 ``d`` = the searched scale and the search's codes ``L`` (no requantization).
* **Q4_1 / Q5_1**: ``make_qkx3_quants(32, 15 or 31, x, weight, rmin -0.9, rdelta 0.05, nstep 36)`` (the Q4_K search
  of :mod:`.ggml` with these weights), fp16 ``d`` and ``m = -the_min``, the search's codes.
* **Q2_K / Q4_K / Q5_K**: per sub-block (16, 32, 32) ``make_qkx3_quants`` with ``weight = qw * sqrtf(sigma2 +
  x^2)``, ``sigma2 = sum(x^2) / 256`` (Q2_K) or ``2 * sum(x^2) / 256`` over the super-block; the sub-block scales and
  mins are quantized by ``make_qp_quants(n, 15 or 63, scales, L, sw)`` (``sw`` each sub-block's sum of weights: a
  9-candidate search then coordinate descent) into the super-block's fp16 ``d``/``dmin``; the codes are requantized
  with the stored scales as without an imatrix (where a sub-block's ``d * sc`` is 0 the search's codes stay).
* **Q3_K**: per sub-block of 16 ``make_qx_quants(16, 4, x, L, 1, weight)`` (``sigma2 = 2 sum(x^2) / 256``), the 16
  scales by ``make_qx_quants(16, 32, scales, Ls, 1, sw)`` into fp16 ``d`` and 6-bit ``Ls - 32``; requantized codes.
* **Q6_K**: ``make_qx_quants(16, 32, x, L, 1, qw)`` with the imatrix itself as the weights (no sigma2), then as
  without one.
* **IQ4_NL / IQ4_XS**: ``quantize_row_iq4_nl_impl`` with ``weight = qw * sqrtf(sigma2 + x^2)``, ``sigma2 =
  sum(x^2) * (2 / super_block_size)`` (32 or 256) instead of ``x^2``; the rest as without one.
* **Q8_0**: ``quantize_q8_0`` ignores ``quant_weights``: the same bytes as without an imatrix.

Every float operation follows the C source in float32, in its order (see :mod:`.ggml`), including its integer
conversions: ``make_qp_quants`` stores codes in ``uint8_t`` (a negative code, possible only for a negative
sub-block scale, wraps, and the wrapped value is what its coordinate descent reads back), and Q4_K/Q5_K write the
12 scale bytes as the C code does before reading them back with ``get_scale_min_k4``'s layout. Where a sub-block's
``d * sc`` is 0 the codes of its search are kept, as the C code's ``if (!d) continue`` does (the unweighted Q4_K/Q5_K
of :mod:`.ggml` write 0 there instead). Departures from the C code: none in the results; the loops the C code leaves
early (``make_qp_quants``' coordinate descent once a pass changes nothing) run to their end here, which changes
nothing (a pass over an unchanged state changes nothing). Checked against the compiled C source (tests/
test_ggml_imatrix.py: gaussian, heavy-tailed and edge rows with seven importance matrices, and a trained weight)
and against llama-quantize --imatrix on SmolLM2 (benchmarks/llamacpp_reference.py ``exact --imatrix``): identical
bytes in every block. The searches run in torch only (the C kernel of :mod:`.native` has the unweighted ones): a
weighted Q4_K costs about 40 times the unweighted one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from quantpredict.errors import FormatError
from quantpredict.formats import ggml
from quantpredict.formats.exact import nearest_int, rdiv, sqrt, to_fp16
from quantpredict.formats.table import Format, get_format

GROUP_MAX_EPS = ggml.GROUP_MAX_EPS
_f32, _seq_sum = ggml._f32, ggml._seq_sum
CHUNK = ggml.CHUNK
KX3 = (_f32(-0.9), _f32(0.05), 36)  # make_qkx3_quants' (rmin, rdelta, nstep) in every weighted caller
QK_K = 256


def check_importance(imatrix: Tensor | np.ndarray, n: int, fmt: str) -> Tensor:
    """``imatrix`` as float32 [n] (llama.cpp's ``quant_weights`` are float32), or a :class:`FormatError` naming
    what is wrong: not one value per column, NaN/Inf (after the float32 conversion), or negative."""
    try:
        w = torch.as_tensor(np.asarray(imatrix) if not isinstance(imatrix, Tensor) else imatrix.detach().cpu())
    except (TypeError, ValueError) as e:
        raise FormatError(f"importance for {fmt!r}: not an array of numbers ({e})") from None
    if not (w.is_floating_point() or w.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise FormatError(f"importance for {fmt!r}: needs real numbers, got dtype {w.dtype}")
    w = w.to(torch.float32)
    if w.dim() != 1 or w.shape[0] != n:
        raise FormatError(f"importance for {fmt!r}: needs one value per column of the rows ({n}), got shape "
                          f"{tuple(w.shape)}")
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        raise FormatError(f"importance for {fmt!r}: {int(bad.sum())} of {n} values are NaN or Inf (in float32); "
                          "an imatrix holds finite mean squared activations")
    if bool((w < 0).any()):
        raise FormatError(f"importance for {fmt!r}: {int((w < 0).sum())} of {n} values are negative; an imatrix "
                          "holds mean squared activations (>= 0)")
    return w


def _check_x(x: Tensor, f: Format) -> Tensor:
    """``x`` as float32 [rows, n], or a FormatError (not 2-D, not floating, not finite, rows not whole blocks)."""
    from quantpredict.formats.reference import check_finite

    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise FormatError(f"quantizing to {f.name!r} needs a floating-point tensor, got "
                          f"{getattr(x, 'dtype', type(x))}")
    if x.dim() != 2:
        raise FormatError(f"quantizing to {f.name!r} with an importance matrix needs a 2-D [rows, n] tensor, got "
                          f"shape {tuple(x.shape)}")
    x32 = x.detach().to(torch.float32).cpu().contiguous()
    f.check_row_length(x32.shape[1])
    check_finite(x32, f.name)
    return x32


def _ggml_format(fmt: Format | str) -> Format:
    f = get_format(fmt)
    if f.family != "ggml":
        raise FormatError(f"an importance matrix applies to llama.cpp's formats only ({', '.join(ggml._TYPES)}), "
                          f"not {f.name!r}")
    return f


# ------------------------------------------------------------------------------------------------ shared pieces


def _per_block(qw: Tensor, rows: int, block: int) -> Tensor:
    """The importance of each element of the [rows, n] tensor in blocks: [rows * n / block, block]."""
    return qw.reshape(1, -1, block).expand(rows, -1, -1).reshape(-1, block)


def _weights(xs: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    """``qw[l] * sqrtf(sigma2 + x[l]*x[l])`` for groups ``xs`` [G, B] with their ``qw`` [G, B] and ``sigma2`` [G, 1]."""
    return qw * sqrt(sigma2 + xs * xs)


def _sum_sq(xs: Tensor) -> Tensor:
    """``sum += x[j]*x[j]`` over each group ``xs`` [G, B] in order: [G, 1]."""
    return _seq_sum((xs * xs).t()).unsqueeze(-1)


def _u8(v: Tensor) -> Tensor:
    """An int stored in ``uint8_t`` (wrapping), as float32."""
    return (v.to(torch.int64) & 0xFF).to(torch.float32)


def _qkx3(sub: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """``make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, -0.9f, 0.05f, 36, false)`` on groups ``sub``
    [M, n] with ``weights`` [M, n]: (scale [M], the_min [M], codes L [M, n]). Its code is make_qkx2_quants' with the
    weights given (``max <= min`` is ``max == min`` once min is clamped to <= 0), so :mod:`.ggml`'s search runs it."""
    scales, mins, codes = torch.empty(sub.shape[0]), torch.empty(sub.shape[0]), torch.empty_like(sub)
    for a in range(0, sub.shape[0], CHUNK):
        s, m, c = ggml._qkx2_chunk(sub[a : a + CHUNK].t().contiguous(), w[a : a + CHUNK].t().contiguous(), nmax,
                                   *KX3)
        scales[a : a + CHUNK], mins[a : a + CHUNK], codes[a : a + CHUNK] = s, m, c.t()
    return scales, mins, codes


def _qx(sub: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``make_qx_quants(n, nmax, x, L, 1, weights)`` on groups ``sub`` [M, n] with ``w`` [M, n]: (scale [M], codes
    L - nmax [M, n])."""
    scales, codes = torch.empty(sub.shape[0]), torch.empty_like(sub)
    for a in range(0, sub.shape[0], CHUNK):
        s, c = ggml.qx_search(sub[a : a + CHUNK].t().contiguous(), w[a : a + CHUNK].t().contiguous(), nmax)
        scales[a : a + CHUNK], codes[a : a + CHUNK] = s, c.t()
    return scales, codes


def qp_quants(x: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)`` on groups ``x`` [n, M] (position-major) with weights ``w``
    [n, M]: (scale [M], the ``uint8_t`` codes L [n, M] as float32). The scale of ``L`` is picked among ``nmax / max``
    and ``(nmax + 0.1 is) / max`` (is = -4..4) by weighted squared error, then up to 5 passes of coordinate descent
    on ``sum(w x l)^2 / sum(w l^2)``."""
    zero = torch.zeros(())
    mx = torch.maximum(x.amax(0), zero)  # max = MAX(max, x[i]) from 0
    all_zero = mx < GROUP_MAX_EPS
    mx = torch.where(all_zero, torch.ones_like(mx), mx)  # C returns early there; masked below
    iscale = rdiv(float(nmax), mx)
    scale = rdiv(1.0, iscale)
    codes = _u8(nearest_int(iscale * x))  # L[i] = nearest_int(iscale * x[i]): uint8_t, unclamped
    diff = x - scale * codes
    best = _seq_sum(w * diff * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = rdiv(_f32(_f32(_f32(0.1) * step) + nmax), mx)  # (0.1f*is + nmax)/max
        scale_is = rdiv(1.0, iscale_is)
        lv = nearest_int(iscale_is * x).clamp_max_(nmax).to(torch.float32)  # int l = MIN(nmax, l): signed
        diff = x - scale_is * lv
        mse = _seq_sum(w * diff * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_is, iscale)
    lv = nearest_int(iscale * x).clamp_max_(nmax).to(torch.float32)
    codes = _u8(lv)  # L[i] = l (uint8_t), while the sums take the int l
    sumlx = _seq_sum(w * x * lv)
    suml2 = _seq_sum(w * lv * lv)
    for _ in range(5):
        for i in range(x.shape[0]):
            wi, xi, li = w[i], x[i], codes[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = nearest_int(xi * sl2 / slx).clamp_max_(nmax).to(torch.float32)
            slx_new = slx + wi * xi * new_l
            sl2_new = sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            codes[i] = torch.where(take, _u8(new_l), li)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(all_zero, torch.zeros_like(scale), scale)
    codes = torch.where(all_zero, torch.zeros_like(codes), codes)
    return scale, codes


def _k_scale_bytes(ls: Tensor, lm: Tensor) -> tuple[Tensor, Tensor]:
    """The 6-bit scales and mins [S, 8] that ``get_scale_min_k4`` reads back from the 12 bytes Q4_K/Q5_K's weighted
    quantizers write from the ``uint8_t`` codes ``ls``, ``lm`` [S, 8] (for codes <= 63, ``ls`` and ``lm`` unchanged;
    a larger code spills into its neighbours' bits as in the C code). :mod:`.ggml`'s packer writes those bytes
    back from the 6-bit values."""
    ls, lm = ls.to(torch.int64), lm.to(torch.int64)
    q = torch.zeros(ls.shape[0], 12, dtype=torch.int64)
    q[:, 0:4] = ls[:, 0:4]
    q[:, 4:8] = lm[:, 0:4]
    q[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    q[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    q[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    q &= 0xFF
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return sc.to(torch.float32), m.to(torch.float32)


def _requantized(lo: int, hi: int) -> Callable[[Tensor, Mapping[str, Tensor]], Tensor]:
    """Codes ``clamp(nearest_int((x + dm) / d), lo, hi)`` with the stored sub-block ``d`` and ``dm`` (``dm`` absent:
    ``x / d``), and where ``d`` is 0 the codes the search left (C: ``if (!d) continue``)."""

    def codes_(x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        d = p["d"]
        v = (x + p["dm"]) if "dm" in p else x.clone()
        v.div_(d)
        dead = (d == 0).expand_as(v)
        v.masked_fill_(dead, 0.0)
        return torch.where(dead, p["fallback"], nearest_int(v).clamp_(lo, hi).to(torch.float32))

    return codes_


# ------------------------------------------------------------------------------------------------ the types
# Each takes x [rows, n] float32 and qw [n] and returns (p, codes): the parameters :mod:`.ggml`'s tables read
# (``stored`` and ``dequantize``, per block [R, nb, 1] or per sub-block [S, nsub, 1]) and the codes [rows, n].


def _row_sigma2(x: Tensor) -> Tensor:
    """``sum_x2 / n_per_row`` of each row [rows, 1] (Q4_0/Q4_1/Q5_0/Q5_1's sigma2: over the whole row)."""
    return _sum_sq(x) / torch.full((1, 1), float(x.shape[1]))


def _small_weights(x: Tensor, qw: Tensor) -> tuple[Tensor, Tensor]:
    """Blocks of 32 [rows * n / 32, 32] and their weights ``qw * sqrtf(sigma2 + x^2)`` with the row's sigma2."""
    rows, n = x.shape
    sigma2 = _row_sigma2(x).expand(rows, n // 32).reshape(-1, 1)
    xs = x.reshape(-1, 32)
    return xs, _weights(xs, _per_block(qw, rows, 32), sigma2)


def _sym_weighted(half: int):
    """Q4_0 (``half`` 8) / Q5_0 (16): ``make_qx_quants(32, half, ...)``; codes ``L = l + half``."""

    def fit_(x: Tensor, qw: Tensor, fmt: Format) -> tuple[dict[str, Tensor], Tensor]:
        xs, w = _small_weights(x, qw)
        d, lv = _qx(xs, w, half)
        d16 = to_fp16(d, "block scale", fmt.name).reshape(x.shape[0], -1, 1)
        return {"d": d16}, (lv + half).reshape(x.shape)

    return fit_


def _min_weighted(nmax: int):
    """Q4_1 (``nmax`` 15) / Q5_1 (31): ``make_qkx3_quants(32, nmax, ...)``; fp16 ``d`` and ``m = -the_min``."""

    def fit_(x: Tensor, qw: Tensor, fmt: Format) -> tuple[dict[str, Tensor], Tensor]:
        xs, w = _small_weights(x, qw)
        d, the_min, codes = _qkx3(xs, w, nmax)
        d16 = to_fp16(d, "block scale", fmt.name).reshape(x.shape[0], -1, 1)
        m16 = to_fp16(-the_min, "block min", fmt.name).reshape(x.shape[0], -1, 1)
        return {"d": d16, "m": m16}, codes.reshape(x.shape)

    return fit_


def _super_weights(x: Tensor, qw: Tensor, twice: bool) -> tuple[Tensor, Tensor]:
    """Super-blocks [S, 256] and weights ``qw * sqrtf(sigma2 + x^2)``, ``sigma2 = (2*)sumx2 / QK_K``."""
    xs = x.reshape(-1, QK_K)
    sumx2 = _sum_sq(xs)
    sigma2 = (sumx2 * 2.0 if twice else sumx2) / float(QK_K)  # 2*sumx2/QK_K (q3..q5_K), sumx2/QK_K (Q2_K)
    return xs, _weights(xs, _per_block(qw, x.shape[0], QK_K), sigma2)


def _fit_q2_k(x: Tensor, qw: Tensor, fmt: Format) -> tuple[dict[str, Tensor], Tensor]:
    xs, w = _super_weights(x, qw, twice=False)
    sub, wsub = xs.reshape(-1, 16), w.reshape(-1, 16)
    scales, mins, fallback = _qkx3(sub, wsub, 3)
    sw = _seq_sum(wsub.t()).reshape(-1, 16).t()  # [16, S]
    dm, ls = qp_quants(scales.reshape(-1, 16).t().contiguous(), sw, 15)
    mm, lm = qp_quants(mins.reshape(-1, 16).t().contiguous(), sw, 15)
    byte = (ls.t().to(torch.int64) | (lm.t().to(torch.int64) << 4)) & 0xFF  # y.scales[j] = Ls[j] | (Lm[j] << 4)
    sc, m = (byte & 0xF).to(torch.float32), (byte >> 4).to(torch.float32)
    d16 = to_fp16(dm.unsqueeze(-1), "super-block scale", fmt.name)
    dmin16 = to_fp16(mm.unsqueeze(-1), "super-block min scale", fmt.name)
    p = {"d": (d16 * sc).unsqueeze(-1), "dm": (dmin16 * m).unsqueeze(-1), "fallback": fallback.reshape(-1, 16, 16),
         "d16": d16, "dmin16": dmin16, "sc": sc, "m": m}
    return p, _requantized(0, 3)(sub.reshape(-1, 16, 16), p)


def _kx_weighted(nmax: int):
    """Q4_K (``nmax`` 15) / Q5_K (31): ``make_qkx3_quants(32, nmax, ...)`` per sub-block, ``make_qp_quants(8, 63,
    ...)`` for the scales and mins (Q5_K then takes ``MIN(63, l)`` of the uint8_t codes, Q4_K does not)."""

    def fit_(x: Tensor, qw: Tensor, fmt: Format) -> tuple[dict[str, Tensor], Tensor]:
        xs, w = _super_weights(x, qw, twice=True)
        sub, wsub = xs.reshape(-1, 32), w.reshape(-1, 32)
        scales, mins, fallback = _qkx3(sub, wsub, nmax)
        sw = _seq_sum(wsub.t()).reshape(-1, 8).t()  # [8, S]
        d_block, ls = qp_quants(scales.reshape(-1, 8).t().contiguous(), sw, 63)
        m_block, lm = qp_quants(mins.reshape(-1, 8).t().contiguous(), sw, 63)
        ls, lm = ls.t(), lm.t()
        if nmax == 31:
            ls, lm = ls.clamp_max(63), lm.clamp_max(63)
        sc, m = _k_scale_bytes(ls, lm)
        d16 = to_fp16(d_block.unsqueeze(-1), "super-block scale", fmt.name)
        dmin16 = to_fp16(m_block.unsqueeze(-1), "super-block min scale", fmt.name)
        p = {"d": (d16 * sc).unsqueeze(-1), "dm": (dmin16 * m).unsqueeze(-1),
             "fallback": fallback.reshape(-1, 8, 32), "d16": d16, "dmin16": dmin16, "sc": sc, "m": m}
        return p, _requantized(0, nmax)(sub.reshape(-1, 8, 32), p)

    return fit_


def _fit_q3_k(x: Tensor, qw: Tensor, fmt: Format) -> tuple[dict[str, Tensor], Tensor]:
    xs, w = _super_weights(x, qw, twice=True)
    sub, wsub = xs.reshape(-1, 16), w.reshape(-1, 16)
    sw = _seq_sum(wsub.t()).reshape(-1, 16).t()  # [16, S]
    scales, fallback = _qx(sub, wsub, 4)
    d_block, lv = ggml.qx_search(scales.reshape(-1, 16).t().contiguous(), sw, 32)
    sc = lv.t().contiguous()  # the 6-bit Ls = l + 32, read back as Ls - 32
    d16 = to_fp16(d_block.unsqueeze(-1), "super-block scale", fmt.name)
    p = {"d": (d16 * sc).unsqueeze(-1), "fallback": fallback.reshape(-1, 16, 16), "d16": d16, "sc": sc}
    return p, _requantized(-4, 3)(sub.reshape(-1, 16, 16), p)


def _fit_q6_k(x: Tensor, qw: Tensor, fmt: Format) -> tuple[dict[str, Tensor], Tensor]:
    sub = x.reshape(-1, 16)
    scales, fallback = _qx(sub, _per_block(qw, x.shape[0], 16), 32)  # weights: the imatrix itself
    p = ggml.q6_k_params(scales, fallback, fmt)
    return p, _requantized(-32, 31)(sub.reshape(-1, 16, 16), p)


def _iq4_weights(x: Tensor, qw: Tensor, super_block: int) -> Tensor:
    """``qw * sqrtf(sigma2 + x^2)`` with ``sigma2 = sum(x^2) * (2.f / super_block)``, [rows * n / sb, sb]."""
    xs = x.reshape(-1, super_block)
    sigma2 = _sum_sq(xs) * _f32(2.0 / super_block)  # sigma2 *= 2.f/super_block_size (a power of two)
    return _weights(xs, _per_block(qw, x.shape[0], super_block), sigma2)


def _fit_iq4_nl(x: Tensor, qw: Tensor, fmt: Format) -> tuple[dict[str, Tensor], Tensor]:
    scale = ggml.iq4_scales(x, _iq4_weights(x, qw, 32)).reshape(x.shape[0], -1, 1)
    p = ggml.iq4_nl_params(scale, fmt)
    return p, ggml._codes_iq4(x.reshape(x.shape[0], -1, 32), p).reshape(x.shape)


def _fit_iq4_xs(x: Tensor, qw: Tensor, fmt: Format) -> tuple[dict[str, Tensor], Tensor]:
    p = ggml.iq4_xs_params(ggml.iq4_scales(x, _iq4_weights(x, qw, QK_K)), fmt)
    return p, ggml._codes_iq4(x.reshape(-1, 8, 32), p).reshape(x.shape)


def _fit_q8_0(x: Tensor, qw: Tensor, fmt: Format) -> tuple[dict[str, Tensor], Tensor]:
    blocks = x.reshape(x.shape[0], -1, 32)  # quantize_q8_0 ignores quant_weights
    p = ggml._fit_q8_0(blocks, fmt)
    return p, ggml._codes_q8_0(blocks, p).reshape(x.shape)


_FITS: dict[str, Callable[[Tensor, Tensor, Format], tuple[dict[str, Tensor], Tensor]]] = {
    "q8_0": _fit_q8_0, "q4_0": _sym_weighted(8), "q5_0": _sym_weighted(16), "q4_1": _min_weighted(15),
    "q5_1": _min_weighted(31), "q2_k": _fit_q2_k, "q3_k": _fit_q3_k, "q4_k": _kx_weighted(15),
    "q5_k": _kx_weighted(31), "q6_k": _fit_q6_k, "iq4_nl": _fit_iq4_nl, "iq4_xs": _fit_iq4_xs,
}


# ------------------------------------------------------------------------------------------------ public


def encode_weighted(x: Tensor, fmt: Format | str, imatrix: Tensor | np.ndarray) -> ggml.Encoded:
    """The codes [rows, n] and stored scales llama.cpp's ``quantize_<t>(x, ..., quant_weights=imatrix)`` writes for
    ``x`` [rows, n] (n a multiple of the block) with ``imatrix`` [n]."""
    f = _ggml_format(fmt)
    x32 = _check_x(x, f)
    qw = check_importance(imatrix, x32.shape[1], f.name)
    rows, n = x32.shape
    p, codes = _FITS[f.name](x32, qw, f)
    return ggml.Encoded(f.name, codes.reshape(rows, n), *ggml._TYPES[f.name].stored(p, rows,
                                                                                    n // f.default_block_size))


def to_gguf_bytes(x: Tensor, fmt: Format | str, imatrix: Tensor | np.ndarray | None = None) -> np.ndarray:
    """:func:`quantpredict.formats.ggml.to_gguf_bytes` with an importance matrix: ``x`` [rows, n] quantized as
    llama-quantize does with ``imatrix`` [n] (float, >= 0, finite; one per column, the same for every row;
    ``quantize_<t>`` with ``quant_weights``) and packed in the type's block layout, uint8 [rows, n / block * bytes
    per block]; dequantizing gives :func:`fake_quantize_weighted`. None: without one (``ggml.to_gguf_bytes``). A
    :class:`FormatError` for a bad ``imatrix`` or a non-ggml format with one."""
    if imatrix is None:
        return ggml.to_gguf_bytes(x, fmt)
    e = encode_weighted(x, fmt, imatrix)
    return ggml._TYPES[e.fmt].pack(e).reshape(x.shape[0], -1)


def fake_quantize_weighted(x: Tensor, fmt: Format | str, imatrix: Tensor | np.ndarray) -> Tensor:
    """``x`` [rows, n] quantized by llama.cpp with the importance ``imatrix`` [n] (one non-negative float per
    column, the same for every row) and dequantized with gguf-py's arithmetic (what ``gguf.quants.dequantize`` gives
    for :func:`to_gguf_bytes` ``(x, fmt, imatrix)``). Same shape and dtype as ``x``."""
    f = _ggml_format(fmt)
    x32 = _check_x(x, f)
    qw = check_importance(imatrix, x32.shape[1], f.name)
    if x32.numel() == 0:
        return x.detach().clone()
    p, codes = _FITS[f.name](x32, qw, f)
    t = ggml._TYPES[f.name]
    rows, n = x32.shape
    shaped = ggml._sub_blocks(codes.reshape(rows, n // f.default_block_size, f.default_block_size), f)
    return t.dequantize(shaped.contiguous(), p).reshape(rows, n).to(device=x.device, dtype=x.dtype)
