"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024).

The few input channels that carry large activations matter most; scaling them up in the weight before rounding
(and down in the activation, which is folded into the previous op so the model computes the same function)
protects them. For the linears ``W_1 .. W_k`` reading one input ``X`` (a *scaling group*), per input channel::

    s = mean|X|^alpha,  s <- s / sqrt(max(s) * min(s)),   alpha = 0, 1/20, ..., 19/20

and the ``alpha`` minimising the group's output error after rounding, ``sum_i ||Q(W_i diag(s)) diag(s)^-1 X -
W_i X||^2`` (the paper's Eq. 4; computed exactly from the layer-input Hessian ``H = 2/N X^T X`` over every
calibration token), is kept. ``1/s`` is folded into the norm before the group (SmoothQuant's fold, exact per
architecture, Gemma's ``(1 + w)`` norms included) or into the output rows of a previous linear
(:class:`quantpredict.arch.LinearFold`), ``s`` into the group's input columns. Then a clipping search (AutoAWQ's
``auto_clip``): for every linear but those producing queries and keys, per output row and quantization group, the
largest ``|w|`` is shrunk to ``(1 - i/20) max|w|``, ``i = 0 .. 9``, keeping the shrink with the lowest output error
of that group, ``d_g H_gg d_g^T``. Finally the recipe's method rounds the weights: RTN the scaled, clipped ones, GPTQ
the scaled ones (see below).

Groups (see :func:`quantpredict.arch.awq_groups`): every norm -> linears pair (q/k/v; gate/up; a parallel block's
shared norm feeds attention and MLP at once), ``v_proj -> o_proj`` when v and o's input have the same width (no
grouped-query attention; fused ``c_attn``/``qkv_proj``: their last third), ``up_proj -> down_proj`` (gated MLPs;
fused ``gate_up_proj``: its second half), and OPT's ``fc1 -> fc2`` through its ReLU. Architectures without an
exact norm fold are refused as SmoothQuant refuses them.

Following AutoAWQ's defaults: 20 grid points, ``s`` normalised by ``sqrt(max * min)`` and clamped at ``1e-4``, every
group searched on the block's unscaled weights and then all applied, scales searched with RTN of each layer's own
format (also when GPTQ rounds), clipping on (q/k excluded), max shrink 0.5 on a grid of 20. Deviations:

* ``duo_scaling`` is off, as in the paper and the original llm-awq code (``s = mean|x|^alpha``); AutoAWQ's
  ``quantize()`` defaults to ``duo_scaling=True`` (``s = mean|x|^alpha / mean|w_hat|^(1 - alpha)``), available here as
  ``duo_scaling=True`` of :func:`search_scales` but not in a recipe.
* The loss is each group's own output (the paper's Eq. 4), not the output of AutoAWQ's ``module2inspect`` (the
  whole attention or MLP module for the q/k/v and gate/up groups): exact from ``H`` with all calibration tokens and
  no forward passes, at the price of ignoring the softmax and gating nonlinearities in the objective.
* Calibration follows :func:`quantpredict.quantize.quantize_model`: block ``i`` sees the outputs of the blocks
  before it *as quantized* (GPTQ's order), whereas AutoAWQ propagates full-precision outputs.
* The grid's loss products ``dW H`` run in float32 with float64 sums (``dW`` itself formed in float64): a 1e-6
  relative error (float32 rounding over rows of up to 8960 terms), where AutoAWQ compares losses computed in the
  model's fp16/bf16; the search on a 1.5B model's 8960-wide down projections takes half the time of float64 products
  (measured: 3.3 s against 6.5 s for one [1536, 8960] x [8960, 8960] product, one thread). A near-tie between two
  grid points within that error may resolve differently from the float64 search this module used before
  2026-12-07 (the stored AWQ runs of the zoo sweeps).
* The clip search reads each group's error from the diagonal block ``H_gg`` of the Hessian over all tokens instead of
  AutoAWQ's 512 sampled tokens, with the same float32 products and float64 sums as the scale search (since
  2026-12-07: a per-channel layer's clip search is one ``[out, in] x [in, in]`` product per grid point, and in
  float64 it was a third of a weights-only AWQ price; SmolLM2's int4-rtn-awq price kept its features, 102 s -> 94 s);
  groups are the format's block (the whole row for per-channel formats or rows that are not a multiple of the
  block; the 256-element super-block for k-quants, whose sub-block scales couple inside it).
