"""Exact low-precision number formats: OCP MX (MXFP8/6/4, MXINT2-8), per-channel/per-group intK and fp8, bf16/fp16.

Public API::

    fake_quantize(x, fmt, *, axis=-1, block_size=None) -> Tensor   # same shape/dtype, values on the grid
    get_format(name) -> Format                                      # parameters, bits_per_element(...)
    list_formats() -> list[str]
    compute_scale(x, fmt, *, axis=-1, block_size=None) -> Tensor    # the scales fake_quantize uses
    quantize_with_scale(x, fmt, scale) -> Tensor                    # round x/scale onto the grid, times scale

``fake_quantize(x, f, block_size=B) == quantize_with_scale(x, f, compute_scale(x, f, block_size=B))`` whenever x's
axis has length B: GPTQ fits a block's scales once, then quantizes column by column with them.
"""

from quantpredict.formats.core import fake_quantize
from quantpredict.formats.reference import (
    compute_scale,
    expand_scale,
    fake_quantize_reference,
    quantize_with_scale,
    round_to_element,
)
from quantpredict.formats.table import ELEMENTS, FORMATS, Element, Format, get_format, list_formats

__all__ = [
    "ELEMENTS",
    "FORMATS",
    "Element",
    "Format",
    "compute_scale",
    "expand_scale",
    "fake_quantize",
    "fake_quantize_reference",
    "get_format",
    "list_formats",
    "quantize_with_scale",
    "round_to_element",
]
