"""Weights that hold NaN or Inf, refused before any quantization or measurement: the one check shared by a built
model (:func:`quantpredict.arch.check_finite`) and a checkpoint's tensors read without one
(:mod:`quantpredict.checkpoint_rtn`). Torch only, no transformers; :func:`nonfinite_error` imports neither."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from quantpredict.errors import ModelError


def check_finite_tensors(named: Iterable[tuple[str, Any]]) -> None:
    """Raise :class:`ModelError` naming the first of ``named`` (``(name, tensor)`` pairs: a model's parameters, or
    a checkpoint's tensors) whose floating values hold NaN or Inf: such weights cannot be quantized or measured."""
    import torch

    for name, p in named:
        if p.numel() == 0 or not p.is_floating_point():
            continue
        lo, hi = torch.aminmax(p.detach())  # one pass, no mask: NaN propagates into both, Inf shows at an end
        if math.isfinite(float(lo)) and math.isfinite(float(hi)):
            continue
        bad = (~torch.isfinite(p.detach())).sum().item()
        if bad:
            raise nonfinite_error(name, bad, p.numel())


def nonfinite_error(name: str, bad: int, total: int) -> ModelError:
    """The error for the tensor ``name`` whose ``bad`` values of ``total`` are NaN or Inf (callers that count them
    without torch raise it too)."""
    return ModelError(f"parameter {name!r} holds {bad} NaN/Inf value(s) of {total}; the model's weights are corrupt "
                      "(re-load or re-train it) and cannot be quantized or measured")
