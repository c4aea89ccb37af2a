"""Activation outliers at SmoothQuant's pairs, and what smoothing does to each pair's quantized output.

For every norm -> linears pair SmoothQuant folds (:func:`quantpredict.arch.smooth_pairs`), :func:`outlier_profile`
measures on the FP model, over calibration windows, the per-channel ``max|x|`` of the norm's output (the pair's
linears' common input) and summarises it by the **outlier ratio** ``max_j max|x_j| / median_j max|x_j|``: 1 for
flat channels, large where a few channels carry outliers (the LLM.int8() / SmoothQuant picture).

:func:`smoothing_local_errors` then measures, per pair and on a few calibration windows, the relative output error
``sum_i ||Q_a(X/s) Q_w(W_i s)^T - X W_i^T||^2 / sum_i ||X W_i^T||^2`` over the pair's linears, with ``s`` SmoothQuant's
scales at each alpha (``s = 1``: no smoothing), weights rounded to the nearest (RTN, the recipe's block size) and
activations fake-quantized as at run time. It is the local view of SmoothQuant's trade: smoothing moves the
activation range into the weights; whether that lowers the pair's error is what ``gain = 1 - err(s) / err(1)``
says. The FP model's inputs are used for every pair (no earlier pair is quantized), unlike the block-by-block
calibration of :func:`quantpredict.quantize.quantize_model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from quantpredict import arch


@dataclass(frozen=True)
class PairOutliers:
    """One smooth pair's input statistics: per-channel ``max|x|`` summarised (``ratio`` = max over median)."""

    block: int
    norm: str
    linears: tuple[str, ...]
    channels: int
    max: float
    median: float
    ratio: float
    top_channel: int
    p99_ratio: float  # the 99th percentile channel's max|x| over the median: outliers beyond one channel

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pairs(model: nn.Module) -> list[arch.SmoothPair]:
    return [p for i in range(len(arch.blocks(model))) for p in arch.smooth_pairs(model, i)]


@torch.no_grad()
def pair_absmax(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{norm name: per-channel max|x| [in]}`` of every smooth pair's input over ``windows`` [n, seq] (FP model)."""
    from quantpredict.quantize.calib import capture_linear_inputs

    pairs = _pairs(model)
    firsts = [p.linears[0] for p in pairs]
    with capture_linear_inputs(firsts, hessian=False) as stats:
        for lo in range(0, windows.shape[0], batch_size):
            model(windows[lo : lo + batch_size], use_cache=False)
    return {p.norm_name: stats[p.linears[0].name].absmax.clone() for p in pairs}


def summarise(pair: arch.SmoothPair, absmax: torch.Tensor) -> PairOutliers:
    """The :class:`PairOutliers` of one pair from its per-channel ``max|x|``."""
    a = absmax.double()
    med = float(a.median())
    top = int(a.argmax())
    p99 = float(torch.quantile(a, 0.99))
    ratio = float(a.max()) / med if med > 0 else float("inf")
    return PairOutliers(pair.linears[0].block_index, pair.norm_name, tuple(r.name for r in pair.linears),
                        int(a.numel()), float(a.max()), med, ratio, top, p99 / med if med > 0 else float("inf"))


def outlier_profile(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8
                    ) -> tuple[list[PairOutliers], dict[str, torch.Tensor]]:
    """Every smooth pair's :class:`PairOutliers` (block order) and the per-channel ``max|x|`` they came from."""
    absmax = pair_absmax(model, windows, batch_size=batch_size)
    return [summarise(p, absmax[p.norm_name]) for p in _pairs(model)], absmax


@dataclass(frozen=True)
class LocalError:
    """A pair's relative output error under one weight format and smoothing alpha (``None``: no smoothing)."""

    norm: str
    weight_format: str
    alpha: float | None
    error: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pair_error(x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor, fmt: str, block: int | None,
                act_format: str, act_block: int | None) -> float:
    """``sum_i ||Q_a(x/s) Q_w(W_i s)^T - x W_i^T||^2 / sum_i ||x W_i^T||^2`` (float64 sums; ``x`` [T, in])."""
    from quantpredict.formats import fake_quantize
    from quantpredict.quantize.rtn import rtn_quantize

    xq = fake_quantize((x.double() / s).float(), act_format, axis=-1, block_size=act_block)
    num = den = 0.0
    for w in weights:
        wq = rtn_quantize((w.double() * s.unsqueeze(0)).float(), fmt, block_size=block)
        y = x @ w.T
        num += float((xq @ wq.T - y).double().pow(2).sum())
        den += float(y.double().pow(2).sum())
    return num / den if den > 0 else 0.0


@torch.no_grad()
def smoothing_local_errors(model: nn.Module, windows: torch.Tensor, absmax: dict[str, torch.Tensor],
                           formats: Sequence[str], alphas: Sequence[float | None], *, act_format: str = "mxint8",
                           act_block_size: int | None = 32) -> list[LocalError]:
    """Per pair, format and alpha, the pair's relative W+A output error (see the module docstring) on ``windows``
    (one forward pass: keep them few, e.g. 4 windows of 256 tokens). ``absmax`` from :func:`pair_absmax` sets the
    smoothing scales, as SmoothQuant's calibration would."""
    from quantpredict.quantize.smoothquant import smoothing_scales
    from quantpredict.recipe import Recipe

    pairs = _pairs(model)
    blocks = {f: Recipe(f).weight_block_size for f in formats}
    out: list[LocalError] = []
    handles = []

    def hook(_module, args, pair):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        ws = [r.weight.detach().float() for r in pair.linears]
        for alpha in alphas:
            s = (torch.ones(x.shape[1], dtype=torch.float64) if alpha is None
                 else smoothing_scales(absmax[pair.norm_name], ws, alpha))
            for f in formats:
                out.append(LocalError(pair.norm_name, f, alpha,
                                      _pair_error(x, ws, s, f, blocks[f], act_format, act_block_size)))

    for p in pairs:
        handles.append(p.linears[0].module.register_forward_pre_hook(lambda m, a, p=p: hook(m, a, p)))
    try:
        model(windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out
