"""Formats scaled per tensor first: NVIDIA's NVFP4 and FP8 E4M3 with one FP32 scale per tensor, as shipped for GPUs.

**fp8_e4m3_pt** (vLLM's default FP8 weight quantization, ``Fp8LinearMethod`` on an unquantized checkpoint, and the
per-tensor FP8 checkpoints of ModelOpt and llm-compressor)::

    g = amax(|tensor|) / 448                  # the FP32 per-tensor scale
    q = e4m3(x / g)                           # float8_e4m3fn: nearest, ties to even, clamped to +-448
    value = q * g

**nvfp4** (NVIDIA NVFP4 as ModelOpt's ``NVFP4QTensor`` quantizes weights and vLLM loads them): FP4 E2M1 elements
{0, 0.5, 1, 1.5, 2, 3, 4, 6} in blocks of 16 contiguous elements of a row, each block with an E4M3 scale, and one FP32
scale per tensor::

    g = amax(|tensor|) / (6 * 448)            # float32: 2688 is exact, so one rounded division
    s = e4m3((amax(|block|) / 6) / g)         # two float32 divisions in that order; nearest, ties to even, saturating
                                              # at 448 (the ratio exceeds 448 by at most an ulp, or for values
                                              # beyond the fitted range); an all-zero block stores s = 1 (ModelOpt)
    d = s * g                                 # float32
    q = e2m1(x / d)                           # nearest, ties to even (ModelOpt's bounds table rounds ties to the
                                              # even code, i.e. the value with mantissa bit 0), clamped to +-6
    value = q * d

Choices, and where they come from:

* *Arithmetic*: every step is one IEEE float32 operation in the order above, the order of ModelOpt's torch code
  (``get_weights_scaling_factor_2``, ``get_weights_scaling_factor``, ``quantize``: ``x / (s.float() * g)``) and of
  its dequantization (``codes * (s * g)``). vLLM's CUDA activation quantizers multiply by float32 reciprocals instead
  of dividing (``1 / scale``); that can move an element across a rounding boundary by an ulp, so activations quantized
  here are the definition above, not necessarily vLLM's kernels' last bit.
* *Zeros*: an all-zero tensor has g = 0 and quantizes to zeros; so does a block whose scale rounds to 0 in E4M3
  (amax(block) at most about amax(tensor) / (448 * 2^10)), where d = 0 (ModelOpt divides by 0 there and multiplies
  the resulting codes by 0 again: zeros as well). A negative value that rounds to 0 gives -0.0 (code 0b1000).
* *Short blocks*: a row whose length is not a multiple of 16 ends in a shorter block, quantized as if zero-padded
  (zeros change no amax): NVIDIA's kernels need multiples of 16, ModelOpt pads.
* *The per-tensor scale* is fitted on the whole tensor passed in (for a weight, the whole [out, in] matrix; for
  activations, the whole activation tensor: dynamic per-tensor scaling). A slice quantized alone (GPTQ's groups)
  takes it from parameters fitted on the whole tensor (``fit_params(..., stats_from=...)``).
* *Size*: 4 + 8/16 = 4.5 bits per element for nvfp4, 8 for fp8_e4m3_pt; the 32 bits of the per-tensor scale are
  not counted (see :meth:`quantpredict.formats.Format.bits_per_element`).

**GGUF.** gguf-py 0.19 (and llama.cpp) have a type NVFP4 (``GGMLQuantizationType.NVFP4``, 40): super-blocks of 64
elements in 36 bytes, four UE4M3 sub-scales (one per 16 elements; UE4M3 is E4M3 without a sign, decoded as
``s * 0.5`` against E2M1 values doubled, i.e. ``s * e2m1`` exactly; code 0x7F reads as 0) and 32 bytes of E2M1 codes
(sub-block j's byte i holds element i in its low nibble, element i + 8 in its high one). It has **no per-tensor
scale**. The two layouts meet where every block's ``d = s * g`` (as float32) is itself an E4M3 value: then the
GGUF sub-scale is ``d`` (the per-tensor scale folded into the sub-scales), ``q * d`` is exact in float32, and gguf's
dequantizer gives the values here bit for bit (except the sign of zero: gguf's code 0b1000 reads +0, NVFP4's is
-0). That holds when g = 1 (amax(tensor) = 2688), and when g = 2^-k (amax(tensor) = 2688 / 2^k) as long as no
folded scale ``s * 2^-k`` drops into E4M3's subnormals with bits lost; never for g > 1 (the block holding the tensor's
amax has s = 448, and 448 g is past E4M3's largest value). Elsewhere they do not meet: an NVFP4 tensor with a general
FP32 scale has values ``q * fl(s * g)`` that no GGUF NVFP4 block can hold exactly, and :func:`to_gguf_bytes` raises
rather than round. Rows must be a multiple of 64 (GGUF's super-block). gguf-py's own quantizer for this type
(``fp32_to_ue4m3``) rounds sub-scales half up and is not used here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from quantpredict.errors import FormatError
from quantpredict.formats.reference import round_to_element
from quantpredict.formats.table import ELEMENTS, Format

#: The parameters fitted on the whole tensor (what ``fit_params(..., stats_from=...)`` takes from the whole).
TENSOR_STATS = ("tensor_scale",)
GGUF_BLOCK = 64  # elements per GGUF NVFP4 super-block (4 sub-blocks of 16)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; code 8 + k is -E2M1_VALUES[k]


def _scale_max(fmt: Format) -> float:
    """The largest block scale (448 for an E4M3 block scale; 1 without block scales)."""
    return ELEMENTS[fmt.scale_element].max_normal if fmt.scale_element else 1.0


def _safe(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.ones_like(d), d)


def fit(blocks: Tensor, fmt: Format, stats: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Parameters of each block of ``blocks`` [R, nb, B] (float32, finite; the whole tensor unless ``stats`` is
    given), each [R, nb, 1]: ``tensor_scale`` (g), ``scale`` (the divisor d: g, or s * g for NVFP4) and for NVFP4
    ``block_scale`` (s, an E4M3 value). ``stats``: ``tensor_scale`` [R, nb, 1] fitted on the whole tensor, for a
    slice of it."""
    if stats is None:
        amax = blocks.abs().amax() if blocks.numel() else torch.zeros(())
        g = (amax / torch.tensor(fmt.max_normal * _scale_max(fmt))).expand(*blocks.shape[:-1], 1)
    else:
        g = stats["tensor_scale"].to(torch.float32)
    out = {"tensor_scale": g.contiguous()}
    if fmt.scale_element is None:
        out["scale"] = out["tensor_scale"]
        return out
    bamax = blocks.abs().amax(-1, keepdim=True)
    ratio = (bamax / torch.tensor(fmt.max_normal)) / _safe(g)
    s = round_to_element(torch.where(g == 0, torch.zeros_like(ratio), ratio), fmt.scale_element)
    s = torch.where(bamax == 0, torch.ones_like(s), s)  # ModelOpt stores 1.0 for an all-zero block
    out["block_scale"] = s
    out["scale"] = s * g
    return out