* GELU-type MLPs (GPT-2, GPT-NeoX, GPT-J, Phi, Falcon, BLOOM) get no ``fc1 -> fc2`` group: AutoAWQ inserts a
  ``ScaledActivation`` module there, which would change the model's architecture (and its saved form).
* AWQ + GPTQ (the combination the paper reports as orthogonal; AutoAWQ itself only rounds to nearest): the scales are
  searched and folded as above, then GPTQ rounds the scaled weights *without* the clipping search. Clipping first
  makes GPTQ compensate towards the clipped weights, leaving the clipping error uncompensated; measured on zoo
  models (48 WikiText-2 test windows, KLD): llama-m uint3 GPTQ 0.0058, AWQ+GPTQ 0.0060 without clipping, 0.0066
  with; opt-m uint3 0.0016 / 0.0018 / 0.0025; gpt2-m uint3 0.00065 / 0.00066 / 0.0015; for RTN clipping helps
  (llama-m uint3 RTN 0.0149, AWQ+RTN 0.0162 without clipping, 0.0111 with).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantpredict import arch
from quantpredict.arch import LinearRef, ScaleGroup
from quantpredict.errors import FormatError
from quantpredict.quantize.rtn import rtn_quantize
from quantpredict.quantize.smoothquant import apply_smoothing

N_GRID = 20  # alpha = i / 20 for i = 0 .. 19 (AutoAWQ: ratio in range(n_grid), divided by n_grid)
MIN_SCALE = 1e-4  # AutoAWQ clamps s (and duo scaling's denominator offset)
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5  # candidate maxima (1 - i / 20) * max for i < 0.5 * 20
# AutoAWQ does not clip the layers producing queries and keys ("due to qk bmm, it is hard to clip precisely"); its
# name list is ["q_", "k_", "query", "key", "Wqkv"]; the fused q/k/v layers of the table are named here too
NO_CLIP = ("q_proj", "k_proj", "query", "key", "qkv", "c_attn", "Wqkv")

LayerFormat = tuple[str, int | None]


# ---- scales ---------------------------------------------------------------------------------------------------------


