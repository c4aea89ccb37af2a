"""Asymmetric uintK with an fp16 scale and an integer zero point per group or channel: what GPTQ checkpoints ship.

The quantizer is AutoGPTQ's (``auto_gptq/quantization/quantizer.py``, ``Quantizer.find_params`` with ``sym=False``,
which is IST-DASLab/gptq's ``quant.py``), the min/max quantizer used to fit GPTQ's groups, step by step in float32::

    xmin = min(min(x), 0); xmax = max(max(x), 0)          # the grid always holds 0
    if xmin == xmax == 0: xmin, xmax = -1, +1
    scale = (xmax - xmin) / (2^k - 1)
    zero  = round(-xmin / scale)                          # an integer in [0, 2^k - 1]
    q     = clamp(round(x / scale) + zero, 0, 2^k - 1)    # round = half to even (torch.round)

and the value is what the packed checkpoint dequantizes to: ``fp16(scale) * (q - zero)``. AutoGPTQ fits ``scale``
and the codes in float32 and packs ``scale.half()`` (its ``pack`` re-derives the same codes from the fp16 scale: a
relative scale change under 2^-11 moves ``q * scale`` by less than half a step for k <= 8), so storage adds one
rounding of the scale to fp16 and nothing else. The zero point is an integer in [0, 2^k - 1], stored as k bits
(AutoGPTQ's v1 checkpoints store ``zero - 1`` in their packed qzeros; that offset is a storage detail).

AutoAWQ's ``pseudo_quantize_tensor`` differs: it does not force 0 into the range, clamps ``max - min`` to >= 1e-5 and
the zero point to [0, 2^k - 1]; those checkpoints are not reproduced here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from quantpredict.formats.exact import to_fp16
from quantpredict.formats.table import Format


def fit(blocks: Tensor, fmt: Format) -> dict[str, Tensor]:
    """Scale and zero point of each block of ``blocks`` [R, nb, B] (float32, finite; zero padding is harmless since
    0 is always in the range): ``scale`` (float32, the fitted divisor), ``scale16`` (the stored fp16 scale as float32)
    and ``zero`` (float32 integer), each [R, nb, 1]."""
    maxq = float(2**fmt.element_bits - 1)
    zero_t = torch.zeros((), dtype=torch.float32)
    xmin = torch.minimum(blocks.amin(-1, keepdim=True), zero_t)
    xmax = torch.maximum(blocks.amax(-1, keepdim=True), zero_t)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return {"scale": scale, "scale16": to_fp16(scale, "group scale", fmt.name), "zero": zero}


def quantize(x: Tensor, fmt: Format, p: Mapping[str, Tensor]) -> Tensor:
    """``fp16(scale) * (clamp(round(x / scale) + zero, 0, 2^k - 1) - zero)`` elementwise (float32, x's shape; the
    parameters broadcast against x)."""
    q = (x / p["scale"]).round_().add_(p["zero"]).clamp_(0.0, float(2**fmt.element_bits - 1))
    return q.sub_(p["zero"]).mul_(p["scale16"])


def codes(x: Tensor, fmt: Format, p: Mapping[str, Tensor]) -> Tensor:
    """The stored integer codes q in [0, 2^k - 1] (int64, x's shape)."""
    q = (torch.round(x / p["scale"]) + p["zero"]).clamp_(0.0, float(2**fmt.element_bits - 1))
    return q.to(torch.int64)
