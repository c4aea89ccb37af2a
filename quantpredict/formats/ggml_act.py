"""llama.cpp's activation formats: what its CPU backend quantizes the input of a quantized matmul to.

A matmul of a quantized weight on llama.cpp's CPU backend first converts the float32 activations (``src1``) to the
weight type's ``vec_dot_type`` (``type_traits_cpu`` in ggml-cpu.c, :mod:`quantpredict.runtime`), with that type's
``from_float``, then multiplies integer codes. Two formats here give the values those codes stand for, bit for bit
with the code an x86 build (AVX, AVX2 or AVX-512; ``GGML_NATIVE`` on this machine) runs:

* **q8_0_x86** (blocks of 32, the ``block_q8_0`` layout): ``quantize_row_q8_0`` of ggml-cpu/arch/x86/quants.c, the
  ``from_float`` of Q8_0 (the ``vec_dot_type`` of Q4_0, Q5_0, Q8_0 and IQ4_NL weights)::

      amax = max |x|;  d = amax / 127;  id = 127 / amax (0 if amax is 0)   # float32 divisions
      q = round_half_even(x * id)        # _mm256_round_ps(_MM_ROUND_NEAREST)
      value = q * fp16(d)                # the dot product reads the stored fp16 d

  It is *not* ``quantize_row_q8_0_ref`` (the weight quantizer, format ``q8_0``): the reference multiplies by
  ``1 / (amax / 127)`` and rounds with ``roundf`` (halves away from zero). The two differ where ``x * id`` is within
  an ulp of a half-integer: 10 codes in 4M normal values, 0.14% of codes for bf16-valued inputs (their short
  mantissas make exact halves common), 0.08% for integers (the pinned source compiled with ``-mavx2``; the stored
  ``d`` never differs). The same function is ``from_float`` of Q8_1 (the ``vec_dot_type`` of Q4_1 and Q5_1): its
  codes and ``d`` equal Q8_0's, so Q8_1 is this format too (departure: Q8_1 also stores ``s = fp16(d * sum q)``
  (float32 ``d``), which the Q4_1/Q5_1 dot product multiplies by the weight block's min where the values here
  would give ``fp16(d) * sum q``: the two differ by an fp16 rounding of the block sum, up to 2^-11 of it).
  The AMX kernels (amx/mmq.cpp ``from_float<block_q8_0>``) and the repacked Q4_0/IQ4_NL 8x8 kernels
  (``ggml_quantize_mat_q8_0_4x8`` of arch/x86/repack.cpp: the same ``127 / amax`` and ``_mm256_round_ps``) give the
  same codes.
* **q8_k** (blocks of 256, the ``block_q8_K`` layout: float32 ``d``, 256 int8 codes, 16 int16 sums of 16 codes):
  ``quantize_row_q8_K_ref`` of ggml-quants.c, which the x86 ``quantize_row_q8_K`` calls as it is, the ``from_float``
  of Q8_K (the ``vec_dot_type`` of the k-quants and IQ4_XS)::

      max = the block's first value of largest |x|  (signed)
      iscale = -127 / max;  d = 1 / iscale     # float32; an all-zero block stores d = 0 and zero codes
      q = min(127, nearest_int(iscale * x))     # nearest_int: round half to even
      value = q * d                             # float32 d: no fp16 rounding

  The AMX kernels quantize to Q8_K with the same reference function (their ``quantize_row_q8_K_vnni`` is disabled),
  and the repacked Q4_K/Q2_K kernels' ``ggml_quantize_mat_q8_K_4x8`` (``±127 / amax``, ``_mm256_round_ps``) give
  the same values (codes and ``d`` may both change sign: the value does not).

Values beyond a fitted block (GPTQ quantizing with another block's parameters) clamp to ``±127``; the C code never
meets them. Rows must be a multiple of the block. ``fake_quantize(x, fmt)`` along the last axis of an activation
``[tokens, hidden]`` is what the runtime's dot product sees; :func:`to_ggml_bytes` packs the C structs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from quantpredict.formats.exact import nearest_int, rdiv, to_fp16
from quantpredict.formats.ggml import Encoded, _d_stored, _GgmlType, _pack_q8_0, _simple_fit, _times_d
from quantpredict.formats.table import Format

#: bytes of one ``block_q8_K``: float d, int8 qs[256], int16 bsums[16]
Q8_K_BYTES = 4 + 256 + 2 * 16


# ------------------------------------------------------------------------------------------- Q8_0 (x86 SIMD)


def _fit_q8_0_x86(blocks: Tensor, fmt: Format) -> dict[str, Tensor]:
    """``id = 127 / amax`` (one float32 division, not the reference's ``1 / (amax / 127)``) and fp16 ``amax / 127``;
    ``id = 0`` for an all-zero block. [R, nb, 32] -> [R, nb, 1] each."""
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax != 0, rdiv(127.0, amax), torch.zeros_like(amax))
    return {"inv": inv, "d": to_fp16(amax / 127.0, "block scale (max|x| / 127)", fmt.name)}


def _codes_round_even(x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
    """``round_half_even(x * id)`` (``_mm256_round_ps`` with ``_MM_ROUND_NEAREST``), clamped to ±127 for values
    beyond the fitted block, +0 for 0 (float codes, x's shape). Where ``id`` overflowed to inf (a block whose max|x|
    is below 127 / FLT_MAX, so its fp16 ``d`` is 0 and every value 0) the product is not finite and the C code's
    ``_mm256_cvtps_epi32`` gives INT_MIN, saturated to -128 by its packs: the code here too."""
    v = x * p["inv"]
    q = torch.round(v).clamp_(-127.0, 127.0).add_(0.0)
    return torch.where(torch.isfinite(v), q, torch.full_like(q, -128.0))


# ------------------------------------------------------------------------------------------------------ Q8_K


def _fit_q8_k(blocks: Tensor, fmt: Format) -> dict[str, Tensor]:
    """``iscale = -127 / max`` (``max`` the first value of largest |x|, signed, as the C loop's strict ``>``) and the
    float32 ``d = 1 / iscale``; both 0 for an all-zero block. [R, nb, 256] -> [R, nb, 1] each."""
    where = blocks.abs().argmax(-1, keepdim=True)  # torch.argmax returns the first maximal index
    big = blocks.gather(-1, where)
    zero = big == 0
    safe = torch.where(zero, torch.ones_like(big), big)
    iscale = torch.where(zero, torch.zeros_like(big), rdiv(-127.0, safe))
    d = torch.where(zero, torch.zeros_like(big), rdiv(1.0, torch.where(zero, torch.ones_like(iscale), iscale)))
    return {"inv": iscale, "d": d}


def _codes_q8_k(x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
    """``MIN(127, nearest_int(iscale * x))`` (and -127 below, for values beyond the fitted block), +0 for 0."""
    return nearest_int(x * p["inv"]).clamp_(-127, 127).to(torch.float32).add_(0.0)


def _pack_q8_k(e: Encoded) -> np.ndarray:
    """``block_q8_K``: float32 d, int8 qs[256], int16 bsums[16] (the sums of each 16 consecutive codes)."""
    q = e.codes.to(torch.int8).numpy().reshape(-1, 256)
    bsums = q.astype(np.int16).reshape(-1, 16, 16).sum(-1, dtype=np.int16)
    d = e.d.to(torch.float32).numpy().reshape(-1, 1).view(np.uint8)
    return np.concatenate([d, q.view(np.uint8), bsums.view(np.uint8)], axis=1)


#: Every activation format, by name: how it fits, codes, dequantizes, stores and packs (:mod:`.ggml`'s record).
_TYPES: dict[str, _GgmlType] = {
    "q8_0_x86": _GgmlType(fit=_simple_fit(_fit_q8_0_x86), elementwise=("inv", "d"),
                          codes=_codes_round_even, dequantize=_times_d, stored=_d_stored,
                          pack=_pack_q8_0),
    "q8_k": _GgmlType(fit=_simple_fit(_fit_q8_k), elementwise=("inv", "d"), codes=_codes_q8_k,
                      dequantize=_times_d, stored=_d_stored, pack=_pack_q8_k),
}


# ----------------------------------------------------------------------------------------------------- public


def fit(blocks: Tensor, fmt: Format, use_native: bool = True) -> dict[str, Tensor]:
    """``inv`` (the multiplier the codes are rounded from) and ``d`` (the scale they are dequantized with) of each
    block of ``blocks`` [R, nb, B], each [R, nb, 1]. ``use_native`` is accepted for the shipped formats' signature;
    there is no search to run."""
    return _TYPES[fmt.name].fit(blocks, fmt, use_native)


def codes(x: Tensor, fmt: Format, p: Mapping[str, Tensor]) -> Tensor:
    """The int8 codes -127..127 (float32, x's shape) of ``x`` with parameters ``p`` broadcasting against it."""
    return _TYPES[fmt.name].codes(x, p)


def quantize(x: Tensor, fmt: Format, p: Mapping[str, Tensor]) -> Tensor:
    """``q * d`` elementwise (float32, x's shape): what the runtime's integer dot product stands for."""
    t = _TYPES[fmt.name]
    return t.dequantize(t.codes(x, p), p)


def fake_quantize_blocks(blocks: Tensor, fmt: Format, use_native: bool = True) -> Tensor:
    """``quantize(blocks, fmt, fit(blocks, fmt))``: [R, nb, B] float32 -> the same shape."""
    return quantize(blocks, fmt, fit(blocks, fmt, use_native))


def to_ggml_bytes(x: Tensor, fmt: Format | str) -> np.ndarray:
    """``x`` [rows, n] (float32 activations, n a multiple of the block) as the CPU backend stores them before the dot
    product: ``block_q8_0`` (34 bytes per 32) for q8_0_x86, ``block_q8_K`` (292 bytes per 256) for q8_k; uint8
    [rows, n / block * bytes]."""
    from quantpredict.formats.table import get_format

    f = get_format(fmt)
    if f.name not in _TYPES:
        raise ValueError(f"{f.name} is not a llama.cpp activation format; those are: {', '.join(_TYPES)}")
    if x.dim() != 2:
        raise ValueError(f"to_ggml_bytes needs a 2-D [rows, n] tensor, got shape {tuple(x.shape)}")
    x32 = x.detach().to(torch.float32)
    rows, n = x32.shape
    f.check_row_length(n)
    blocks = x32.reshape(rows, n // f.default_block_size, f.default_block_size)
    t = _TYPES[f.name]
    p = t.fit(blocks, f, False)
    q = t.codes(blocks, p).reshape(rows, n)
    e = Encoded(f.name, q, *t.stored(p, rows, n // f.default_block_size))
    return t.pack(e).reshape(rows, -1)
