"""``extract``: every feature of ``schema.FEATURES`` for a model under a quantization recipe.

All features are measured at the full-precision point ``W`` (the recipe's smoothed weights when it uses
SmoothQuant, its AWQ-scaled weights when it uses AWQ: both leave the FP function unchanged) on a small calibration
batch cut from WikiText-2 *train*. The quantization direction is ``delta = Q(W) - W`` over the weights of every
``arch.linear_layers`` layer, with ``Q`` the recipe's weight quantization (RTN: ``formats.fake_quantize`` per layer;
GPTQ and AWQ: ``quantize.quantize_model`` on a deep copy; AWQ's clipping is part of ``delta``). Second-order
quantities are taken w.r.t. exactly those weights. The RTN-based features (``noise``, ``gptq_proxy``, ``profile``)
of an AWQ recipe round the scaled weights as they are (no clipping). The ``profile`` group of a GPTQ recipe runs
GPTQ per layer against the FP Hessians of the recipe's own calibration windows (cut from ``calib_ids`` as
``quantize_model`` cuts them, 128 x 256 by default; forward passes only), the Hessians ``rank`` prices it with.

This module holds the extractor and its feature groups; the pieces they share live beside it, and their public
names are re-exported here: :mod:`~quantpredict.features.context` (``ExtractOptions``, ``parse_which`` and the lazily
filled context the groups share), :mod:`~quantpredict.features.direction` (``delta`` and the FP point),
:mod:`~quantpredict.features.offsets` (what runs inside each linear's forward: streamed SQNR statistics, weight
offsets) and :mod:`~quantpredict.features.state` (the model's state for the call, and the calibration loss).

The model is left as it was: the radial profile's moved weights exist only inside each linear's forward (the
stored parameters are never written), and the attention implementation, ``requires_grad`` flags, train/eval mode,
dtype and device are put back.

Memory (``ExtractOptions.max_memory``, default ``memory.DEFAULT_MAX_MEMORY``): when the double-backward graph of
the whole calibration batch fits the budget, the gradient and Hessian-vector products come from one retained graph,
as they always did. Otherwise the batch is split into micro-batches of windows and every second-order quantity is
accumulated over them, one graph at a time (``hessian.AccumulatedHessianOperator`` for the curvature group,
``hessian.directional_derivatives`` for the landscape group's ``g . delta`` and ``delta^T H delta``, which then need
no parameter-sized vector at all). Where the vocabulary makes a batch's ``[tokens, vocab]`` float32 logits larger
than ``memory.LOGITS_CHUNK_BYTES`` (64 MiB), the head and the cross-entropy run in token chunks
(``lmhead.chunked_cross_entropy``, differentiable twice). The noise group's output SQNRs are streamed
(``||X W^T||^2`` and ``||X delta^T||^2`` per batch) instead of storing each layer's ``[in, in]`` Hessian; only the
``gptq_proxy`` group keeps those. A half-precision model is measured in float32 (upcast in place for the call and
cast back, which is exact).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from quantpredict import arch
from quantpredict.data import calibration_windows
from quantpredict.errors import ModelError
from quantpredict.features.context import Context, ExtractOptions, parse_which
from quantpredict.features.direction import (
    awq_backend,
    backend_deltas,
    compact_if_exact,
    layer_formats,
    quantized_names,
    rtn_deltas,
    smoothed_copy,
)
from quantpredict.features.embedding_head import (
    measure_embedding_head,
    price_embedding_and_head,
    with_embedding_and_head,
)
from quantpredict.features.fisher import TOKEN_WINDOWS, fisher_measures, iter_profile_deltas, price_deltas
from quantpredict.features.hessian import hutchinson_trace_op, top_eigenvalue_op
from quantpredict.features.offsets import (
    SQNR_CAP_DB,
    SeededNoise,
    along_direction,
    capture_quadratics,
    offset_weights,
    sqnr_db,
)
from quantpredict.features.state import compute_placement, graph_bytes_per_window, mean_nll, prepared, summed_nll
from quantpredict.quantize.plan import embedding_and_head_plan
from quantpredict.schema import FEATURES

# the extractor's own names, and the public names that moved out of this module into its neighbours (kept
# importable from here)
__all__ = [
    "SQNR_CAP_DB", "ExtractOptions", "along_direction", "awq_backend", "backend_deltas", "capture_quadratics",
    "compact_if_exact", "compute_placement", "extract", "feature_windows", "graph_bytes_per_window", "mean_nll",
    "offset_weights", "parse_which", "prepared", "rtn_deltas", "smoothed_copy", "summed_nll",
]


# ---- the groups --------------------------------------------------------------------------------------------------


def _model_group(ctx: Context) -> dict[str, float]:
    m = ctx.model
    return {
        "n_params_nonembed": float(arch.non_embedding_parameters(m)),
        "n_layers": float(len(arch.blocks(m))),
        "hidden_size": float(arch.hidden_size(m)),
        "fp_calib_nll": ctx.fp_nll,
    }


def _format_group(ctx: Context) -> dict[str, float]:
    from quantpredict.formats import get_format

    refs = arch.linear_layers(ctx.model)
    # per-channel scales cost 1/row bits per element, so layers of different widths differ: weight by size. Layers a
    # recipe leaves in full precision count at 16 bits (a per-layer recipe's bits are its average over the linears).
    rows = []
    for ref, fb in zip(refs, layer_formats(ctx.model, refs, ctx.recipe), strict=True):
        n = ref.weight.numel()
        if fb is None:
            rows.append((n, 16.0, 0.0, float(ref.in_features)))
            continue
        fmt = get_format(fb[0])
        rows.append((n, float(fmt.bits_per_element(block_size=fb[1], row_length=ref.in_features)),
                     float(fmt.element == "fp"), float(fb[1] or ref.in_features)))
    total = sum(r[0] for r in rows)
    return {"bits_per_element": sum(r[0] * r[1] for r in rows) / total,
            "element_is_fp": sum(r[0] * r[2] for r in rows) / total,
            "block_size": sum(r[0] * r[3] for r in rows) / total}


def _noise_group(ctx: Context) -> dict[str, float]:
    # layers the recipe skips stay FP: their noise is no part of the recipe's
    wanted = quantized_names(ctx.base, ctx.recipe)
    pairs = [(r, d) for r, d in zip(ctx.refs, ctx.rtn_delta) if r.name in wanted]
    if not pairs:
        raise ModelError(f"recipe {ctx.recipe.label} skips every linear layer; there is no quantization noise to "
                         "measure (narrow its skip patterns)")
    refs, deltas = [r for r, _ in pairs], [d for _, d in pairs]
    w2 = [float(r.weight.detach().double().pow(2).sum()) for r in refs]
    d2 = [float(d.double().pow(2).sum()) for d in deltas]
    layer_db = [sqnr_db(s, n) for s, n in zip(w2, d2)]

    # output SQNR of each layer on its real calibration inputs: ||X W^T||^2 / ||X dW^T||^2 = tr(W H W^T) /
    # tr(dW H dW^T), with X the FP model's activations and H = 2/N X^T X (bias excluded: it is not quantized and
    # would inflate the signal)
    traces = ctx.calib_stats.traces
    out_db = [sqnr_db(*traces[r.name]) for r in refs]
    worst = min(range(len(refs)), key=lambda i: out_db[i])
    n_blocks = max(len(arch.blocks(ctx.base)), 1)
    return {
        "rtn_sqnr_db": sqnr_db(sum(w2), sum(d2)),
        "rtn_sqnr_db_min": min(layer_db),
        "rtn_rel_weight_error": math.sqrt(sum(d2) / sum(w2)) if sum(w2) > 0 else 0.0,
        "out_sqnr_db_mean": sum(out_db) / len(out_db),
        "out_sqnr_db_min": out_db[worst],
        "out_sqnr_worst_depth": (refs[worst].block_index + 0.5) / n_blocks,
    }


def _curvature_group(ctx: Context) -> dict[str, float]:
    op = ctx.operator(ctx.opts.curvature_windows)
    groups = [r.block_index for r in ctx.refs]
    with prepared(ctx.base, ctx.params):
        trace, se, per_block = hutchinson_trace_op(op, ctx.opts.n_probes, seed=ctx.seed, groups=groups)
        eig, _ = top_eigenvalue_op(op, tol=ctx.opts.tol, max_iter=ctx.opts.max_iter, seed=ctx.seed + 1)
    n = op.numel
    delta = ctx.delta
    noise_var = sum(float(d.double().pow(2).sum()) for d in delta) / n
    return {
        "hessian_trace": trace,
        "hessian_trace_se": se,
        "hessian_trace_per_param": trace / n,
        "top_eigenvalue": eig,
        "trace_x_noise_var": 0.5 * trace * noise_var,
        "hessian_trace_max_block_share": max(per_block) / trace if trace != 0 else 0.0,
    }


def _landscape_group(ctx: Context) -> dict[str, float]:
    delta = ctx.delta
    g_dot, curv = ctx.taylor_terms(delta)
    quad = 0.5 * curv
    base = ctx.base_nll  # the NLL at the point the radial and noise probes move from

    def layout(i: int, d: torch.Tensor) -> torch.Tensor:
        return d.t() if ctx.refs[i].transposed else d

    radial = {t: ctx.nll_at(lambda i, t=t: layout(i, t * delta[i])) - base for t in (0.25, 0.5, 1.0)}
    gen = torch.Generator().manual_seed(ctx.seed + 2)
    sharp = []
    for _ in range(ctx.opts.n_noise_draws):
        noise = SeededNoise(delta, gen, cache_bytes=ctx.budget // 4, dtypes=[p.dtype for p in ctx.params])
        sharp.append(ctx.nll_at(lambda i, noise=noise: layout(i, noise(i))) - base)
    return {
        "grad_dot_delta": g_dot,
        "quad_delta_h_delta": quad,
        "taylor_dnll": g_dot + quad,
        "radial_dnll_025": radial[0.25],
        "radial_dnll_050": radial[0.5],
        "radial_dnll_100": radial[1.0],
        "sharpness_random": sum(sharp) / len(sharp) if sharp else 0.0,
    }


def _gptq_proxy_group(ctx: Context) -> dict[str, float]:
    from quantpredict.quantize.gptq import gptq_quantize, layer_output_error

    hessians = ctx.hessians
    proxy_rtn = proxy_gptq = 0.0
    formats = layer_formats(ctx.base, ctx.refs, ctx.recipe)
    for ref, d_rtn, fb in zip(ctx.refs, ctx.rtn_delta, formats, strict=True):
        if fb is None:
            continue
        h = hessians[ref.name]
        w = ref.weight.detach()
        proxy_rtn += layer_output_error(w, w + d_rtn, h)
        wq = gptq_quantize(w.clone(), h, fb[0], block_size=fb[1],
                           blocksize=ctx.recipe.gptq_blocksize, percdamp=ctx.recipe.percdamp,
                           act_order=ctx.recipe.act_order)
        proxy_gptq += layer_output_error(w, wq, h)
    return {"gptq_proxy_rtn": proxy_rtn, "gptq_proxy_gptq": proxy_gptq}


def _fisher_group(ctx: Context) -> dict[str, float]:
    # forward-mode differentiation does not run through PyTorch's CPU SDPA kernel: eager attention, restored after
    deltas = ctx.delta
    with prepared(ctx.base, eager=True):
        return fisher_measures(ctx.base, ctx.refs, deltas, ctx.windows, batch_size=1)


def _profile_group(ctx: Context) -> dict[str, float]:
    # the recipe priced from weights alone against the model's profile (given to extract, or measured here)
    recipe = ctx.recipe
    gptq = {"blocksize": recipe.gptq_blocksize, "percdamp": recipe.percdamp, "act_order": recipe.act_order}
    hessians = None
    if recipe.method == "gptq" and ctx.calib_ids is not None:
        # GPTQ rounds against the Hessians of its own calibration windows (quantize_model's), as rank prices it
        from quantpredict.features.moments import MomentHessians, measure_input_moments

        # feature_windows: quantize_model's windows, the length clipped to a context shorter than it (where
        # quantize_model itself would fail)
        calib = feature_windows(ctx.base, ctx.calib_ids, recipe.calib_samples, recipe.calib_seq_len, recipe.seed)
        hessians = MomentHessians(measure_input_moments(ctx.base, calib.to(ctx.windows.device)))
    deltas = iter_profile_deltas(ctx.refs, layer_formats(ctx.base, ctx.refs, recipe), recipe.method, ctx.profile,
                                 gptq_options=gptq, hessians=hessians)
    feats = price_deltas(ctx.profile, [r.name for r in ctx.refs], deltas)
    if embedding_and_head_plan(ctx.base, recipe):  # E= / H=: their terms join token_gn_quad (not the K-FAC ones)
        stats = measure_embedding_head(ctx.base, ctx.windows[:TOKEN_WINDOWS], seed=ctx.seed)
        feats |= {k: v for k, v in with_embedding_and_head(feats, price_embedding_and_head(ctx.base, stats, recipe))
                  .items() if k in feats}
    return feats


_GROUP_FNS = {
    "model": _model_group,
    "format": _format_group,
    "noise": _noise_group,
    "curvature": _curvature_group,
    "landscape": _landscape_group,
    "gptq_proxy": _gptq_proxy_group,
    "fisher": _fisher_group,
    "profile": _profile_group,
}


def feature_windows(model: nn.Module, calib_ids: torch.Tensor, n_windows: int = 8, seq_len: int = 256,
                    seed: int = 0) -> torch.Tensor:
    """The calibration batch ``[n_windows, seq_len]`` (``seq_len`` clipped to the model's context); 2-D
    ``calib_ids`` are used as given."""
    from quantpredict.data import TokenStream

    limit = arch.max_positions(model)
    if limit is not None and (isinstance(calib_ids, TokenStream) or calib_ids.dim() == 1):
        seq_len = min(seq_len, limit)
    return calibration_windows(calib_ids, n_windows, seq_len, seed=seed)


def extract(model: nn.Module, recipe: Any, calib_ids: torch.Tensor, *, seed: int = 0,
            which: str | Iterable[str] | None = None, options: ExtractOptions | None = None,
            progress: bool = False, device: Any = None, profile: Any = None, **overrides: Any) -> dict[str, float]:
    """Every feature of the selected groups (all by default) for ``model`` under ``recipe``.

    ``calib_ids``: 1-D WikiText-2 *train* token ids (cut into ``n_windows`` seeded windows of ``seq_len``) or a 2-D
    ``[n, seq_len]`` batch used as given. ``options`` (or keyword overrides of its fields, e.g. ``n_probes=8``,
    ``max_memory="2GiB"``) set the cost knobs. ``device``: where to compute (``"cuda"``; default: where the model
    is); the model is moved there for the call and back. ``profile``: a
    :class:`~quantpredict.features.fisher.SensitivityProfile` of ``model`` measured once (``fisher.measure_profile``)
    for the ``profile`` group to reuse across recipes. Returns ``{feature name: value}`` for the selected groups
    plus ``<group>_seconds`` for each. Deterministic for a fixed ``seed``; the model is not modified. A model with
    NaN/Inf weights raises :class:`ModelError` naming the parameter.
    """
    opts = replace(options or ExtractOptions(), **overrides)
    groups = parse_which(which)
    arch.check_finite(model)
    storage = next(model.parameters()).dtype
    with compute_placement(model, device) as dev:
        windows = feature_windows(model, calib_ids, opts.n_windows, opts.seq_len, seed).to(dev)
        compact = storage if storage != next(model.parameters()).dtype else None
        out = _extract_groups(Context(model, recipe, windows, seed, opts, groups, compact, profile,
                                      calib_ids=calib_ids), groups, progress)
    expected = {f.name for f in FEATURES if f.group in groups}
    missing = expected - out.keys()
    if missing:  # a schema row without an implementation is a bug here, not a user error
        raise RuntimeError(f"features {sorted(missing)} are in the schema but were not computed")
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise ModelError(f"features {bad} are not finite for this model and recipe; the model's calibration loss "
                         "or its quantization is degenerate (check the weights and the format)")
    return out


def _extract_groups(ctx: Context, groups: Sequence[str], progress: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    ctx.progress = progress
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups), desc="features", unit="group")
    try:
        for group in groups:
            if bar is not None:
                bar.set_postfix_str(group)
            t0 = time.perf_counter()
            out.update(_GROUP_FNS[group](ctx))
            out[f"{group}_seconds"] = time.perf_counter() - t0
            if bar is not None:
                bar.update()
    finally:
        ctx.release_operator()
        if bar is not None:
            bar.close()
    return out
