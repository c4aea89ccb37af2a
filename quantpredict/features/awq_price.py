"""AWQ priced from the weights: the change an AWQ recipe makes to each linear layer, in the layer's own coordinates.

AWQ (:mod:`quantpredict.quantize.awq`) scales each group's input columns by ``s`` and folds ``1/s`` into what feeds
them (a norm, or the output rows of a previous linear), so a linear ends up as ``W' = diag(r) W diag(c)`` (``c``:
its group's scales, ``r``: the scales of a group it feeds, 1 elsewhere), clipped and rounded. The model computes
``Q(W') / (r c^T)`` (elementwise) where the FP model computed ``W``: so the change the token-wise price reads
(:func:`~quantpredict.features.fisher.price_deltas`, against the profile's FP inputs and output gradients) is::

    dW = (Q(clip(W')) - W') / (r c^T)

Here each block runs :func:`~quantpredict.quantize.awq.awq_block` itself (its grid search of every group on the
block's unscaled weights, the folds, the clipping search for RTN), on the profile's statistics: GPTQ's Hessian
``2A`` of the FP model (:meth:`~quantpredict.features.fisher.SensitivityProfile.hessian`) and the per-channel mean
``|x|`` of the profile's token inputs. Then RTN of the clipped weights, or GPTQ of the scaled ones against the
scaled Hessian (AWQ + GPTQ, no clipping, as ``quantize_model`` does). The block's parameters are put back after.

Departures from ``quantize_model``'s AWQ (stated, not hidden), the same as the weights-only GPTQ's:

- the statistics are the FP model's, where the sequential pass feeds each block the quantized prefix's outputs;
- mean ``|x|`` comes from the profile's token windows (2 windows of 256 tokens, bf16), where ``quantize_model``
  takes it over the recipe's calibration windows (128 by default). The Hessian is the profile's (8 windows) unless
  ``hessians`` are given: ``rank`` gives those of the recipe's own calibration windows
  (:meth:`quantpredict.predict.rank.ModelProfile.calibration_hessians`), as ``quantize_model`` calibrates.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from quantpredict import arch


def _block_state(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Copies of every parameter AWQ may change in block ``index``: its own, and the norms its groups fold into."""
    block = arch.blocks(model)[index]
    saved = {f"block.{k}": v.detach().clone() for k, v in block.state_dict().items()}
    for g in arch.awq_groups(model, index):
        if g.pair is not None:
            for k, v in g.pair.norm.state_dict().items():
                saved[f"{id(g.pair.norm)}.{k}"] = v.detach().clone()
    return saved


def _restore(model: nn.Module, index: int, saved: dict[str, torch.Tensor]) -> None:
    block = arch.blocks(model)[index]
    with torch.no_grad():
        for k, v in block.state_dict().items():
            v.copy_(saved[f"block.{k}"])
        for g in arch.awq_groups(model, index):
            if g.pair is not None:
                for k, v in g.pair.norm.state_dict().items():
                    v.copy_(saved[f"{id(g.pair.norm)}.{k}"])


def awq_deltas(model: nn.Module, refs: Sequence[arch.LinearRef], formats: Sequence[tuple[str, int | None] | None],
               method: str, profile, *, gptq_options: Mapping | None = None,
               hessians: Mapping[str, torch.Tensor] | None = None,
               absmeans: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor | None]:
    """:func:`iter_awq_deltas` as a list (every layer's change held at once); ``refs`` in any order."""
    order = sorted(range(len(refs)), key=lambda i: refs[i].block_index)  # stable: ties keep the given order
    got = iter_awq_deltas(model, [refs[i] for i in order], [formats[i] for i in order], method, profile,
                          gptq_options=gptq_options, hessians=hessians, absmeans=absmeans)
    out: list[torch.Tensor | None] = [None] * len(refs)
    for i, d in zip(order, got, strict=True):
        out[i] = d
    return out


