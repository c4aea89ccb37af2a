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
from functools import cached_property
from typing import Any, Literal

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
    """The FP yardstick: weights ``[out, in]`` and layer-input Hessians ``[in, in]`` by name, in one dtype (float64
    by default; see :func:`fp_reference`). Layers that read the same input (q/k/v, gate/up) share one Hessian tensor.
    """

    names: tuple[str, ...]
    weights: dict[str, torch.Tensor]
    hessians: dict[str, torch.Tensor]

    @cached_property
    def energy(self) -> float:
        """``sum_l tr(W_l H_l W_l^T)``: the FP layers' output energy, the denominator of ``local_rel`` (computed once:
        the reference never changes)."""
        return sum(layer_local(self.weights[n], self.hessians[n]) for n in self.names)

    @cached_property
    def norm(self) -> float:
        return float(sum(float(self.weights[n].double().pow(2).sum()) for n in self.names) ** 0.5)


def layer_local(dw: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T)`` for one layer (``dw`` [out, in], ``hessian`` [in, in], one dtype), as a Python float."""
    return float(((dw @ hessian) * dw).sum())


def _share_equal(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same dict with every tensor equal to an earlier one replaced by that earlier object (the Hessians of
    layers fed by one input are equal bit for bit): memory for one copy each."""
    kept: dict[tuple, list[torch.Tensor]] = {}
    out = {}
    for name, t in tensors.items():
        bucket = kept.setdefault((tuple(t.shape), float(t.sum())), [])  # equal tensors have equal sums
        same = next((k for k in bucket if torch.equal(k, t)), None)
        if same is None:
            bucket.append(t)
        out[name] = t if same is None else same
    return out


def fp_reference(model: nn.Module, names: list[str], windows: torch.Tensor, *, batch_size: int = 8,
                 dtype: torch.dtype = torch.float64, share_weights: bool = False) -> Reference:
    """Snapshot ``model``'s (FP) weights of the layers ``names`` and their input Hessians on ``windows`` [n, seq].

    ``dtype``: of the stored weights and Hessians and of the local-objective products. float64 (the default) for
    exact sums; float32 halves the memory and time (SmolLM2: ~0.8 GB instead of ~1.9 GB; relative error ~1e-6).
    Equal Hessians (layers fed by one input) are stored once. ``share_weights``: where the weights already have
    ``dtype``, keep views of them instead of copies (another model's worth of memory saved); the caller must then
    leave ``model``'s weights unchanged for as long as the reference is used.
    """
    from quantpredict.quantize import collect_hessians

    refs = {r.name: r for r in arch.linear_layers(model)}
    hessians = collect_hessians(model, windows, names=names, batch_size=batch_size)
    shared = _share_equal({n: hessians[n] for n in names})
    del hessians
    cast: dict[int, torch.Tensor] = {}
    h = {n: cast.setdefault(id(t), t.to(dtype)) for n, t in shared.items()}
    weights = {n: refs[n].weight.detach().to(dtype, copy=not share_weights) for n in names}
    return Reference(tuple(names), weights, h)


def _delta(model_refs: dict, reference: Reference, name: str) -> torch.Tensor:
    """``W - W_fp`` of one layer in the reference's dtype."""
    ref_w = reference.weights[name]
    return model_refs[name].weight.detach().to(ref_w.dtype) - ref_w


def local_objective(model: nn.Module, reference: Reference) -> tuple[float, float]:
    """``(sum_l tr(dW_l H_l dW_l^T), relative)`` for the model's current weights against ``reference``."""
    refs = {r.name: r for r in arch.linear_layers(model)}
    total = 0.0
    with torch.no_grad():
        for n in reference.names:
            total += layer_local(_delta(refs, reference, n), reference.hessians[n])
    energy = reference.energy
    return total, (total / energy if energy > 0 else 0.0)


def weight_distance(model: nn.Module, reference: Reference) -> tuple[float, float]:
    """``(||W - W_fp||_F, relative)`` over all the reference's layers together."""
    refs = {r.name: r for r in arch.linear_layers(model)}
    sq = 0.0
    with torch.no_grad():
        for n in reference.names:
            sq += float(_delta(refs, reference, n).double().pow(2).sum())
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


PTQ_POINTS: tuple[str, ...] = ("layer", "block")


@torch.no_grad()
def ptq_trajectory(model_fp: nn.Module, model_q: nn.Module, reference: Reference, windows: torch.Tensor, *,
                   batch_size: int = 8, progress: bool = False,
                   points: Literal["layer", "block"] = "layer") -> tuple[TrajectoryPoint, ...]:
    """Replay ``model_q``'s quantized weights into a copy of ``model_fp`` one layer at a time, in order.

    ``points="layer"`` returns ``len(reference.names) + 1`` points: step 0 is the FP model, step ``k`` has the first
    ``k`` layers quantized, the last is ``model_q``'s weights (with ``model_fp``'s other parameters: run it on PTQ
    without SmoothQuant, which would also change the norms). ``points="block"`` keeps step 0 and the steps that
    complete a transformer block (and the last), with the same numbers at those steps: the NLL forward pass, the
    cost of every point, then runs once per block (31 instead of 211 passes on SmolLM2). The local objective and
    distance are summed layer by layer as the layers are replaced (each layer's term is computed once), equal to
    :func:`measure_point`'s sums: the not-yet-replaced layers contribute exactly zero.
    """
    import copy

    from tqdm.auto import tqdm

    if points not in PTQ_POINTS:
        raise ValueError(f"unknown trajectory points {points!r}; valid: {', '.join(PTQ_POINTS)}")
    work = copy.deepcopy(model_fp)
    work_refs = {r.name: r for r in arch.linear_layers(work)}
    q_refs = {r.name: r for r in arch.linear_layers(model_q)}
    names = reference.names
    energy, norm = reference.energy, reference.norm
    nll0 = mean_nll(work, windows, batch_size=batch_size)
    out = [TrajectoryPoint(0, nll0, 0.0, 0.0, 0.0, 0.0)]
    local = sq = 0.0
    for k, name in enumerate(tqdm(names, desc="replay PTQ", unit="layer", disable=not progress), 1):
        work_refs[name].set_weight(q_refs[name].weight.detach())
        dw = _delta(work_refs, reference, name)
        local += layer_local(dw, reference.hessians[name])
        sq += float(dw.double().pow(2).sum())
        last_of_block = k == len(names) or work_refs[names[k]].block_index != work_refs[name].block_index
        if points == "layer" or last_of_block:
            nll = mean_nll(work, windows, batch_size=batch_size)
            out.append(TrajectoryPoint(k, nll, local, local / energy if energy > 0 else 0.0, sq**0.5,
                                       sq**0.5 / norm if norm > 0 else 0.0))
    return tuple(out)
