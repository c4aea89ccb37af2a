"""``extract``: every feature of ``schema.FEATURES`` for a model under a quantization recipe.

All features are measured at the full-precision point ``W`` (the recipe's smoothed weights when it uses
SmoothQuant, its AWQ-scaled weights when it uses AWQ: both leave the FP function unchanged) on a small calibration
batch cut from WikiText-2 *train*. The quantization direction is ``delta = Q(W) - W`` over the weights of every
``arch.linear_layers`` layer, with ``Q`` the recipe's weight quantization (RTN: ``formats.fake_quantize`` per layer;
GPTQ and AWQ: ``quantize.quantize_model`` on a deep copy; AWQ's clipping is part of ``delta``). Second-order
quantities are taken w.r.t. exactly those weights. The RTN-based features (``noise``, ``gptq_proxy``, ``profile``)
of an AWQ recipe round the scaled weights as they are (no clipping).

The model is left as it was: parameters touched for the radial profile are restored bit for bit, and the
attention implementation, ``requires_grad`` flags and train/eval mode are put back.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantpredict import arch
from quantpredict.data import calibration_windows
from quantpredict.errors import ModelError
from quantpredict.features.fisher import fisher_measures, price_deltas, profile_deltas
from quantpredict.features.hessian import HessianOperator, hutchinson_trace_op, top_eigenvalue_op
from quantpredict.features.schema import FEATURES, GROUPS

# A layer whose quantization error is exactly zero would have an infinite SQNR; features must stay finite, so
# SQNRs are capped here (far above anything a <= 8-bit format reaches, ~6 dB per bit).
SQNR_CAP_DB = 300.0


@dataclass(frozen=True)
class ExtractOptions:
    """Knobs of :func:`extract` (the defaults keep the whole feature set near a few percent of a WikiText-2 test
    evaluation; see ``benchmarks/bench_features.py``)."""

    n_windows: int = 8  # calibration windows
    seq_len: int = 256  # tokens per window (clipped to the model's context)
    batch_size: int = 8  # windows per forward pass
    n_probes: int = 4  # Hutchinson probes
    max_iter: int = 8  # power-iteration Hessian-vector products at most
    # windows (the first ones of the batch) behind the curvature group's n_probes + max_iter HVPs: tr(H) and the top
    # eigenvalue are batch averages that need fewer tokens than the loss differences of the landscape group
    curvature_windows: int = 1
    tol: float = 1e-3  # power-iteration relative tolerance
    n_noise_draws: int = 1  # random-direction sharpness draws (one forward each)


def parse_which(which: str | Iterable[str] | None) -> tuple[str, ...]:
    """Groups to compute, in schema order; ``None`` means all. Unknown names raise ``ValueError``."""
    if which is None:
        return GROUPS
    names = [w.strip() for w in (which.split(",") if isinstance(which, str) else which) if w.strip()]
    unknown = [w for w in names if w not in GROUPS]
    if unknown or not names:
        raise ValueError(f"unknown feature group(s) {unknown or names!r}; valid groups: {', '.join(GROUPS)}")
    return tuple(g for g in GROUPS if g in names)


# ---- model state: eager attention, grads on the quantized weights only, eval mode ------------------------------


def _set_attn(model: nn.Module, impl: str | None) -> None:
    if impl is None:
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(impl)
            return
        except (ValueError, ImportError, AttributeError):
            pass
    model.config._attn_implementation = impl


@contextlib.contextmanager
def prepared(model: nn.Module, grad_params: Sequence[torch.Tensor] = (), *,
             eager: bool | None = None) -> Iterator[None]:
    """Eval mode and ``requires_grad`` on ``grad_params`` only; eager attention when gradients are taken (double
    backward fails through CPU SDPA; ``eager`` overrides), the model's own attention otherwise (faster forward
    passes). Everything is restored on exit."""
    old_attn = getattr(model.config, "_attn_implementation", None)
    old_training = model.training
    old_flags = [(p, p.requires_grad) for p in model.parameters()]
    grad_ids = {id(p) for p in grad_params}
    use_eager = bool(grad_params) if eager is None else eager
    switch = use_eager and old_attn != "eager"
    try:
        if switch:
            _set_attn(model, "eager")
        model.eval()
        for p, _ in old_flags:
            p.requires_grad_(id(p) in grad_ids)
        yield
    finally:
        for p, flag in old_flags:
            p.requires_grad_(flag)
        model.train(old_training)
        if switch:
            _set_attn(model, old_attn)


class _SummedCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(z, target, reduction="sum")`` whose backward, ``(softmax(z) - onehot(target)) * g``, is
    written in differentiable ops: a Hessian-vector product then runs through one softmax instead of autograd's
    generic double backward of ``log_softmax`` (several full ``[tokens, vocab]`` temporaries; ~10% of an HVP here).
    Same value, same derivatives."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # z [N, V], target [N]
        ctx.save_for_backward(z, target)
        return F.cross_entropy(z, target, reduction="sum")

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        z, target = ctx.saved_tensors
        grad = torch.softmax(z, dim=-1).scatter_add(
            -1, target[:, None], torch.full_like(target[:, None], -1, dtype=z.dtype))
        return grad * g, None


def mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token NLL (nats) over every predicted token of ``windows`` ([n, seq_len]); differentiable twice.

    Batches are summed into one graph, so it is exactly the full batch's mean whatever ``batch_size`` is.
    """
    total = windows.shape[0] * (windows.shape[1] - 1)
    loss = None
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        logits = model(ids, use_cache=False).logits[:, :-1]
        if logits.dtype in (torch.float16, torch.bfloat16):  # a half-precision softmax loses the 1e-3 nats we need
            logits = logits.float()
        z, target = logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        part = _SummedCrossEntropy.apply(z, target) if z.requires_grad else F.cross_entropy(z, target,
                                                                                            reduction="sum")
        loss = part if loss is None else loss + part
    return loss / total