def iter_awq_deltas(model: nn.Module, refs: Sequence[arch.LinearRef],
                    formats: Sequence[tuple[str, int | None] | None], method: str, profile, *,
                    gptq_options: Mapping | None = None, hessians: Mapping[str, torch.Tensor] | None = None,
                    absmeans: Mapping[str, torch.Tensor] | None = None) -> Iterator[torch.Tensor | None]:
    """Each layer's ``dW`` [out, in] (float32) under an AWQ recipe of ``method`` (``rtn`` or ``gptq``), as the module
    docstring defines it, one ref at a time; ``None`` for layers left in full precision. ``refs`` come block by block
    (the ``arch.linear_layers`` order; a ``ValueError`` otherwise), so that only one block's changes are held:
    :func:`~quantpredict.features.fisher.price_deltas` takes the iterator. ``formats``: one ``(format, block size)``
    per ref. ``hessians`` / ``absmeans`` (``{name: [in, in]}`` / ``{name: [in]}``): the statistics to search on, in
    place of the profile's (every quantized layer's). ``model`` is left as it was after each block."""
    if method not in ("rtn", "gptq"):
        raise ValueError(f"AWQ rounds with rtn or gptq, got {method!r}")
    arch.require_scale_folds(model, "AWQ", "awq")
    blocks = [r.block_index for r in refs]
    if blocks != sorted(blocks):
        raise ValueError("iter_awq_deltas: give the refs block by block (arch.linear_layers order), or call "
                         "awq_deltas")
    by_name = dict(zip((r.name for r in refs), formats, strict=True))
    for index, group in itertools.groupby(refs, key=lambda r: r.block_index):
        out = _block_deltas(model, index, by_name, method, profile, gptq_options, hessians, absmeans)
        for r in group:
            yield out.get(r.name)


def _block_deltas(model: nn.Module, index: int, by_name: Mapping[str, tuple[str, int | None] | None], method: str,
                  profile, gptq_options: Mapping | None, hessians: Mapping[str, torch.Tensor] | None,
                  absmeans: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Block ``index``'s quantized layers' ``dW`` (``{name: [out, in]}``); its parameters are put back after."""
    from quantpredict.quantize.awq import awq_block
    from quantpredict.quantize.gptq import gptq_quantize
    from quantpredict.quantize.rtn import rtn_quantize

    out: dict[str, torch.Tensor] = {}
    quantized = {r.name: by_name[r.name] for r in arch.block_linears(model, index)
                 if by_name.get(r.name) is not None}
    if not quantized:
        return out
    block_refs = {r.name: r for r in arch.block_linears(model, index)}
    h = {n: (profile.hessian(n) if hessians is None else hessians[n].double()) for n in block_refs}
    if absmeans is None:
        m = {n: profile.token_inputs[n].float().abs().mean(0).double() for n in block_refs}
    else:
        m = {n: absmeans[n].double() for n in block_refs}
    groups = {g.name: g for g in arch.awq_groups(model, index)}
    saved = _block_state(model, index)
    try:
        result = awq_block(model, index, quantized, h, m, clip=method == "rtn")
        # r and c of every linear: c = its group's s on the columns, r = 1/s on the rows a group folded into
        cols = {n: torch.ones(r.in_features, dtype=torch.float64) for n, r in block_refs.items()}
        rows = {n: torch.ones(r.out_features, dtype=torch.float64) for n, r in block_refs.items()}
        for rep in result.groups:
            s = torch.tensor(rep.scales, dtype=torch.float64)
            for n in rep.linears:
                cols[n] = cols[n] * s
            prev = groups[rep.name].prev
            if prev is not None:
                rows[prev.name][-s.numel():] /= s
        for name, (fmt, block_size) in quantized.items():
            scaled = result.reference[name].double()  # W' = diag(r) W diag(c), before clipping
            if method == "gptq":
                w_q = gptq_quantize(scaled.float().clone(), h[name], fmt, block_size=block_size,
                                    **dict(gptq_options or {}))
            else:  # the clipped W' as awq_block left it in the layer
                w_q = rtn_quantize(block_refs[name].weight.detach().float(), fmt, block_size=block_size)
            factor = rows[name].unsqueeze(1) * cols[name].unsqueeze(0)
            out[name] = ((w_q.double() - scaled) / factor).float()
    finally:
        _restore(model, index, saved)
    return out