def weight_mean(weights: Sequence[torch.Tensor], group: int | None) -> torch.Tensor:
    """AutoAWQ's ``w_mean`` [in] (for duo scaling): every ``|w|`` over its group's max, averaged over all rows of
    the concatenated weights."""
    w = torch.cat([t.detach().double() for t in weights], dim=0)
    out, n = w.shape
    g = group if group and n % group == 0 else n
    a = w.abs().reshape(out, n // g, g)
    return (a / (a.amax(-1, keepdim=True) + 1e-6)).reshape(out, n).mean(0)


def scales_for_ratio(x_absmean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``s`` [in] (float64) for one grid point: ``mean|x|^ratio`` (over ``w_mean^(1 - ratio)`` with duo scaling),
    clamped at 1e-4 and normalised by ``sqrt(max(s) min(s))``; non-finite entries become 1."""
    x = x_absmean.detach().double()
    s = x.pow(ratio)
    if w_mean is not None:
        s = s / (w_mean.double().pow(1.0 - ratio) + MIN_SCALE)
    s = s.clamp(min=MIN_SCALE)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _scaled_error(weights: Sequence[tuple[torch.Tensor, LayerFormat]], hessian: torch.Tensor,
                  s: torch.Tensor) -> float:
    """``sum_i tr(dW_i H dW_i^T)`` with ``dW_i = Q(W_i diag(s)) diag(s)^-1 - W_i``; inf if a layout cannot store
    ``W_i diag(s)`` (an fp16 scale overflows). ``dW_i`` is formed in float64, then the product with ``hessian``
    (float32, cast once by the caller) runs in float32 and its sum in float64: half the time of a float64 product
    (the search's cost on a 1.5B model's 8960-wide down projections), ~1e-6 relative (see the module docstring)."""
    total = 0.0
    for w64, (fmt, block) in weights:  # float64 weights (the caller converts them once for the whole grid)
        try:
            q = rtn_quantize((w64 * s).float(), fmt, block_size=block).double() / s
        except FormatError:
            return float("inf")
        dw = (q - w64).float()
        total += float(((dw @ hessian) * dw).sum(dtype=torch.float64))
    return total


@dataclass(frozen=True)
class ScaleChoice:
    """The outcome of one group's grid search: the chosen ``ratio`` (alpha) and ``scales`` [in] (float64), the
    group's output error ``loss`` with them and ``loss_rtn`` without (``s = 1``, ratio 0), and every grid point's
    loss in ``losses``."""

    ratio: float
    scales: torch.Tensor
    loss: float
    loss_rtn: float
    losses: tuple[float, ...]


def search_scales(weights: Sequence[torch.Tensor], formats: Sequence[LayerFormat | None], hessian: torch.Tensor,
                  x_absmean: torch.Tensor, *, n_grid: int = N_GRID, duo_scaling: bool = False) -> ScaleChoice:
    """AWQ's grid search for one scaling group: ``weights`` ([out_i, in]) read the input whose Hessian is
    ``hessian`` ([in, in]) and per-channel mean ``|x|`` is ``x_absmean``; ``formats[i]`` is ``(format, block size)``
    of ``weights[i]``, ``None`` for one left in full precision (scaled, but not counted in the loss).

    The first grid point (ratio 0, ``s = 1``) is plain RTN, so the chosen loss is never above RTN's; ties keep the
    smaller ratio.
    """
    if n_grid < 1:
        raise ValueError(f"n_grid must be a positive integer, got {n_grid}")
    # float64 once for the grid (the loss forms dW from them; converting per grid point cost a tenth of the search)
    counted = [(w.detach().float().double(), f) for w, f in zip(weights, formats, strict=True) if f is not None]
    hessian = hessian.float()  # once for the grid: _scaled_error's products are float32
    w_mean = None
    if duo_scaling:
        w_mean = weight_mean(weights, next((f[1] for f in formats if f is not None), None))
    losses: list[float] = []
    best: tuple[float, float, torch.Tensor] | None = None
    for i in range(n_grid):
        ratio = i / n_grid
        s = scales_for_ratio(x_absmean, ratio, w_mean)
        loss = _scaled_error(counted, hessian, s) if counted else 0.0
        losses.append(loss)
        if best is None or loss < best[1]:
            best = (ratio, loss, s)
    assert best is not None
    if duo_scaling:
        loss_rtn = _scaled_error(counted, hessian, torch.ones_like(best[2])) if counted else 0.0
    else:
        loss_rtn = losses[0]
    return ScaleChoice(best[0], best[2], best[1], loss_rtn, tuple(losses))


@torch.no_grad()
def fold_scales(group: ScaleGroup, scales: torch.Tensor) -> None:
    """Multiply the input columns of ``group.linears`` by ``scales`` [in] and divide what produces their input by it:
    the norm (:func:`~quantpredict.quantize.smoothquant.apply_smoothing`, exact for ``(offset + w)`` norms) or the
    last ``in`` output rows (and bias entries) of the previous linear. The model computes the same function."""
    if group.pair is not None:
        apply_smoothing(group.pair, scales)
        return
    prev = group.prev
    if prev is None:
        raise ValueError(f"scale group {group.name} has neither a norm nor a previous linear to fold into")
    n = scales.shape[0]
    w = prev.weight.detach().double().clone()
    w[-n:] /= scales.double().unsqueeze(1)
    prev.set_weight(w.to(prev.weight.dtype))
    bias = getattr(prev.module, "bias", None)
    if bias is not None:
        bias[-n:] = (bias[-n:].double() / scales.double()).to(bias.dtype)
    for ref in group.linears:
        ref.set_weight((ref.weight.double() * scales.double().unsqueeze(0)).to(ref.weight.dtype))


# ---- clipping -------------------------------------------------------------------------------------------------------


def clip_group_size(fmt: str, block_size: int | None, in_features: int) -> int:
    """The group the clip search shrinks maxima in: the format's block where it tiles the row, else the row."""
    from quantpredict.formats import get_format

    block = get_format(fmt).check_block(block_size)
    return block if block and in_features % block == 0 else in_features


def _diag_blocks(hessian: torch.Tensor, group: int) -> torch.Tensor:
    """``[G, group, group]``: the diagonal blocks of ``hessian`` [in, in] (float64)."""
    n = hessian.shape[0]
    h = hessian.double().reshape(n // group, group, n // group, group)
    return torch.diagonal(h, dim1=0, dim2=2).permute(2, 0, 1)


def search_clip(weight: torch.Tensor, fmt: str, block_size: int | None, hessian: torch.Tensor, *,
                n_grid: int = CLIP_GRID, max_shrink: float = CLIP_MAX_SHRINK) -> tuple[torch.Tensor, int]:
    """AutoAWQ's clipping search on ``weight`` [out, in]: per output row and group, the max ``|w|`` (among
    ``(1 - i/n_grid) * max|w|``, ``i < max_shrink * n_grid``) whose RTN gives the lowest output error of that group,
    ``d H_gg d^T``. Returns ``(max_val [out, G] float32, group size)``; ``i = 0`` (no clipping) is a candidate."""
    w = weight.detach().float()
    out, n = w.shape
    group = clip_group_size(fmt, block_size, n)
    wg = w.reshape(out, n // group, group)
    org_max = wg.abs().amax(-1, keepdim=True)
    hb = _diag_blocks(hessian, group).float()  # the products in float32, their sums in float64 (as the scale search)
    w64 = w.double()
    best_err = torch.full((out, n // group), float("inf"), dtype=torch.float64)
    best_max = org_max.clone()
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1.0 - i / n_grid)
        clipped = torch.maximum(torch.minimum(wg, max_val), -max_val).reshape(out, n)
        try:
            q = rtn_quantize(clipped, fmt, block_size=block_size)
        except FormatError:
            continue
        d = (q.double() - w64).reshape(out, n // group, group).float()  # formed in float64
        err = (torch.einsum("ogi,gij->ogj", d, hb) * d).sum(-1, dtype=torch.float64)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
    return best_max.squeeze(-1), group


def apply_clip(weight: torch.Tensor, max_val: torch.Tensor, group: int) -> torch.Tensor:
    """``weight`` [out, in] with each row's groups of ``group`` inputs clamped to ``+-max_val`` [out, G]."""
    out, n = weight.shape
    m = max_val.to(weight.dtype).unsqueeze(-1)
    wg = weight.reshape(out, n // group, group)
    return torch.maximum(torch.minimum(wg, m), -m).reshape(out, n)


def clips(name: str) -> bool:
    """Whether AWQ's clipping search runs on the linear called ``name`` (not on those producing queries, keys)."""
    short = name.rsplit(".", 1)[-1]
    return not any(tag in short for tag in NO_CLIP)


# ---- one block ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwqGroupReport:
    """One scaling group of a block: its name (``prev->linears``), the chosen ``ratio``, the group's output error
    with (``loss``) and without (``loss_rtn``) the scales (sums of ``tr(dW H dW^T)`` over its quantized linears,
    before clipping) and the ``scales`` themselves (so that a copy of the model can be scaled alike)."""

    name: str
    block_index: int
    linears: tuple[str, ...]
    ratio: float
    loss: float
    loss_rtn: float
    scales: tuple[float, ...]


@dataclass(frozen=True)
class AwqClipReport:
    """The clipping search on one linear: its group size, the fraction of (row, group) maxima it shrank and the mean
    ratio of the kept maximum to the original one."""

    name: str
    group_size: int
    clipped_fraction: float
    mean_max_ratio: float


@dataclass(frozen=True)
class AwqBlockResult:
    groups: tuple[AwqGroupReport, ...]
    clips: tuple[AwqClipReport, ...]
    reference: dict[str, torch.Tensor]  # each quantized linear's FP weight after scaling, before clipping


def awq_block(model: nn.Module, index: int, formats: Mapping[str, LayerFormat], hessians: dict[str, torch.Tensor],
              absmeans: dict[str, torch.Tensor], *, clip: bool = True, duo_scaling: bool = False,
              n_grid: int = N_GRID) -> AwqBlockResult:
    """AWQ on block ``index`` before its linears are rounded: search every group's scales on the unscaled block,
    fold them all, rescale ``hessians`` and ``absmeans`` (their inputs are divided by ``s``: ``H -> diag(1/s) H
    diag(1/s)``) in place, then clip the weights of the quantized linears in ``formats`` (``{name: (format, block
    size)}``) where :func:`clips` says so."""
    groups = arch.awq_groups(model, index)
    chosen = []
    for g in groups:
        first = g.linears[0].name
        choice = search_scales([r.weight for r in g.linears], [formats.get(r.name) for r in g.linears],
                               hessians[first], absmeans[first], n_grid=n_grid, duo_scaling=duo_scaling)
        chosen.append((g, choice))
    reports = []
    for g, choice in chosen:
        fold_scales(g, choice.scales)
        inv = 1.0 / choice.scales
        for r in g.linears:
            hessians[r.name] = hessians[r.name] * inv.unsqueeze(0) * inv.unsqueeze(1)
            absmeans[r.name] = absmeans[r.name] * inv
        reports.append(AwqGroupReport(g.name, index, tuple(r.name for r in g.linears), choice.ratio, choice.loss,
                                      choice.loss_rtn, tuple(float(v) for v in choice.scales)))
    refs = {r.name: r for r in arch.block_linears(model, index)}
    reference = {name: refs[name].weight.detach().float().clone() for name in formats}
    clip_reports = []
    if clip:
        for name, (fmt, block) in formats.items():
            if clips(name):
                clip_reports.append(_clip_layer(refs[name], fmt, block, hessians[name]))
    return AwqBlockResult(tuple(reports), tuple(clip_reports), reference)


def _clip_layer(ref: LinearRef, fmt: str, block: int | None, hessian: torch.Tensor) -> AwqClipReport:
    w = ref.weight.detach().float()
    max_val, group = search_clip(w, fmt, block, hessian)
    org = w.reshape(w.shape[0], -1, group).abs().amax(-1)
    ratio = torch.where(org > 0, max_val / org.clamp(min=1e-30), torch.ones_like(org))
    ref.set_weight(apply_clip(w, max_val, group).to(ref.weight.dtype))
    return AwqClipReport(ref.name, group, float((ratio < 1).float().mean()), float(ratio.mean()))


def apply_recorded_scales(model: nn.Module, groups: Sequence[AwqGroupReport]) -> None:
    """Fold the scales a :func:`~quantpredict.quantize.quantize_model` run chose (its report's ``awq``) into
    ``model`` (an unquantized copy of what it quantized): the same function, the same scaled weights (unclipped)."""
    by_block: dict[int, dict[str, ScaleGroup]] = {}
    for rec in groups:
        if rec.block_index not in by_block:
            by_block[rec.block_index] = {g.name: g for g in arch.awq_groups(model, rec.block_index)}
        group = by_block[rec.block_index].get(rec.name)
        if group is None:
            raise ValueError(f"AWQ group {rec.name} of block {rec.block_index} is not a scaling group of this model; "
                             "apply recorded scales to a copy of the model they were found on")
        fold_scales(group, torch.tensor(rec.scales, dtype=torch.float64))