def codes(x: Tensor, fmt: Format, p: Mapping[str, Tensor]) -> Tensor:
    """The element value ``q`` of each element (float32, on the E2M1 or E4M3 grid, x's shape; 0 where d = 0)."""
    d = p["scale"]
    q = round_to_element(x / _safe(d), fmt.element_format)
    return torch.where(d == 0, torch.zeros_like(q), q)


def quantize(x: Tensor, fmt: Format, p: Mapping[str, Tensor]) -> Tensor:
    """``q * d`` elementwise (float32, x's shape; the parameters broadcast against x)."""
    return codes(x, fmt, p) * p["scale"]


def to_gguf_bytes(x: Tensor, fmt: Format) -> np.ndarray:
    """``x`` [rows, n] (n a multiple of 64) quantized to nvfp4 and packed as GGUF's NVFP4 blocks (36 bytes per 64
    elements, uint8 [rows, n / 64 * 36]), the per-tensor scale folded into the sub-scales. A :class:`FormatError`
    where that is not exact (see the module docstring): ``gguf.quants.dequantize(out, GGMLQuantizationType.NVFP4)``
    then equals ``fake_quantize(x, "nvfp4")`` bit for bit, up to the sign of zero."""
    from quantpredict.formats.reference import _blocked, check_finite

    if fmt.name != "nvfp4":
        raise ValueError(f"GGUF has no layout for {fmt.name}; of the per-tensor formats only nvfp4 has one")
    if x.dim() != 2 or x.shape[1] % GGUF_BLOCK:
        raise FormatError(f"GGUF NVFP4 needs a 2-D [rows, n] tensor with n a multiple of {GGUF_BLOCK}, got shape "
                          f"{tuple(x.shape)}")
    x32 = x.detach().to(torch.float32)
    check_finite(x32, fmt.name)
    blocks = _blocked(x32, fmt.default_block_size)  # [R, n/16, 16]
    p = fit(blocks, fmt)
    q = codes(blocks, fmt, p)
    d = p["scale"][..., 0]  # [R, n/16]
    used = (q != 0).any(-1)
    folded = d.to(torch.float8_e4m3fn)
    exact = folded.to(torch.float32) == d
    bad = used & ~exact
    if bool(bad.any()):
        r, b = (int(i) for i in bad.nonzero()[0])
        raise FormatError(
            f"the nvfp4 per-tensor scale {float(p['tensor_scale'].flatten()[0]):.9g} cannot be folded into GGUF "
            f"NVFP4's UE4M3 sub-scales exactly ({int(bad.sum())} blocks; row {r}, block {b}: "
            f"{float(p['block_scale'][r, b, 0]):g} * g = {float(d[r, b]):.9g} is no E4M3 value); GGUF NVFP4 has no "
            "per-tensor scale: it meets nvfp4 where amax(tensor) is 2688 / 2^k, k >= 0")
    scale_bytes = torch.where(used, folded.view(torch.uint8), torch.zeros_like(folded.view(torch.uint8)))
    a = q.abs()
    index = torch.bucketize(a, torch.tensor(E2M1_VALUES))  # exact: a is on the grid
    code = (index + torch.where(torch.signbit(q), 8, 0)).to(torch.uint8)  # -0 keeps code 8, read as +0 by gguf
    code = code.reshape(x.shape[0], -1, 4, 2, 8)  # [R, super-blocks, sub-blocks, halves, 8]
    qs = code[..., 0, :] | (code[..., 1, :] << 4)  # [R, S, 4, 8]
    rows, supers = x.shape[0], x.shape[1] // GGUF_BLOCK
    out = torch.cat([scale_bytes.reshape(rows, supers, 4), qs.reshape(rows, supers, 32)], dim=-1)
    return out.reshape(rows, -1).numpy()
