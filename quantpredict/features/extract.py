"""``extract``: every feature of ``schema.FEATURES`` for a model under a quantization recipe.

All features are measured at the full-precision point ``W`` (the recipe's smoothed weights when it uses
SmoothQuant, its AWQ-scaled weights when it uses AWQ: both leave the FP function unchanged) on a small calibration
batch cut from WikiText-2 *train*. The quantization direction is ``delta = Q(W) - W`` over the weights of every
``arch.linear_layers`` layer, with ``Q`` the recipe's weight quantization (RTN: ``formats.fake_quantize`` per layer;
GPTQ and AWQ: ``quantize.quantize_model`` on a deep copy; AWQ's clipping is part of ``delta``). Second-order
quantities are taken w.r.t. exactly those weights. The RTN-based features (``noise``, ``gptq_proxy``, ``profile``)
of an AWQ recipe round the scaled weights as they are (no clipping).

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
from quantpredict.features.hessian import (
    AccumulatedHessianOperator,
    HessianOperator,
    directional_derivatives,
    hutchinson_trace_op,
    top_eigenvalue_op,
)
from quantpredict.memory import LOGITS_CHUNK_BYTES, logits_chunk_tokens, parse_bytes
from quantpredict.schema import FEATURES, GROUPS

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
    # working-memory budget (bytes or "4GiB"; None: memory.DEFAULT_MAX_MEMORY) that sets the micro-batch
    micro_batch: int | None = None  # windows per autograd graph; None: as many as max_memory allows
    max_memory: int | str | None = None
    logits_chunk_bytes: int = LOGITS_CHUNK_BYTES  # largest [tokens, vocab] float32 logits block (chunked head)


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


def summed_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, *,
               chunk_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
    """Summed next-token NLL (nats) over every predicted token of ``windows`` ([n, seq_len]); differentiable twice.

    Batches are summed into one graph. When a batch's ``[tokens, vocab]`` float32 logits would exceed
    ``chunk_bytes``, the head and the cross-entropy run in token chunks on the body's last hidden state
    (:func:`quantpredict.lmhead.chunked_cross_entropy`), so no larger logits block exists, also under double
    backward; otherwise the model's own logits are used, exactly as before.
    """
    from quantpredict import lmhead

    vocab = int(lmhead.head_weight(model).shape[0]) if lmhead.supports_chunking(model) else 0
    loss = None
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        target = ids[:, 1:].reshape(-1)
        if vocab and target.numel() * vocab * 4 > chunk_bytes:
            hidden = lmhead.final_hidden(model, ids)[:, :-1]
            part = lmhead.chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]),
                                                lmhead.head_weight(model).detach(), target,
                                                logits_chunk_tokens(vocab, chunk_bytes))
        else:
            logits = model(ids, use_cache=False).logits[:, :-1]
            if logits.dtype in (torch.float16, torch.bfloat16):  # a half-precision softmax loses the 1e-3 nats
                logits = logits.float()
            z = logits.reshape(-1, logits.shape[-1])
            part = lmhead.summed_cross_entropy(z, target)
        loss = part if loss is None else loss + part
    return loss


def mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, *,
             chunk_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
    """Mean next-token NLL (nats) over every predicted token of ``windows`` ([n, seq_len]); differentiable twice.

    Batches are summed into one graph, so it is exactly the full batch's mean whatever ``batch_size`` is; the head
    runs in token chunks where the vocabulary is large (see :func:`summed_nll`).
    """
    total = windows.shape[0] * (windows.shape[1] - 1)
    return summed_nll(model, windows, batch_size, chunk_bytes=chunk_bytes) / total


def graph_bytes_per_window(model: nn.Module, seq_len: int, *, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """An upper estimate of the memory one calibration window of ``seq_len`` tokens adds to a double-backward
    (Hessian-vector product) graph: per block, the saved activations of the attention (``heads x seq^2`` scores
    and probabilities) and of the MLP, several times over for the backward graph that ``create_graph`` keeps; plus
    the head's logits when they are not chunked. Calibrated on SmolLM2-135M (30 blocks, 576 wide, 49k vocabulary:
    one 256-token window measured 2.1 GB, this gives 2.1 GB) and checked on a 1.07B Llama (16 blocks, 2048 wide, 32
    heads: ~4.5 GB measured beyond weights, direction and runtime; this gives 4.3 GB)."""
    from quantpredict import lmhead

    cfg = model.config
    d = arch.hidden_size(model)
    inter = next((int(v) for k in ("intermediate_size", "ffn_dim", "n_inner") if (v := getattr(cfg, k, None))),
                 4 * d)
    heads = int(next((v for k in ("num_attention_heads", "n_head") if (v := getattr(cfg, k, None))), 1))
    itemsize = max(next(model.parameters()).element_size(), 4)
    body = len(arch.blocks(model)) * seq_len * (16 * d + 8 * inter + 8 * heads * seq_len) * itemsize
    vocab = int(lmhead.head_weight(model).shape[0])
    logits = seq_len * vocab * 4
    head = 4 * min(logits, chunk_bytes) if lmhead.supports_chunking(model) else 6 * logits
    return int(1.5 * (body + head))


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


def rtn_deltas(model: nn.Module, refs: Sequence[arch.LinearRef], recipe: Any, *,
               compact: torch.dtype | None = None) -> list[torch.Tensor]:
    """``fake_quantize(W) - W`` ([out, in]) for each layer in its format and block size under the recipe (zero for
    layers the recipe leaves in full precision). ``compact``: keep each layer's direction in that (narrower) dtype
    when it holds it exactly (MXINT4 on bf16 weights does: half the memory of a float32 copy)."""
    from quantpredict.formats import fake_quantize

    out = []
    with torch.no_grad():
        for ref, fb in zip(refs, _layer_formats(model, refs, recipe), strict=True):
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


# ---- streaming statistics and weight offsets applied inside each linear's forward -------------------------------


class _Quadratics:
    """Per linear, the running sums ``||X W^T||^2`` and ``||X delta^T||^2`` over the tokens of its FP input ``X``:
    ``tr(W H W^T)`` and ``tr(delta H delta^T)`` with ``H = 2/N X^T X``, without ever forming ``H`` ([in, in]).
    Products are taken in float32 (float64 for a float64 model) per batch and summed in float64."""

    def __init__(self, refs: Sequence[arch.LinearRef], deltas: Sequence[torch.Tensor]):
        self.refs, self.deltas = list(refs), list(deltas)
        self.sums = {r.name: [0.0, 0.0] for r in self.refs}
        self.tokens = {r.name: 0 for r in self.refs}

    def add(self, ref: arch.LinearRef, delta: torch.Tensor, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, ref.in_features)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        sums = self.sums[ref.name]
        sums[0] += float((x @ ref.weight.detach().to(x.dtype).T).double().pow(2).sum())
        sums[1] += float((x @ delta.to(x.device, x.dtype).T).double().pow(2).sum())
        self.tokens[ref.name] += x.shape[0]

    def traces(self) -> dict[str, tuple[float, float]]:
        """``{name: (tr(W H W^T), tr(delta H delta^T))}`` with ``H = 2/N X^T X``."""
        out = {}
        for name, (sw, sd) in self.sums.items():
            n = self.tokens[name]
            if n == 0:
                raise ValueError("no inputs were captured: run a forward pass inside capture_quadratics")
            out[name] = (sw * 2.0 / n, sd * 2.0 / n)
        return out


@contextlib.contextmanager
def capture_quadratics(refs: Sequence[arch.LinearRef], deltas: Sequence[torch.Tensor]) -> Iterator[_Quadratics]:
    """Hook the inputs of ``refs``; forward passes inside the ``with`` fill the :class:`_Quadratics`."""
    stats = _Quadratics(refs, deltas)
    delta_of = {id(ref): delta for ref, delta in zip(refs, deltas, strict=True)}
    with arch.input_hooks(refs, lambda ref, x: stats.add(ref, delta_of[id(ref)], x)):
        yield stats


@contextlib.contextmanager
def offset_weights(refs: Sequence[arch.LinearRef], offset: Any) -> Iterator[None]:
    """Inside the ``with``, each linear ``refs[i]`` computes with ``W_i + offset(i)`` (``offset(i)`` in the
    parameter's storage layout, or ``None`` for no offset) without the stored weight ever being written: the moved
    weight exists only during that module's forward (one layer's worth of memory), and the weights are bitwise
    what they were whatever happens. The values equal those of adding the offsets in place (same elementwise sum).
    """
    saved: dict[int, torch.Tensor] = {}
    handles = []
    for i, ref in enumerate(refs):
        def pre(module, _args, _i=i):
            d = offset(_i)
            if d is not None:
                saved[_i] = module.weight.data
                module.weight.data = saved[_i] + d.to(saved[_i].dtype)

        def post(module, _args, _out, _i=i):
            if _i in saved:
                module.weight.data = saved.pop(_i)

        handles += [ref.module.register_forward_pre_hook(pre), ref.module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        for i, data in saved.items():
            refs[i].module.weight.data = data


@contextlib.contextmanager
def along_direction(refs: Sequence[arch.LinearRef], deltas: Sequence[torch.Tensor], t: torch.Tensor) -> Iterator[None]:
    """Inside the ``with``, each linear computes ``y + t * (x delta^T)`` (``delta`` ``[out, in]``): the model at
    ``W + t delta`` to first order in every op, exactly as a function of ``t``, so autograd w.r.t. the scalar ``t``
    gives ``g . delta`` and ``delta^T H delta``. At ``t = 0`` the output is bitwise the unmoved one."""
    handles = []
    for ref, delta in zip(refs, deltas, strict=True):
        def hook(_module, args, out, _delta=delta):
            return out + t * _StoredLinear.apply(args[0], _delta)

        handles.append(ref.module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _StoredLinear(torch.autograd.Function):
    """``x @ d^T`` with ``d`` ``[out, in]`` a constant kept in its storage dtype (e.g. a bf16 quantization
    direction): it is upcast to ``x``'s dtype inside each forward and backward and only the stored tensor is saved,
    so the autograd graph never holds a float32 copy of every layer's direction. Differentiable to any order in
    ``x`` (its backward is :class:`_StoredLinearT`, whose backward is this)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d)
        return F.linear(x, d.to(x.dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (d,) = ctx.saved_tensors
        return _StoredLinearT.apply(g, d), None


class _StoredLinearT(torch.autograd.Function):
    """``g @ d`` (the backward of :class:`_StoredLinear`), ``d`` kept in its storage dtype."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d)
        return g @ d.to(g.dtype)

    @staticmethod
    def backward(ctx, u: torch.Tensor):
        (d,) = ctx.saved_tensors
        return _StoredLinear.apply(u, d), None


class _SeededNoise:
    """The sharpness group's random direction, layer by layer, without holding it: ``z_i ~ N(0, 1)`` drawn in
    float64 from one generator in layer order and scaled to ``||delta_i||``. Each layer's generator state and scale
    are kept, so layer ``i`` is redrawn on demand bit for bit (and kept, up to ``cache_bytes``)."""

    def __init__(self, deltas: Sequence[torch.Tensor], generator: torch.Generator, cache_bytes: int,
                 dtypes: Sequence[torch.dtype] | None = None):
        self.shapes = [d.shape for d in deltas]
        self.dtypes = list(dtypes) if dtypes is not None else [d.dtype for d in deltas]
        self.devices = [d.device for d in deltas]
        self.states: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        for d in deltas:
            self.states.append(generator.get_state())
            z = torch.randn(d.shape, generator=generator, dtype=torch.float64)
            self.scales.append(d.double().norm().cpu() / z.norm())
        self.cache: dict[int, torch.Tensor] = {}
        self.cache_left = cache_bytes

    def __call__(self, i: int) -> torch.Tensor:
        if i in self.cache:
            return self.cache[i]
        g = torch.Generator().set_state(self.states[i])
        z = torch.randn(self.shapes[i], generator=g, dtype=torch.float64)
        out = (z * self.scales[i]).to(self.dtypes[i]).to(self.devices[i])
        if out.numel() * out.element_size() <= self.cache_left:
            self.cache[i] = out
            self.cache_left -= out.numel() * out.element_size()
        return out


# ---- the extraction context: lazily computed, shared between groups -------------------------------------------


def _sqnr_db(signal: float, noise: float) -> float:
    if signal <= 0.0:
        return 0.0
    if noise <= signal * 10 ** (-SQNR_CAP_DB / 10):
        return SQNR_CAP_DB
    return 10.0 * math.log10(signal / noise)


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


@dataclass
class _CalibStats:
    """What one FP pass over the calibration batch gives: the NLL, each linear's output-SQNR traces and (for the
    ``gptq_proxy`` group only) each linear's ``[in, in]`` Hessian."""

    nll: float
    traces: dict[str, tuple[float, float]]
    hessians: dict[str, torch.Tensor] | None


class _Context:
    def __init__(self, model: nn.Module, recipe: Any, windows: torch.Tensor, seed: int, opts: ExtractOptions,
                 groups: Sequence[str] = GROUPS, storage_dtype: torch.dtype | None = None, profile: Any = None):
        self.model, self.recipe, self.windows, self.seed, self.opts = model, recipe, windows, seed, opts
        self._profile = profile
        # the model's own dtype when it was upcast for the call: directions are kept in it where that is exact
        self.storage_dtype = storage_dtype
        self.groups = tuple(groups)
        self.budget = parse_bytes(opts.max_memory, flag="max_memory")
        self.progress = False  # a bar over micro-batches (extract(progress=True) sets it)
        self._cache: dict[str, Any] = {}
        self._op: HessianOperator | AccumulatedHessianOperator | None = None
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
            return awq_backend(smoothed, self.recipe, self.windows, self.opts.batch_size, compact=self.storage_dtype)
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
        return self._lazy("rtn_delta", lambda: rtn_deltas(self.base, self.refs, self.recipe,
                                                          compact=self.storage_dtype))

    @property
    def delta(self) -> list[torch.Tensor]:
        """The recipe's direction, in ``[out, in]`` layout."""
        if self.awq:
            return self._awq[1]
        if getattr(self.recipe, "method", "rtn") == "rtn":
            return self.rtn_delta
        return self._lazy("delta", lambda: backend_deltas(self.base, self.refs, self.recipe, self.windows,
                                                          self.opts.batch_size, compact=self.storage_dtype))

    def param_layout(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[out, in]`` tensors in the parameters' storage layout (GPT-2's Conv1D stores ``[in, out]``)."""
        return [t.t() if r.transposed else t for t, r in zip(tensors, self.refs, strict=True)]

    # -- memory: how many windows one autograd graph may hold

    def micro_batch(self, n_windows: int) -> int:
        """Windows per double-backward graph for an operator over ``n_windows``: ``opts.micro_batch``, else as many
        as :func:`graph_bytes_per_window` says fit in the budget (at least one)."""
        if self.opts.micro_batch is not None:
            if self.opts.micro_batch < 1:
                raise ValueError(f"micro_batch must be at least 1 window, got {self.opts.micro_batch}")
            return min(self.opts.micro_batch, n_windows)
        per = graph_bytes_per_window(self.base, self.windows.shape[1], chunk_bytes=self.opts.logits_chunk_bytes)
        return max(1, min(n_windows, self.budget // max(per, 1)))

    def whole_graph(self, n_windows: int | None = None) -> bool:
        """True when the double-backward graph of ``n_windows`` (default: all) fits at once: the retained-graph path."""
        n = self.windows.shape[0] if n_windows is None else n_windows
        return self.micro_batch(n) >= n

    def _summed_nll(self, windows: torch.Tensor) -> torch.Tensor:
        return summed_nll(self.base, windows, self.opts.batch_size, chunk_bytes=self.opts.logits_chunk_bytes)

    def _share_fns(self, windows: torch.Tensor, size: int) -> list:
        """One closure per micro-batch of ``size`` windows, returning its share of the mean NLL over ``windows``."""
        total = windows.shape[0] * (windows.shape[1] - 1)
        return [lambda w=windows[lo : lo + size]: self._summed_nll(w) / total
                for lo in range(0, windows.shape[0], size)]

    # -- the FP pass: NLL, output-SQNR traces, Hessians

    @property
    def fp_nll(self) -> float:
        def compute() -> float:
            if self.wants_calib_stats:  # the layer-input pass gives the NLL too: one forward instead of two
                return self.calib_stats.nll
            with prepared(self.base), torch.no_grad():
                return float(self._summed_nll(self.windows) / self._n_tokens)
        return self._lazy("fp_nll", compute)

    @property
    def _n_tokens(self) -> int:
        return self.windows.shape[0] * (self.windows.shape[1] - 1)

    @property
    def wants_calib_stats(self) -> bool:
        return bool({"noise", "gptq_proxy"} & set(self.groups))

    @property
    def calib_stats(self) -> _CalibStats:
        return self._lazy("calib_stats", self._calib_pass)

    @contextlib.contextmanager
    def _capture(self) -> Iterator[tuple[_Quadratics, dict | None]]:
        from quantpredict.quantize import capture_linear_inputs

        with contextlib.ExitStack() as stack:
            quad = stack.enter_context(capture_quadratics(self.refs, self.rtn_delta))
            stats = (stack.enter_context(capture_linear_inputs(self.refs)) if "gptq_proxy" in self.groups
                     else None)
            yield quad, stats

    def _calib_pass(self) -> _CalibStats:
        share = (self._op is None and "landscape" in self.groups and "curvature" not in self.groups
                 and self.whole_graph())
        with self._capture() as (quad, stats):
            if share:
                # the landscape group's Hessian operator runs a forward pass over the whole batch anyway: take the
                # layer statistics and the NLL from it (one forward instead of two; with curvature in the set its
                # one-window operator would release this one and it would be built twice)
                nll = self.operator().loss
            else:
                with prepared(self.base), torch.no_grad():
                    nll = float(self._summed_nll(self.windows) / self._n_tokens)
        hessians = None if stats is None else {name: st.hessian for name, st in stats.items()}
        return _CalibStats(nll, quad.traces(), hessians)

    @property
    def hessians(self) -> dict[str, torch.Tensor]:
        """``{linear name: H = 2/N X^T X}`` ([in, in], float64) of each linear's FP input on the calibration batch,
        for the ``gptq_proxy`` group (from the same forward pass that gives ``fp_nll``)."""
        hessians = self.calib_stats.hessians
        if hessians is None:
            raise RuntimeError("layer Hessians are collected only when the gptq_proxy group is selected")
        return hessians

    # -- second order

    def operator(self, n_windows: int | None = None) -> HessianOperator | AccumulatedHessianOperator:
        """The Hessian operator at ``W`` on the first ``n_windows`` windows (default all); one is kept at a time.
        A retained graph when it fits the budget, else accumulated over micro-batches."""
        n = self.windows.shape[0] if n_windows is None else max(1, min(n_windows, self.windows.shape[0]))
        if self._op is None or self._op_windows != n:
            self.release_operator()
            windows = self.windows[:n]
            size = self.micro_batch(n)
            with prepared(self.base, self.params):
                if size >= n:
                    self._op = HessianOperator(lambda: mean_nll(self.base, windows, self.opts.batch_size,
                                                                chunk_bytes=self.opts.logits_chunk_bytes),
                                               self.params)
                else:
                    self._op = AccumulatedHessianOperator(self._share_fns(windows, size), self.params)
            self._op_windows = n
            if n == self.windows.shape[0] and size >= n:
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

    def taylor_terms(self, delta: Sequence[torch.Tensor]) -> tuple[float, float]:
        """``(g . delta, delta^T H delta)`` on the whole batch (``delta`` ``[out, in]``): from the retained operator
        when its graph fits the budget, else by :func:`directional_derivatives` over micro-batches (float64 sums,
        no parameter-sized vector)."""
        if self.whole_graph():
            d_param = self.param_layout(delta)
            op = self.operator()
            return _dot(op.grad, d_param), _dot(d_param, self.apply_hessian(d_param))
        self.release_operator()
        size = self.micro_batch(self.windows.shape[0])
        shares = self._share_fns(self.windows, size)

        def along(fn):
            def loss(t: torch.Tensor) -> torch.Tensor:
                with along_direction(self.refs, delta, t):
                    return fn()
            return loss

        like = self.params[0].detach()
        like = like.new_zeros((), dtype=torch.promote_types(like.dtype, torch.float32))
        fns = [along(fn) for fn in shares]
        if self.progress:
            from tqdm.auto import tqdm

            fns = tqdm(fns, desc="g.delta, delta'H delta", unit="micro-batch", leave=False)
        with prepared(self.base, eager=True):
            _, first, second = directional_derivatives(fns, like)
        return first, second

    def nll_at(self, offset: Any) -> float:
        """Calibration NLL with every linear weight moved: ``offset`` is a list of ``[out, in]`` tensors (one per
        linear) or a callable ``i -> tensor`` in the parameters' layout; the stored weights are never written."""
        self.release_operator()  # the retained graph refers to the weights' current values
        if not callable(offset):
            layout = self.param_layout(offset)
            offset = layout.__getitem__
        with prepared(self.base), offset_weights(self.refs, offset):
            return float(self._summed_nll(self.windows) / self._n_tokens)


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
    traces = ctx.calib_stats.traces
    out_db = [_sqnr_db(*traces[r.name]) for r in refs]
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
    g_dot, curv = ctx.taylor_terms(delta)
    quad = 0.5 * curv
    base = ctx.fp_nll

    def layout(i: int, d: torch.Tensor) -> torch.Tensor:
        return d.t() if ctx.refs[i].transposed else d

    radial = {t: ctx.nll_at(lambda i, t=t: layout(i, t * delta[i])) - base for t in (0.25, 0.5, 1.0)}
    gen = torch.Generator().manual_seed(ctx.seed + 2)
    sharp = []
    for _ in range(ctx.opts.n_noise_draws):
        noise = _SeededNoise(delta, gen, cache_bytes=ctx.budget // 4, dtypes=[p.dtype for p in ctx.params])
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


@contextlib.contextmanager
def compute_placement(model: nn.Module, device: Any = None) -> Iterator[torch.device]:
    """The model on ``device`` (``None``: where it is) in float32 (float64 stays float64) for the ``with``; its
    dtype and device are put back on exit. A bf16/fp16 model upcast to float32 and cast back is bitwise unchanged,
    so the features of a half-precision model are those of its stored weights, measured in float32."""
    from quantpredict.evaluate.scoring import model_device
    from quantpredict.memory import resolve_device

    old_device = model_device(model)
    target = old_device if device is None else resolve_device(device, flag="device")
    old_dtype = next(model.parameters()).dtype
    upcast = old_dtype in (torch.float16, torch.bfloat16)
    try:
        if target != old_device:
            model.to(target)
        if upcast:
            model.float()
        yield target
    finally:
        if upcast:
            model.to(old_dtype)
        if target != old_device:
            model.to(old_device)


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
        out = _extract_groups(_Context(model, recipe, windows, seed, opts, groups, compact, profile), groups,
                              progress)
    expected = {f.name for f in FEATURES if f.group in groups}
    missing = expected - out.keys()
    if missing:  # a schema row without an implementation is a bug here, not a user error
        raise RuntimeError(f"features {sorted(missing)} are in the schema but were not computed")
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise ModelError(f"features {bad} are not finite for this model and recipe; the model's calibration loss "
                         "or its quantization is degenerate (check the weights and the format)")
    return out


def _extract_groups(ctx: _Context, groups: Sequence[str], progress: bool) -> dict[str, float]:
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
