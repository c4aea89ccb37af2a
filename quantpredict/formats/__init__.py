"""Exact low-precision number formats: OCP MX (MXFP8/6/4, MXINT2-8), per-channel/per-group intK and fp8, bf16/fp16.

Public API::

    fake_quantize(x, fmt, *, axis=-1, block_size=None) -> Tensor   # same shape/dtype, values on the grid
    get_format(name) -> Format                                      # parameters, bits_per_element(...)
    list_formats() -> list[str]
    compute_scale(x, fmt, *, axis=-1, block_size=None) -> Tensor    # the scales fake_quantize uses
    quantize_with_scale(x, fmt, scale) -> Tensor                    # round x/scale onto the grid, times scale

``fake_quantize(x, f, block_size=B) == quantize_with_scale(x, f, compute_scale(x, f, block_size=B))`` whenever x's
axis has length B: GPTQ fits a block's scales once, then quantizes column by column with them.

The tables (``get_format``, ``list_formats``, ``FORMATS``, ``ELEMENTS``) need no torch: ``quantpredict.recipe`` and
the run store validate format names without it. The tensor functions load torch on first use.
"""

from __future__ import annotations

from typing import Any

from quantpredict.formats.table import ELEMENTS, FORMATS, Element, Format, get_format, list_formats

_TENSOR_API = {
    "fake_quantize": "quantpredict.formats.core",
    "compute_scale": "quantpredict.formats.reference",
    "expand_scale": "quantpredict.formats.reference",
    "fake_quantize_reference": "quantpredict.formats.reference",
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
