"""The quantization direction ``delta = Q(W) - W`` of a recipe, per linear layer (``[out, in]``), and the FP point
``W`` it starts from (the recipe's smoothed weights under SmoothQuant, its scaled weights under AWQ).

RTN: ``formats.fake_quantize`` per layer (:func:`rtn_deltas`); GPTQ and AWQ: ``quantize.quantize_model`` on a deep
copy (:func:`backend_deltas`, :func:`awq_backend`, AWQ's clipping included).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from quantpredict import arch
from quantpredict.features.state import prepared


def layer_formats(model: nn.Module, refs: Sequence[arch.LinearRef],
                   recipe: Any) -> list[tuple[str, int | None] | None]:
    """Each layer's ``(format, block size)`` under the recipe, ``None`` for layers it leaves in full precision."""
    from quantpredict.quantize import layer_plan

    planned = {p.ref.name: (p.weight_format, p.block_size) for p in layer_plan(model, recipe)}
    return [planned.get(r.name) for r in refs]


def quantized_names(model: nn.Module, recipe: Any) -> set[str]:
    """Names of the linears the recipe quantizes (all but those it leaves in full precision)."""
    from quantpredict.quantize import quantized_linears

    return {r.name for r in quantized_linears(model, recipe)}


def rtn_deltas(model: nn.Module, refs: Sequence[arch.LinearRef], recipe: Any, *,
               compact: torch.dtype | None = None) -> list[torch.Tensor]:
    """``fake_quantize(W) - W`` ([out, in]) for each layer in its format and block size under the recipe (zero for
    layers the recipe leaves in full precision). ``compact``: keep each layer's direction in that (narrower) dtype
    when it holds it exactly (MXINT4 on bf16 weights does: half the memory of a float32 copy)."""
    from quantpredict.formats import fake_quantize

    out = []
    with torch.no_grad():
        for ref, fb in zip(refs, layer_formats(model, refs, recipe), strict=True):
            w = ref.weight.detach()
            if fb is None:
                out.append(torch.zeros_like(w, dtype=compact or w.dtype))
                continue
            out.append(compact_if_exact((fake_quantize(w, fb[0], axis=-1, block_size=fb[1]) - w).to(w.dtype),
                                        compact))
    return out


def compact_if_exact(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` when the round trip is exact (every value representable), else ``t`` unchanged."""
    if dtype is None or dtype == t.dtype:
        return t
    small = t.to(dtype)
    return small if torch.equal(small.to(t.dtype), t) else t


@torch.no_grad()
def smoothed_copy(model: nn.Module, alpha: float, windows: torch.Tensor, batch_size: int = 8) -> nn.Module:
    """A deep copy of ``model`` with SmoothQuant's scales folded in (same FP function, smoothed weights).

    The per-channel activation maxima come from one FP forward over ``windows``; ``quantize_model`` measures them
    block by block on the already-quantized prefix instead, so its smoothed weights can differ slightly.
    """
    from quantpredict.quantize import capture_linear_inputs, smoothing_scales
    from quantpredict.quantize.smoothquant import apply_smoothing

    base = copy.deepcopy(model)
    pairs = [pair for i in range(len(arch.blocks(base))) for pair in arch.smooth_pairs(base, i)]
    firsts = [pair.linears[0] for pair in pairs]
    # eager, as in the sweeps that produced the training runs: the direction must not depend on the attention kernel
    with prepared(base, eager=True), capture_linear_inputs(firsts, hessian=False) as stats:
        for start in range(0, windows.shape[0], batch_size):
            base(windows[start : start + batch_size], use_cache=False)
    for pair in pairs:
        s = smoothing_scales(stats[pair.linears[0].name].absmax, [r.weight for r in pair.linears], alpha)
        apply_smoothing(pair, s)
    return base


def base_model(model: nn.Module, recipe: Any, windows: torch.Tensor, batch_size: int = 8) -> nn.Module:
    """The FP point the features are measured at: ``model`` itself, or a smoothed deep copy for SmoothQuant
    recipes (the FP function is unchanged, but the weights that get quantized are the smoothed ones). AWQ's scales
    come on top, from :func:`awq_backend`."""
    alpha = getattr(recipe, "smoothquant_alpha", None)
    if alpha is None:
        return model
    return smoothed_copy(model, alpha, windows, batch_size)


def _backend_copy(base: nn.Module, recipe: Any, windows: torch.Tensor, batch_size: int):
    """``(quantized deep copy of base, its QuantReport)``; SmoothQuant is already folded into ``base``, so the copy
    is quantized without it."""
    from quantpredict.quantize import quantize_model

    q = copy.deepcopy(base)
    if getattr(recipe, "smoothquant_alpha", None) is not None:
        recipe = replace(recipe, smoothquant_alpha=None)
    with prepared(q, eager=True):  # eager, as in the sweeps: GPTQ's rounding decisions follow its Hessians' last bits
        report = quantize_model(q, recipe, windows, batch_size=batch_size, progress=False)
    return q, report


def _weight_deltas(q: nn.Module, refs: Sequence[arch.LinearRef],
                   compact: torch.dtype | None = None) -> list[torch.Tensor]:
    with torch.no_grad():
        return [compact_if_exact((qr.weight.detach() - r.weight.detach()).to(r.weight.dtype), compact)
                for qr, r in zip(arch.linear_layers(q), refs, strict=True)]


def backend_deltas(base: nn.Module, refs: Sequence[arch.LinearRef], recipe: Any, windows: torch.Tensor,
                   batch_size: int = 8, *, compact: torch.dtype | None = None) -> list[torch.Tensor]:
    """``Q(W) - W`` per layer from the PTQ backend (``quantize_model`` on a deep copy of ``base``, weights only;
    activation quantization, if the recipe has it, is not part of the direction).

    SmoothQuant is already folded into ``base``, so the copy is quantized without it. For AWQ recipes use
    :func:`awq_backend`, which also moves the FP point to the scaled weights.
    """
    q, _ = _backend_copy(base, recipe, windows, batch_size)
    return _weight_deltas(q, refs, compact)


def awq_backend(base: nn.Module, recipe: Any, windows: torch.Tensor, batch_size: int = 8, *,
                compact: torch.dtype | None = None) -> tuple[nn.Module, list[torch.Tensor]]:
    """For an AWQ recipe: ``(scaled, deltas)``, where ``scaled`` is a deep copy of ``base`` with the scales the PTQ
    backend chose folded in (the same FP function; its weights are the ones that get rounded) and ``deltas`` the
    backend's ``Q(W) - W`` at ``scaled`` (clipping included)."""
    from quantpredict.quantize import apply_recorded_scales

    q, report = _backend_copy(base, recipe, windows, batch_size)
    scaled = copy.deepcopy(base)
    apply_recorded_scales(scaled, report.awq)
    return scaled, _weight_deltas(q, arch.linear_layers(scaled), compact)