# ---- the quantization direction -------------------------------------------------------------------------------


def _layer_formats(model: nn.Module, refs: Sequence[arch.LinearRef],
                   recipe: Any) -> list[tuple[str, int | None] | None]:
    """Each layer's ``(format, block size)`` under the recipe, ``None`` for layers it leaves in full precision."""
    from quantpredict.quantize import layer_plan

    planned = {p.ref.name: (p.weight_format, p.block_size) for p in layer_plan(model, recipe)}
    return [planned.get(r.name) for r in refs]


def _quantized_names(model: nn.Module, recipe: Any) -> set[str]:
    """Names of the linears the recipe quantizes (all but those it leaves in full precision)."""
    from quantpredict.quantize import quantized_linears

    return {r.name for r in quantized_linears(model, recipe)}


def rtn_deltas(model: nn.Module, refs: Sequence[arch.LinearRef], recipe: Any) -> list[torch.Tensor]:
    """``fake_quantize(W) - W`` ([out, in]) for each layer in its format and block size under the recipe (zero for
    layers the recipe leaves in full precision)."""
    from quantpredict.formats import fake_quantize

    out = []
    with torch.no_grad():
        for ref, fb in zip(refs, _layer_formats(model, refs, recipe), strict=True):
            w = ref.weight.detach()
            if fb is None:
                out.append(torch.zeros_like(w))
                continue
            out.append((fake_quantize(w, fb[0], axis=-1, block_size=fb[1]) - w).to(w.dtype))
    return out


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


def _base_model(model: nn.Module, recipe: Any, windows: torch.Tensor, batch_size: int = 8) -> nn.Module:
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


