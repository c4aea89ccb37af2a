"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for LLMs", 2023).

For a norm whose output ``X`` feeds linears ``W_1 .. W_k`` only, ``Y_i = X W_i^T = (X / s) (W_i * s)^T`` for any
positive ``s`` [in]: the division folds into the norm's weight and bias, the product into the linears' columns, so the
model computes the same function while activation outliers migrate into the weights. Per input channel ``j``::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),   max|W_j| over the rows of all k linears,   s_j >= 1e-5
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quantpredict.arch import SmoothPair

MIN_SCALE = 1e-5


def smoothing_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s`` [in] (float64) from the per-channel ``max|X|`` [in] and the ``[out_i, in]`` weights fed by the norm."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    w_max = torch.cat([w.detach().abs().double() for w in weights], dim=0).amax(dim=0).clamp(min=MIN_SCALE)
    a = act_absmax.detach().double()
    return (a.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=MIN_SCALE)


@torch.no_grad()
def apply_smoothing(pair: SmoothPair, scales: torch.Tensor) -> None:
    """Fold ``1/scales`` [in] into the norm's weight (and bias) and ``scales`` into the linears' input columns.

    A norm computing ``x_hat * (c + w) + b`` (``c = pair.norm_offset``: 0 for LayerNorm/RMSNorm, 1 for Gemma's
    RMSNorm) gets ``w -> (c + w) / s - c`` and ``b -> b / s``, so its output is divided by ``s`` exactly (up to
    rounding in the weight's dtype); plain ``w / s`` would be wrong whenever ``c != 0``.
    """
    norm = pair.norm
    s = scales.to(norm.weight.dtype)
    offset = pair.norm_offset
    if offset == 0.0:
        norm.weight.div_(s)
    else:
        w = norm.weight
        w.copy_(((w.double() + offset) / scales.double() - offset).to(w.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.div_(s)
    for ref in pair.linears:
        w = ref.weight
        ref.set_weight((w.double() * scales.double().unsqueeze(0)).to(w.dtype))
