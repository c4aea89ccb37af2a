"""The token embedding and the LM head, quantized as llama.cpp's files store them (``token_embd.weight``,
``output.weight``): round to nearest in the recipe's ``embedding_format`` / ``head_format``, each ``[vocab, hidden]``
row along the hidden dimension (the GGUF row), with the format's default block. No calibration: llama-quantize
rounds them alone (with an importance matrix only for the head, which is not modelled here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantpredict.quantize.plan import embedding_and_head_plan
from quantpredict.quantize.rtn import relative_error, rtn_quantize
from quantpredict.recipe import Recipe

__all__ = ["MatrixReport", "quantize_embedding_and_head"]


@dataclass(frozen=True)
class MatrixReport:
    """One quantized embedding or head matrix: its role (``embedding``, ``head``, ``embedding+head`` when tied),
    format, shape and relative weight error ``||W_q - W|| / ||W||``."""

    role: str
    weight_format: str
    rows: int
    cols: int
    rel_weight_error: float


@torch.no_grad()
def quantize_embedding_and_head(model: nn.Module, recipe: Recipe) -> list[MatrixReport]:
    """Fake-quantize, in place, the matrices ``recipe.embedding_format`` / ``head_format`` name (none by default).
    A tied model's one matrix is quantized once. A format whose layout the rows do not fit (a K-quant on rows that
    are not a multiple of 256) raises its :class:`~quantpredict.errors.FormatError` before anything changes."""
    planned = embedding_and_head_plan(model, recipe)
    # every format checked against its matrix first: a failure changes nothing
    quantized = [rtn_quantize(p.module.weight.to(torch.float32), p.weight_format) for p in planned]
    reports = []
    for p, q in zip(planned, quantized, strict=True):
        w = p.module.weight
        err = relative_error(w.detach().to(torch.float32), q)
        w.copy_(q.to(w.dtype))
        reports.append(MatrixReport(p.role, p.weight_format, int(w.shape[0]), int(w.shape[1]), err))
    return reports
