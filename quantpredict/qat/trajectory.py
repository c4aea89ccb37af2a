"""The local and the global objective along a quantizer's path, for the misalignment study.

Two numbers describe where a quantized model stands:

* the **local objective** GPTQ minimises, summed over the quantized linear layers,
  ``sum_l tr(dW_l H_l dW_l^T)`` with ``dW_l = W_l - W_fp,l`` ([out, in]) and ``H_l = 2/N sum_t x_t x_t^T`` the
  layer-input Hessian of the *FP* model on the calibration windows, i.e. ``2/N sum_l ||dW_l X_l||_F^2``: the squared
  layer-output error per calibration token, all layers fed FP inputs (one fixed yardstick for every path; GPTQ itself
  calibrates layer ``l`` on the outputs of the already-quantized layers before it);
* the **global objective**: the model's mean next-token NLL (nats/token) on fixed tracking windows.

:func:`ptq_trajectory` replays a PTQ result layer by layer in quantization order (state ``k``: the first ``k`` layers
hold their PTQ weights, the rest FP); because layer ``k``'s PTQ weights depend only on the layers before it, these
are exactly the states GPTQ passes through. :func:`measure_point` gives the same numbers for any model, e.g. a QAT
model every few steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from quantpredict import arch


@dataclass(frozen=True)
class TrajectoryPoint:
    """One state of a quantizer's path.

    ``step``: optimizer steps taken (QAT) or layers quantized so far (PTQ); ``nll``: mean NLL on the tracking windows
    (nats/token); ``local``: ``sum_l tr(dW_l H_l dW_l^T)``; ``local_rel``: that over ``sum_l tr(W_l H_l W_l^T)``;
    ``distance``: ``||W - W_fp||_F`` over all quantized weights together; ``distance_rel``: that over ``||W_fp||_F``.
    """

    step: int
    nll: float
    local: float
    local_rel: float
    distance: float
    distance_rel: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Reference:
    """The FP yardstick: weights ``[out, in]`` (float64) and layer-input Hessians ``[in, in]`` (float64) by name."""

    names: tuple[str, ...]
    weights: dict[str, torch.Tensor]
    hessians: dict[str, torch.Tensor]

    @property
    def energy(self) -> float:
        """``sum_l tr(W_l H_l W_l^T)``: the FP layers' output energy, the denominator of ``local_rel``."""
        return sum(float(((self.weights[n] @ self.hessians[n]) * self.weights[n]).sum()) for n in self.names)

    @property
    def norm(self) -> float:
        return float(sum(float(self.weights[n].pow(2).sum()) for n in self.names) ** 0.5)


def fp_reference(model: nn.Module, names: list[str], windows: torch.Tensor, *, batch_size: int = 8) -> Reference:
    """Snapshot ``model``'s (FP) weights of the layers ``names`` and their input Hessians on ``windows`` [n, seq]."""
    from quantpredict.quantize import collect_hessians

    refs = {r.name: r for r in arch.linear_layers(model)}
    hessians = collect_hessians(model, windows, names=names, batch_size=batch_size)
    weights = {n: refs[n].weight.detach().double().clone() for n in names}
    return Reference(tuple(names), weights, {n: hessians[n].double() for n in names})


def local_objective(model: nn.Module, reference: Reference) -> tuple[float, float]:
    """``(sum_l tr(dW_l H_l dW_l^T), relative)`` for the model's current weights against ``reference``."""
    refs = {r.name: r for r in arch.linear_layers(model)}
    total = 0.0
    with torch.no_grad():
        for n in reference.names:
            dw = refs[n].weight.detach().double() - reference.weights[n]
            total += float(((dw @ reference.hessians[n]) * dw).sum())
    energy = reference.energy
    return total, (total / energy if energy > 0 else 0.0)


def weight_distance(model: nn.Module, reference: Reference) -> tuple[float, float]:
    """``(||W - W_fp||_F, relative)`` over all the reference's layers together."""
    refs = {r.name: r for r in arch.linear_layers(model)}
    sq = 0.0
    with torch.no_grad():
        for n in reference.names:
            sq += float((refs[n].weight.detach().double() - reference.weights[n]).pow(2).sum())
    norm = reference.norm
    return sq**0.5, (sq**0.5 / norm if norm > 0 else 0.0)


def mean_nll(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats/token) over ``windows`` [n, seq_len] (all equally long, so the token mean)."""
    from quantpredict.evaluate import window_nlls

    return float(window_nlls(model, windows, batch_size=batch_size).mean())


def measure_point(model: nn.Module, reference: Reference, windows: torch.Tensor, step: int, *,
                  batch_size: int = 8) -> TrajectoryPoint:
    """The :class:`TrajectoryPoint` of ``model`` as it stands (NLL on ``windows``)."""
    local, local_rel = local_objective(model, reference)
    dist, dist_rel = weight_distance(model, reference)
    return TrajectoryPoint(step, mean_nll(model, windows, batch_size=batch_size), local, local_rel, dist, dist_rel)


@torch.no_grad()
def ptq_trajectory(model_fp: nn.Module, model_q: nn.Module, reference: Reference, windows: torch.Tensor, *,
                   batch_size: int = 8, progress: bool = False) -> tuple[TrajectoryPoint, ...]:
    """Replay ``model_q``'s quantized weights into a copy of ``model_fp`` one layer at a time, in order.

    Returns ``len(reference.names) + 1`` points: step 0 is the FP model, step ``k`` has the first ``k`` layers
    quantized, the last is ``model_q``'s weights (with ``model_fp``'s other parameters: run it on PTQ without
    SmoothQuant, which would also change the norms).
    """
    import copy

    from tqdm.auto import tqdm

    work = copy.deepcopy(model_fp)
    work_refs = {r.name: r for r in arch.linear_layers(work)}
    q_refs = {r.name: r for r in arch.linear_layers(model_q)}
    points = [measure_point(work, reference, windows, 0, batch_size=batch_size)]
    for k, name in enumerate(tqdm(reference.names, desc="replay PTQ", unit="layer", disable=not progress), 1):
        work_refs[name].set_weight(q_refs[name].weight.detach())
        points.append(measure_point(work, reference, windows, k, batch_size=batch_size))
    return tuple(points)