def _weight_deltas(q: nn.Module, refs: Sequence[arch.LinearRef]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [(qr.weight.detach() - r.weight.detach()).to(r.weight.dtype)
                for qr, r in zip(arch.linear_layers(q), refs, strict=True)]


def backend_deltas(base: nn.Module, refs: Sequence[arch.LinearRef], recipe: Any, windows: torch.Tensor,
                   batch_size: int = 8) -> list[torch.Tensor]:
    """``Q(W) - W`` per layer from the PTQ backend (``quantize_model`` on a deep copy of ``base``, weights only;
    activation quantization, if the recipe has it, is not part of the direction).

    SmoothQuant is already folded into ``base``, so the copy is quantized without it. For AWQ recipes use
    :func:`awq_backend`, which also moves the FP point to the scaled weights.
    """
    q, _ = _backend_copy(base, recipe, windows, batch_size)
    return _weight_deltas(q, refs)


def awq_backend(base: nn.Module, recipe: Any, windows: torch.Tensor,
                batch_size: int = 8) -> tuple[nn.Module, list[torch.Tensor]]:
    """For an AWQ recipe: ``(scaled, deltas)``, where ``scaled`` is a deep copy of ``base`` with the scales the PTQ
    backend chose folded in (the same FP function; its weights are the ones that get rounded) and ``deltas`` the
    backend's ``Q(W) - W`` at ``scaled`` (clipping included)."""
    from quantpredict.quantize import apply_recorded_scales

    q, report = _backend_copy(base, recipe, windows, batch_size)
    scaled = copy.deepcopy(base)
    apply_recorded_scales(scaled, report.awq)
    return scaled, _weight_deltas(q, arch.linear_layers(scaled))


# ---- the extraction context: lazily computed, shared between groups -------------------------------------------


def _sqnr_db(signal: float, noise: float) -> float:
    if signal <= 0.0:
        return 0.0
    if noise <= signal * 10 ** (-SQNR_CAP_DB / 10):
        return SQNR_CAP_DB
    return 10.0 * math.log10(signal / noise)


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


class _Context:
    def __init__(self, model: nn.Module, recipe: Any, windows: torch.Tensor, seed: int, opts: ExtractOptions,
                 groups: Sequence[str] = GROUPS, profile: Any = None):
        self.model, self.recipe, self.windows, self.seed, self.opts = model, recipe, windows, seed, opts
        self.groups = tuple(groups)
        self._profile = profile
        self._cache: dict[str, Any] = {}
        self._op: HessianOperator | None = None
        self._op_windows = 0

    def _lazy(self, key: str, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def awq(self) -> bool:
        return bool(getattr(self.recipe, "awq", False))

    @property
    def base(self) -> nn.Module:
        if self.awq:
            return self._awq[0]
        return self._lazy("base", lambda: _base_model(self.model, self.recipe, self.windows, self.opts.batch_size))

    @property
    def _awq(self) -> tuple[nn.Module, list[torch.Tensor]]:
        def run() -> tuple[nn.Module, list[torch.Tensor]]:
            smoothed = _base_model(self.model, self.recipe, self.windows, self.opts.batch_size)
            return awq_backend(smoothed, self.recipe, self.windows, self.opts.batch_size)
        return self._lazy("awq", run)

    @property
    def profile(self):
        """The model's :class:`~quantpredict.features.fisher.SensitivityProfile`: the one given to ``extract``
        (measured on the unsmoothed, unscaled model, so only for recipes without SmoothQuant and AWQ), else measured
        here."""
        from quantpredict.features.fisher import measure_profile

        if self._profile is not None and getattr(self.recipe, "smoothquant_alpha", None) is None and not self.awq:
            return self._profile
        return self._lazy("profile", lambda: measure_profile(self.base, self.windows, seed=self.seed))

    @property
    def refs(self) -> list[arch.LinearRef]:
        return self._lazy("refs", lambda: arch.linear_layers(self.base))

    @property
    def params(self) -> list[torch.Tensor]:
        return [r.parameter for r in self.refs]

    @property
    def rtn_delta(self) -> list[torch.Tensor]:
        return self._lazy("rtn_delta", lambda: rtn_deltas(self.base, self.refs, self.recipe))

    @property
    def delta(self) -> list[torch.Tensor]:
        """The recipe's direction, in ``[out, in]`` layout."""
        if self.awq:
            return self._awq[1]
        if getattr(self.recipe, "method", "rtn") == "rtn":
            return self.rtn_delta
        return self._lazy("delta", lambda: backend_deltas(self.base, self.refs, self.recipe, self.windows,
                                                          self.opts.batch_size))

    def param_layout(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[out, in]`` tensors in the parameters' storage layout (GPT-2's Conv1D stores ``[in, out]``)."""
        return [t.t() if r.transposed else t for t, r in zip(tensors, self.refs, strict=True)]

    @property
    def fp_nll(self) -> float:
        def compute() -> float:
            if self.wants_hessians:  # the layer-input pass gives the NLL too: one forward instead of two
                return self._lazy("hessians_nll", self._hessian_pass)[1]
            with prepared(self.base), torch.no_grad():
                return float(mean_nll(self.base, self.windows, self.opts.batch_size))
        return self._lazy("fp_nll", compute)

    @property
    def wants_hessians(self) -> bool:
        return bool({"noise", "gptq_proxy"} & set(self.groups))

    def _hessian_pass(self) -> tuple[dict[str, torch.Tensor], float]:
        from quantpredict.quantize import capture_linear_inputs

        if self._op is None and "landscape" in self.groups and "curvature" not in self.groups:
            # the landscape group's Hessian operator runs a forward pass over the whole batch anyway: take the layer
            # inputs and the NLL from it (one forward instead of two; with curvature in the set its one-window
            # operator would release this one and it would be built twice)
            with capture_linear_inputs(self.refs) as stats:
                op = self.operator()
            return {name: st.hessian for name, st in stats.items()}, op.loss
        with prepared(self.base), torch.no_grad(), capture_linear_inputs(self.refs) as stats:
            nll = float(mean_nll(self.base, self.windows, self.opts.batch_size))
        return {name: st.hessian for name, st in stats.items()}, nll

    @property
    def hessians(self) -> dict[str, torch.Tensor]:
        """``{linear name: H = 2/N X^T X}`` ([in, in], float64) of each linear's FP input on the calibration batch,
        from the same forward pass that gives ``fp_nll``: the noise group's output SQNR and the GPTQ proxy share it."""
        return self._lazy("hessians_nll", self._hessian_pass)[0]

    def operator(self, n_windows: int | None = None) -> HessianOperator:
        """The Hessian operator at ``W`` on the first ``n_windows`` windows (default all); one is kept at a time."""
        n = self.windows.shape[0] if n_windows is None else max(1, min(n_windows, self.windows.shape[0]))
        if self._op is None or self._op_windows != n:
            self.release_operator()
            windows = self.windows[:n]
            with prepared(self.base, self.params):
                self._op = HessianOperator(lambda: mean_nll(self.base, windows, self.opts.batch_size), self.params)
            self._op_windows = n
            if n == self.windows.shape[0]:
                self._cache.setdefault("fp_nll", self._op.loss)
        return self._op

    def release_operator(self) -> None:
        if self._op is not None:
            self._op.release()
            self._op = None

    def apply_hessian(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``H v`` on the whole calibration batch."""
        op = self.operator()
        with prepared(self.base, self.params):
            return op.apply(vectors)

    def nll_at(self, offsets: Sequence[torch.Tensor]) -> float:
        """Calibration NLL with every linear weight moved by ``offsets`` ([out, in]); weights restored after."""
        self.release_operator()  # the retained graph refers to the weights' current values
        originals = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, d in zip(self.params, self.param_layout(offsets)):
                    p.add_(d.to(p.dtype))
            with prepared(self.base), torch.no_grad():
                return float(mean_nll(self.base, self.windows, self.opts.batch_size))
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, originals):
                    p.copy_(w)


# ---- the groups --------------------------------------------------------------------------------------------------


def _model_group(ctx: _Context) -> dict[str, float]:
    m = ctx.model
    return {
        "n_params_nonembed": float(arch.non_embedding_parameters(m)),
        "n_layers": float(len(arch.blocks(m))),
        "hidden_size": float(arch.hidden_size(m)),
        "fp_calib_nll": ctx.fp_nll,
    }


def _format_group(ctx: _Context) -> dict[str, float]:
    from quantpredict.formats import get_format

    refs = arch.linear_layers(ctx.model)
    # per-channel scales cost 1/row bits per element, so layers of different widths differ: weight by size. Layers a
    # recipe leaves in full precision count at 16 bits (a per-layer recipe's bits are its average over the linears).
    rows = []
    for ref, fb in zip(refs, _layer_formats(ctx.model, refs, ctx.recipe), strict=True):
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


def _noise_group(ctx: _Context) -> dict[str, float]:
    # layers the recipe skips stay FP: their noise is no part of the recipe's
    wanted = _quantized_names(ctx.base, ctx.recipe)
    pairs = [(r, d) for r, d in zip(ctx.refs, ctx.rtn_delta) if r.name in wanted]
    if not pairs:
        raise ModelError(f"recipe {ctx.recipe.label} skips every linear layer; there is no quantization noise to "
                         "measure (narrow its skip patterns)")
    refs, deltas = [r for r, _ in pairs], [d for _, d in pairs]
    w2 = [float(r.weight.detach().double().pow(2).sum()) for r in refs]
    d2 = [float(d.double().pow(2).sum()) for d in deltas]
    layer_db = [_sqnr_db(s, n) for s, n in zip(w2, d2)]

    # output SQNR of each layer on its real calibration inputs: ||X W^T||^2 / ||X dW^T||^2 = tr(W H W^T) /
    # tr(dW H dW^T), with X the FP model's activations and H = 2/N X^T X (bias excluded: it is not quantized and
    # would inflate the signal)
    hessians = ctx.hessians
    sums = {r.name: (_quadratic(r.weight, hessians[r.name]), _quadratic(d, hessians[r.name])) for r, d in pairs}
    out_db = [_sqnr_db(*sums[r.name]) for r in refs]
    worst = min(range(len(refs)), key=lambda i: out_db[i])
    n_blocks = max(len(arch.blocks(ctx.base)), 1)
    return {
        "rtn_sqnr_db": _sqnr_db(sum(w2), sum(d2)),
        "rtn_sqnr_db_min": min(layer_db),
        "rtn_rel_weight_error": math.sqrt(sum(d2) / sum(w2)) if sum(w2) > 0 else 0.0,
        "out_sqnr_db_mean": sum(out_db) / len(out_db),
        "out_sqnr_db_min": out_db[worst],
        "out_sqnr_worst_depth": (refs[worst].block_index + 0.5) / n_blocks,
    }


def _quadratic(w: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(W H W^T)`` in float64 for ``W`` [out, in] and ``H`` [in, in]."""
    w = w.detach().double()
    return float(((w @ h) * w).sum())


def _curvature_group(ctx: _Context) -> dict[str, float]:
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


def _landscape_group(ctx: _Context) -> dict[str, float]:
    delta = ctx.delta
    op = ctx.operator()
    d_param = ctx.param_layout(delta)
    g_dot = _dot(op.grad, d_param)
    quad = 0.5 * _dot(d_param, ctx.apply_hessian(d_param))
    base = ctx.fp_nll
    radial = {t: ctx.nll_at([t * d for d in delta]) - base for t in (0.25, 0.5, 1.0)}
    gen = torch.Generator().manual_seed(ctx.seed + 2)
    sharp = []
    for _ in range(ctx.opts.n_noise_draws):
        noise = []
        for d in delta:
            z = torch.randn(d.shape, generator=gen, dtype=torch.float64)
            noise.append((z * (d.double().norm() / z.norm())).to(d.dtype))
        sharp.append(ctx.nll_at(noise) - base)
    return {
        "grad_dot_delta": g_dot,
        "quad_delta_h_delta": quad,
        "taylor_dnll": g_dot + quad,
        "radial_dnll_025": radial[0.25],
        "radial_dnll_050": radial[0.5],
        "radial_dnll_100": radial[1.0],
        "sharpness_random": sum(sharp) / len(sharp) if sharp else 0.0,
    }


def _gptq_proxy_group(ctx: _Context) -> dict[str, float]:
    from quantpredict.quantize.gptq import gptq_quantize, layer_output_error

    hessians = ctx.hessians
    proxy_rtn = proxy_gptq = 0.0
    formats = _layer_formats(ctx.base, ctx.refs, ctx.recipe)
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


def _fisher_group(ctx: _Context) -> dict[str, float]:
    # forward-mode differentiation does not run through PyTorch's CPU SDPA kernel: eager attention, restored after
    deltas = ctx.delta
    with prepared(ctx.base, eager=True):
        return fisher_measures(ctx.base, ctx.refs, deltas, ctx.windows, batch_size=1)


def _profile_group(ctx: _Context) -> dict[str, float]:
    # the recipe priced from weights alone against the model's profile (given to extract, or measured here)
    recipe = ctx.recipe
    gptq = {"blocksize": recipe.gptq_blocksize, "percdamp": recipe.percdamp, "act_order": recipe.act_order}
    deltas = profile_deltas(ctx.refs, _layer_formats(ctx.base, ctx.refs, recipe), recipe.method, ctx.profile,
                            gptq_options=gptq)
    return price_deltas(ctx.profile, [r.name for r in ctx.refs], deltas)


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
    from quantpredict.evaluate.scoring import max_positions

    limit = max_positions(model)
    if limit is not None and (isinstance(calib_ids, TokenStream) or calib_ids.dim() == 1):
        seq_len = min(seq_len, limit)
    return calibration_windows(calib_ids, n_windows, seq_len, seed=seed)


def extract(model: nn.Module, recipe: Any, calib_ids: torch.Tensor, *, seed: int = 0,
            which: str | Iterable[str] | None = None, options: ExtractOptions | None = None,
            progress: bool = False, profile: Any = None, **overrides: Any) -> dict[str, float]:
    """Every feature of the selected groups (all by default) for ``model`` under ``recipe``.

    ``calib_ids``: 1-D WikiText-2 *train* token ids (cut into ``n_windows`` seeded windows of ``seq_len``) or a 2-D
    ``[n, seq_len]`` batch used as given. ``options`` (or keyword overrides of its fields, e.g. ``n_probes=8``)
    set the cost knobs. ``profile``: a :class:`~quantpredict.features.fisher.SensitivityProfile` of ``model``
    measured once (``fisher.measure_profile``) for the ``profile`` group to reuse across recipes. Returns
    ``{feature name: value}`` for the selected groups plus ``<group>_seconds`` for each. Deterministic for a fixed
    ``seed``; the model is not modified. A model with NaN/Inf weights raises :class:`ModelError` naming the
    parameter.
    """
    opts = replace(options or ExtractOptions(), **overrides)
    groups = parse_which(which)
    arch.check_finite(model)
    windows = feature_windows(model, calib_ids, opts.n_windows, opts.seq_len, seed)
    ctx = _Context(model, recipe, windows, seed, opts, groups, profile)
    out: dict[str, float] = {}
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
    expected = {f.name for f in FEATURES if f.group in groups}
    missing = expected - out.keys()
    if missing:  # a schema row without an implementation is a bug here, not a user error
        raise RuntimeError(f"features {sorted(missing)} are in the schema but were not computed")
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise ModelError(f"features {bad} are not finite for this model and recipe; the model's calibration loss "
                         "or its quantization is degenerate (check the weights and the format)")
    return out
