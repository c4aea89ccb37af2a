"""Exact low-precision number formats: OCP MX (MXFP8/6/4, MXINT2-8), per-channel/per-group intK and fp8, bf16/fp16,
and the layouts checkpoints ship: GPTQ-style asymmetric uintK (:mod:`.asym`), bitsandbytes NF4 (:mod:`.nf4`),
llama.cpp's Q8_0 and k-quants (:mod:`.ggml`), and NVIDIA's NVFP4 and per-tensor FP8 (:mod:`.tensor_scale`).

Public API::

    fake_quantize(x, fmt, *, axis=-1, block_size=None) -> Tensor   # same shape/dtype, values on the grid
    fake_quantize(x, fmt, importance=imatrix) -> Tensor             # llama.cpp formats: as with --imatrix
    get_format(name) -> Format                                      # parameters, bits_per_element(...)
    list_formats() -> list[str]
    compute_scale(x, fmt, *, axis=-1, block_size=None) -> Tensor    # the scales fake_quantize uses
    quantize_with_scale(x, fmt, scale) -> Tensor                    # round x/scale onto the grid, times scale
    fit_params(x, fmt, *, axis=-1, block_size=None) -> QuantParams  # every format: per-element parameters
    quantize_with_params(x, params) -> Tensor                       # x on the grid of those parameters

Names of the shipped layouts (lowercase; never ``_b<digits>``, which recipe labels use for a block size):

* ``uint2`` .. ``uint8``: AutoGPTQ's asymmetric min/max quantizer (:mod:`.asym`), an fp16 scale and a k-bit zero point
  per group of 128 inputs by default (what nearly every GPTQ/AWQ checkpoint on the hubs uses, and AutoGPTQ's and
  AutoAWQ's default; it costs (16 + k) / 128 bits, 0.16 at 4 bits); ``block_size`` picks g32, g64, ...
* ``uint2_pc`` .. ``uint8_pc``: the same with one scale and zero point per output channel (``block_size`` None).
* ``nf4``, ``nf4_dq``: bitsandbytes NF4, blocks of 64, without / with double quantization (:mod:`.nf4`).
* ``q8_0``, ``q5_0``, ``q5_1``, ``q4_0``, ``q4_1``, ``q2_k``, ``q3_k``, ``q4_k``, ``q5_k``, ``q6_k``, ``iq4_nl``,
  ``iq4_xs``: llama.cpp's quantizers (without an importance matrix, or with one: :mod:`.ggml_imatrix`) and GGUF
  layouts (:mod:`.ggml`); q5_0, q5_1, q8_0, q4_0 and iq4_nl are what llama.cpp stores a k-quant or IQ4_XS tensor as
  when its rows are not a multiple of 256.
* ``nvfp4``: NVIDIA NVFP4 (ModelOpt/vLLM): E2M1 elements, an E4M3 scale per 16, one FP32 scale per tensor;
  ``fp8_e4m3_pt``: FP8 E4M3 with one FP32 scale per tensor (vLLM's default FP8 weights) (:mod:`.tensor_scale`).
  ``to_gguf_bytes(x, "nvfp4")`` packs GGUF's NVFP4 type where the two layouts meet.

``fake_quantize(x, f, block_size=B) == quantize_with_scale(x, f, compute_scale(x, f, block_size=B))`` whenever x's
axis has length B: GPTQ fits a block's scales once, then quantizes column by column with them. For every format,
``fake_quantize(x, f, block_size=B) == quantize_with_params(x, fit_params(x, f, block_size=B))``.
"""

from __future__ import annotations

from typing import Any

from quantpredict.formats.table import ELEMENTS, FORMATS, Element, Format, get_format, list_formats

# The tables above need no torch (quantpredict.recipe and the run store validate format names without it); the
# tensor functions load torch on first use.
_TENSOR_API = {
    "fake_quantize": "quantpredict.formats.core",
    "to_gguf_bytes": "quantpredict.formats.ggml",
    "QuantParams": "quantpredict.formats.params",
    "fit_params": "quantpredict.formats.params",
    "quantize_with_params": "quantpredict.formats.params",
    "compute_scale": "quantpredict.formats.reference",
    "expand_scale": "quantpredict.formats.reference",
    "fake_quantize_reference": "quantpredict.formats.core",
    "quantize_with_scale": "quantpredict.formats.reference",
    "round_to_element": "quantpredict.formats.reference",
}

__all__ = ["ELEMENTS", "FORMATS", "Element", "Format", "get_format", "list_formats", *_TENSOR_API]


def __getattr__(name: str) -> Any:
    if name in _TENSOR_API:
        import importlib

        value = getattr(importlib.import_module(_TENSOR_API[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'quantpredict.formats' has no attribute {name!r}")
