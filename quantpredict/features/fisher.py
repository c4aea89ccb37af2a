"""The Fisher side of the loss landscape: KL(P_fp || P_q) to second order, measured and priced.

To second order in the weight change ``delta``, the mean next-token KL divergence of a quantized model from its FP
original is exactly ``0.5 delta^T F delta``, with ``F`` the Fisher (= Gauss-Newton) matrix of the next-token
distribution: ``0.5 * mean_t dz_t^T (diag(p_t) - p_t p_t^T) dz_t``, where ``dz = J delta`` is the change of the
logits along ``delta`` (a Jacobian-vector product). Unlike the NLL Hessian, ``F`` is positive semi-definite and does
not depend on how well the model fits the calibration text, so the constant in ``KLD ~ c * 0.5 delta^T F delta``
is 1 by construction.

Two ways to get it, at two costs:

- :func:`fisher_group` (feature group ``fisher``): the exact quadratic by forward-mode differentiation
  (``torch.func.jvp``) on the calibration windows, plus the measured KL, NLL change and top-1 agreement of the
  quantized weights on the same windows. A few forward passes per recipe.
- :class:`SensitivityProfile` / :func:`price` (feature group ``profile``): measured once per model, priced per
  recipe from weights alone. For every linear layer ``l`` it keeps the Kronecker factors of K-FAC (Martens & Grosse
  2015): ``A_l = E[x x^T]`` over the layer's inputs and ``G_l = E[s s^T]`` over the gradients of the sampled
  next-token log-likelihood at the layer's outputs (labels drawn from the model itself, so ``E[s s^T]`` is the
  Fisher's, not the empirical one). Then ``0.5 delta^T F delta ~ 0.5 sum_l tr(dW_l A_l dW_l^T G_l)``. Two
  approximations: cross-layer blocks of ``F`` are dropped (block-diagonal), and within a layer inputs and output
  gradients are taken as independent and uncorrelated across positions (the Kronecker factorisation). The learned
  constant of a predictor absorbs their average; ``fisher_quad / kfac_quad`` in the store measures what they cost.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantpredict import arch
from quantpredict.imatrix import importance_of  # noqa: F401 (also this module's name for it)


def _named_weights(model: nn.Module, refs: Sequence[arch.LinearRef]) -> list[str]:
    ids = {id(p): name for name, p in model.named_parameters()}
    return [ids[id(r.parameter)] for r in refs]


def _at_least_float32(z: torch.Tensor) -> torch.Tensor:
    return z if z.dtype == torch.float64 else z.float()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[b, seq_len - 1, vocab]`` next-token logits in float32 (float64 for a float64 model)."""
    return _at_least_float32(model(input_ids=ids, use_cache=False).logits[:, :-1])


def _gauss_newton_quadratic(z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """``dz^T (diag p - p p^T) dz`` per position, ``p = softmax(z)``; ``z``, ``dz`` ``[..., vocab]`` -> ``[...]``."""
    p = torch.softmax(z.double(), dim=-1)
    dz = dz.double()
    mean = (p * dz).sum(-1)
    return (p * dz * dz).sum(-1) - mean * mean


@torch.no_grad()
def fisher_measures(model: nn.Module, refs: Sequence[arch.LinearRef], deltas: Sequence[torch.Tensor],
                    windows: torch.Tensor, batch_size: int = 1) -> dict[str, float]:
    """The ``fisher`` group's quantities of ``model`` moved by ``deltas`` (``[out, in]`` per ref) on ``windows``
    (``[n, seq_len]``): the exact second-order KL by a Jacobian-vector product, and the measured KL, NLL change and
    top-1 agreement. ``model`` is left as it was (the moved weights are restored bit for bit)."""
    from torch.func import functional_call, jvp

    from quantpredict.evaluate.scoring import token_comparison

    names = _named_weights(model, refs)
    primals = {n: r.parameter.detach() for n, r in zip(names, refs)}
    tangents = {n: (d.t() if r.transposed else d).to(r.parameter.dtype).contiguous()
                for n, r, d in zip(names, refs, deltas)}
    quad = kl = dnll = top1 = entropy = 0.0
    tokens = 0
    per_window: dict[str, list[float]] = {"kl": [], "dnll": []}  # window means, for the standard errors
    for lo in range(0, windows.shape[0], batch_size):
        ids = windows[lo: lo + batch_size]

        def logits_of(weights, ids=ids):
            out = functional_call(model, weights, args=(), kwargs={"input_ids": ids, "use_cache": False})
            return _at_least_float32(out.logits[:, :-1])

        z, dz = jvp(logits_of, (primals,), (tangents,))
        quad += float(_gauss_newton_quadratic(z, dz).sum())
        p = torch.log_softmax(z.double(), dim=-1)
        entropy += float(-(p.exp() * p).sum(-1).sum())
        originals = [r.parameter.detach().clone() for r in refs]
        try:
            for r, d in zip(refs, deltas):
                r.parameter.add_((d.t() if r.transposed else d).to(r.parameter.dtype))
            zq = _logits(model, ids)
        finally:
            for r, w in zip(refs, originals):
                r.parameter.copy_(w)
        stats = token_comparison(z, zq, ids[:, 1:])
        kl += float(stats["kld"].double().sum())
        dnll += float(stats["delta_nll"].double().sum())
        top1 += float(stats["top1"].double().sum())
        tokens += int(z.shape[0] * z.shape[1])
        per_window["kl"] += stats["kld"].double().mean(dim=-1).tolist()
        per_window["dnll"] += stats["delta_nll"].double().mean(dim=-1).tolist()
    return {"fisher_quad": 0.5 * quad / tokens, "kl_calib": kl / tokens, "dnll_calib": dnll / tokens,
            "top1_calib": top1 / tokens, "fp_entropy_calib": entropy / tokens,
            "kl_calib_se": _se(per_window["kl"]), "dnll_calib_se": _se(per_window["dnll"])}


def _se(values: Sequence[float]) -> float:
    """Standard error of the mean of equal-length windows' means (0 for a single window)."""
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.std(unbiased=True) / v.numel() ** 0.5) if v.numel() > 1 else 0.0


# ---- the sensitivity profile: K-FAC factors, measured once per model ----------------------------------------------


@dataclass
class SensitivityProfile:
    """What a model's quantization sensitivity is made of, measured once on calibration windows.

    ``names``: the linear layers (``arch.linear_layers`` order). ``input_moment[name]``: ``A = E[x x^T]``
    ``[in, in]`` over the layer's input tokens (one tensor shared by the layers that read the same input, such as
    q/k/v); ``output_fisher[name]``: ``G = E[s s^T]`` ``[out, out]`` over the sampled-label log-likelihood gradients
    at its output (per token). Both are float32 (float64 for a float64 model): for SmolLM2 they take ~1.1 GB. A
    lean profile (``measure_profile(kfac=False)``) has no ``G`` and its ``input_moment`` is a mapping that reads each
    ``A`` from disk on access, measured block by block the first time one is needed
    (:mod:`quantpredict.features.moments`).
    ``tokens``: predicted tokens
    behind them; ``fp_nll`` and ``fp_entropy``: the FP model's mean NLL and next-token entropy on those windows;
    ``seconds``: what measuring it cost.
    """

    names: list[str]
    input_moment: Mapping[str, torch.Tensor]
    output_fisher: Mapping[str, torch.Tensor]
    tokens: int
    fp_nll: float
    fp_entropy: float
    seconds: float
    label_samples: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    # per-token layer inputs [T, in] (shared like input_moment) and sampled output gradients [T, out], bf16: the
    # token-wise estimate keeps what the Kronecker factorisation loses (inputs and gradients correlated token by
    # token, as with the massive activations of real models' down projections)
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    token_grads: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def hessian(self, name: str) -> torch.Tensor:
        """GPTQ's Hessian of layer ``name``, ``2 A`` (``[in, in]`` float64)."""
        return 2.0 * self.input_moment[name].double()

    def positions(self, rows: int) -> int:
        """The denominator of the token-wise terms over ``rows`` stored positions (whole windows): ``rows`` itself,
        or, for a profile measured with ``scored_from = k`` (``meta``), the scored positions ``seq_len - k + 1``
        per window (``k = 1``, every position after the first, gives ``rows`` again)."""
        k = self.meta.get("scored_from")
        if k is None:
            return rows
        seq_len = int(self.meta["seq_len"])
        return rows // seq_len * (seq_len - int(k) + 1)


def first_scored_row(scored_from: int | None, seq_len: int) -> int:
    """The first scored row of a window's ``[seq_len - 1]`` next-token logits when positions ``scored_from ..`` are
    scored (0 for ``None``: every position after the first); a ``ValueError`` for a position outside the window."""
    if scored_from is None:
        return 0
    if not (isinstance(scored_from, int) and 1 <= scored_from < seq_len):
        raise ValueError(f"scored_from must be a position between 1 and seq_len - 1 = {seq_len - 1}, "
                         f"got {scored_from!r}")
    return scored_from - 1


#: the windows whose per-token terms a profile keeps by default (the first ones of its calibration batch)
TOKEN_WINDOWS = 2


def measure_profile(model: nn.Module, windows: torch.Tensor, *, label_samples: int = 1, seed: int = 0,
                    batch_size: int = 1, token_windows: int | None = TOKEN_WINDOWS,
                    kfac: bool = True, scored_from: int | None = None) -> SensitivityProfile:
    """The :class:`SensitivityProfile` of ``model`` on ``windows`` (``[n, seq_len]``).

    One forward and ``label_samples`` backward passes per micro-batch of ``batch_size`` windows: the inputs of every
    linear layer give ``A``; the gradients at its outputs of ``sum_t log p(y_t)``, with ``y_t`` drawn from the model's
    own next-token distribution, give ``G`` (the Fisher's output factor). Memory is that of one micro-batch's
    backward plus the factors (``in^2`` per distinct layer input and ``out^2`` per layer, float32), plus the layer
    inputs and output gradients of every token of the first ``token_windows`` windows in bf16 (``T * (in + out)`` per
    layer: 250 MB for SmolLM2 at the default 2 windows = 510 tokens; ``None`` keeps every window's, ``0`` none, and
    only with one label sample). Pricing a recipe token-wise costs ``2 T sum_l out_l in_l`` FLOPs, so T is what
    ``token_windows`` trades against the estimate's noise.

    ``kfac=False`` measures the lean profile, what the weights-only price (``price_deltas(kfac=False)``) reads: no
    ``G`` and no ``A`` is allocated or accumulated (28.6 GB of them for a 1.5B Qwen2), the token-wise terms and the
    FP NLL and entropy are as with ``kfac=True`` (bit for bit), and only the micro-batches holding token windows run
    a backward pass. Its ``input_moment`` (GPTQ's Hessian ``2A``) is a :class:`~quantpredict.features.moments.
    LazyInputMoments`: measured block by block on the same windows the first time one is read (on the model as it
    is then), each ``A`` kept on disk, one block's in memory at a time.

    ``scored_from=k`` (``1 <= k < seq_len``; :func:`quantpredict.evaluate.make_windows`'s meaning): the profile of an
    evaluation that scores positions ``k ..`` of every window alone (llama-perplexity's protocol: ``seq_len=512,
    k=257``). Labels are drawn, and the FP NLL and entropy taken, at those positions only; the earlier ones are
    context, whose layer inputs and output gradients (the gradients of the scored positions' loss) are kept as every
    position's are, and the token-wise terms divide by the scored positions (:meth:`SensitivityProfile.positions`).
    """
    first = first_scored_row(scored_from, int(windows.shape[1]))
    if not kfac and label_samples != 1:
        raise ValueError("measure_profile(kfac=False) keeps the token-wise terms only, which take one label sample; "
                         f"got label_samples={label_samples}")
    t0 = time.perf_counter()
    refs = arch.linear_layers(model)
    names = [r.name for r in refs]
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    g_sums = {r.name: torch.zeros(r.out_features, r.out_features, dtype=dtype) for r in refs} if kfac else {}
    a_sums: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}  # layer -> the first layer that read the same input tensor (its A is shared)
    seen_inputs: dict[int, tuple[torch.Tensor, str]] = {}  # the tensor is held so that its id is not reused
    in_tokens = dict.fromkeys(names, 0)
    keep_tokens = token_windows != 0 and label_samples == 1
    n_token_windows = windows.shape[0] if token_windows is None else min(int(token_windows), windows.shape[0])
    x_parts: dict[str, list[torch.Tensor]] = {}
    s_parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    gen = torch.Generator().manual_seed(seed)
    nll_sum = entropy_sum = 0.0
    tokens = 0
    old_flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = []

    def forward_hook(module, args, output, name):
        if capture_inputs[0]:
            if name not in owner:  # first micro-batch: find the layers fed by one tensor (q/k/v, gate/up)
                owner[name] = seen_inputs.setdefault(id(args[0]), (args[0], name))[1]
            keep = keep_tokens and window_index[0] < n_token_windows
            if owner[name] == name and (kfac or keep):
                x = _at_least_float32(args[0].detach().reshape(-1, args[0].shape[-1])).to(dtype)
                if kfac:
                    if name not in a_sums:
                        a_sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=dtype)
                    a_sums[name] += x.T @ x
                    in_tokens[name] += x.shape[0]
                if keep:
                    x_parts.setdefault(name, []).append(x.to(torch.bfloat16))
        if output.requires_grad:
            def grad_hook(g, name=name):
                s = _at_least_float32(g.detach().reshape(-1, g.shape[-1])).to(dtype)
                if kfac:
                    g_sums[name] += s.T @ s
                if keep_tokens and window_index[0] < n_token_windows:
                    s_parts[name].append(s.to(torch.bfloat16))
            output.register_hook(grad_hook)

    capture_inputs = [True]
    window_index = [0]  # the first window of the current micro-batch
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        # the token embeddings' output becomes the graph's leaf: gradients flow to every layer output, and no
        # weight gradient (the 49k x 576 tied head's, say) is ever computed
        handles.append(model.get_input_embeddings().register_forward_hook(
            lambda m, a, o: o.detach().requires_grad_(True)))
        for r in refs:
            handles.append(r.module.register_forward_hook(
                lambda m, a, o, name=r.name: forward_hook(m, a, o, name)))
        model.eval()
        for lo in range(0, windows.shape[0], batch_size):
            ids = windows[lo: lo + batch_size]
            window_index[0] = lo
            # the lean profile needs gradients only where it keeps them: forward alone for the other windows
            backward = kfac or (keep_tokens and lo < n_token_windows)
            for k in range(label_samples):
                capture_inputs[0] = k == 0
                seen_inputs.clear()
                with torch.set_grad_enabled(backward):
                    z = _logits(model, ids)[:, first:]
                    logp = torch.log_softmax(z, dim=-1)
                if k == 0:
                    with torch.no_grad():
                        nll_sum += float(-logp.gather(-1, ids[:, first + 1:, None]).double().sum())
                        entropy_sum += float(-(logp.exp() * logp).double().sum())
                        tokens += int(logp.shape[0] * logp.shape[1])
                if not backward:
                    continue
                with torch.no_grad():
                    y = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=gen)
                loss = logp.reshape(-1, logp.shape[-1]).gather(-1, y).sum()
                loss.backward()
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for p, flag in old_flags:
            p.requires_grad_(flag)
    n_label = tokens * label_samples
    inputs = {n: torch.cat(v) for n, v in x_parts.items()}
    if kfac:
        moments = {n: a / max(in_tokens[n], 1) for n, a in a_sums.items()}
        input_moment: Mapping[str, torch.Tensor] = {n: moments[owner[n]] for n in names}
        output_fisher = {n: g_sums[n] / max(n_label, 1) for n in names}
    else:
        from quantpredict.features.moments import LazyInputMoments, measure_input_moments

        input_moment = LazyInputMoments(names, lambda: measure_input_moments(model, windows, batch_size=batch_size))
        output_fisher = {}
    return SensitivityProfile(
        names=names,
        input_moment=input_moment,
        output_fisher=output_fisher,
        tokens=tokens, fp_nll=nll_sum / max(tokens, 1), fp_entropy=entropy_sum / max(tokens, 1),
        token_inputs={n: inputs[owner[n]] for n in names} if keep_tokens and inputs else {},
        token_grads={n: torch.cat(v) for n, v in s_parts.items()} if keep_tokens and inputs else {},
        seconds=time.perf_counter() - t0, label_samples=label_samples,
        meta={"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "seed": seed}
        | ({} if kfac else {"kfac": False}) | ({} if scored_from is None else {"scored_from": int(scored_from)}))


def kfac_quadratic(delta: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """``(0.5 tr(dW A dW^T G), 0.5 sum_i G_ii (dW A dW^T)_ii)`` for ``dW`` ``[out, in]``: the K-FAC quadratic with the
    full and with the diagonal output factor, in float64."""
    d = delta.double()
    a, g = a.double(), g.double()
    da = d @ a
    full = float(((g @ d) * da).sum())
    diag = float((torch.diagonal(g) * (da * d).sum(1)).sum())
    return 0.5 * full, 0.5 * diag


@functools.cache
def price_dtype(device_type: str = "cpu") -> torch.dtype:
    """The dtype of the token-wise price's matrix products (:func:`token_terms`): bfloat16 where the hardware
    multiplies it natively (a CUDA device; a CPU with AVX512_BF16 or AMX-BF16, by
    :func:`torch.cpu.get_capabilities`), else float32.

    The profile stores its per-token inputs and output gradients in bfloat16 already, so the only roundings the
    bfloat16 product adds are the weight change's and the product's own (bfloat16's unit roundoff 2^-8 relative
    each, independent from element to element): on SmolLM2's recipes the price moves by 1e-4 to 9e-4 relative
    (GPTQ's cancellation the most), against the predictor's ~8% scatter, and the product runs 2.1x faster (one
    AVX-512 core of an AMD EPYC: 93 -> 209 GFLOP/s). Without native
    support a bfloat16 product is emulated and slower than float32, hence the check."""
    if device_type == "cuda":
        return torch.bfloat16
    if device_type != "cpu":
        return torch.float32
    caps = torch.cpu.get_capabilities()
    return torch.bfloat16 if caps.get("avx512_bf16") or caps.get("amx_bf16") else torch.float32


def token_terms(s: torch.Tensor, d: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[T]`` float64: each token's ``s_t^T d x_t`` for ``s`` ``[T, out]``, ``d`` ``[out, in]``, ``x`` ``[T, in]``.

    The product ``s d`` is taken in ``dtype`` (default :func:`price_dtype` of ``d``'s device), its dot with ``x`` in
    float32, the result returned in float64. Pass ``d`` already in ``dtype`` to round it once per layer rather than
    once per chunk."""
    dtype = price_dtype(d.device.type) if dtype is None else dtype
    return ((s.to(dtype) @ d.to(dtype)).float() * x.float()).sum(1).double()


def token_quadratic(delta: torch.Tensor, x: torch.Tensor, s: torch.Tensor, tokens: int,
                    chunk: int = 512, into: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> float:
    """``0.5 / T sum_t (s_t^T dW x_t)^2`` for ``dW`` ``[out, in]``, per-token inputs ``x`` ``[T, in]`` and sampled
    output gradients ``s`` ``[T, out]``: the layer's Gauss-Newton quadratic exact in every token's own input and
    gradient (only the cross-position terms are dropped), in chunks of :func:`token_terms` (products in ``dtype``,
    default :func:`price_dtype`) with a float64 sum.

    ``into`` ``[T]`` float64: each token's term ``s_t^T dW x_t`` is added to it, for the sum over layers at one
    position that :func:`cross_layer_quadratic` squares."""
    dtype = price_dtype(delta.device.type) if dtype is None else dtype
    d = delta.to(dtype)
    total = 0.0
    for lo in range(0, x.shape[0], chunk):
        v = token_terms(s[lo: lo + chunk], d, x[lo: lo + chunk], dtype)
        total += float(v.pow(2).sum())
        if into is not None:
            into[lo: lo + chunk] += v
    return 0.5 * total / max(tokens, 1)


def cross_layer_quadratic(terms: torch.Tensor, tokens: int) -> float:
    """``0.5 / T sum_t (sum_l s_lt^T dW_l x_lt)^2`` from ``terms`` ``[T]``, each position's terms summed over the
    layers (:func:`token_quadratic`'s ``into``): the token-wise price with the cross-layer terms at one position kept.
    All layers' sampled gradients at a position come from one backward pass of one sampled label per position, so the
    sum is the Gauss-Newton quadratic of the stacked weight change at that position (cross-position terms dropped,
    as in the token-wise price)."""
    return 0.5 * float(terms.double().pow(2).sum()) / max(tokens, 1)


def position_accumulator(token_inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The zeroed ``[T]`` float64 accumulator of each stored position's terms summed over the layers
    (:func:`token_quadratic`'s ``into``), ``T`` the rows of the per-token inputs (empty without them)."""
    rows = next(iter(token_inputs.values())).shape[0] if token_inputs else 0
    return torch.zeros(rows, dtype=torch.float64)


def cross_layer_price(profile: SensitivityProfile, across: torch.Tensor) -> float:
    """:func:`cross_layer_quadratic` of a filled :func:`position_accumulator` (NaN for an empty one: a profile
    without per-token terms)."""
    rows = across.shape[0]
    return cross_layer_quadratic(across, profile.positions(rows)) if rows else float("nan")


def layer_prices(profile: SensitivityProfile, name: str, delta: torch.Tensor, *,
                 kfac: bool = True, into: torch.Tensor | None = None) -> tuple[float, float, float]:
    """``(K-FAC, K-FAC with diagonal G, token-wise)`` second-order KL of one layer's weight change (the K-FAC ones
    NaN without ``kfac``: they cost as much again). ``into``: :func:`token_quadratic`'s."""
    if kfac and name not in profile.output_fisher:
        raise ValueError(f"the profile has no K-FAC output factor for {name}: it was measured lean "
                         "(measure_profile(kfac=False)); price it with kfac=False or measure it with kfac=True")
    full, diag = (kfac_quadratic(delta, profile.input_moment[name], profile.output_fisher[name]) if kfac
                  else (float("nan"), float("nan")))
    tok = float("nan")
    if name in profile.token_grads:
        x = profile.token_inputs[name]
        tok = token_quadratic(delta, x, profile.token_grads[name], profile.positions(x.shape[0]), into=into)
    return full, diag, tok


def price_deltas(profile: SensitivityProfile, names: Sequence[str], deltas: Sequence[torch.Tensor | None], *,
                 kfac: bool = True) -> dict[str, float]:
    """The ``profile`` group's features of per-layer weight changes (``None``: layer left in full precision);
    without ``kfac`` only the token-wise prices (what the ``profile`` predictor reads): ``token_gn_quad`` and
    ``token_cross_quad`` (:func:`cross_layer_quadratic`; NaN for a profile without per-token terms)."""
    full = diag = tok = 0.0
    per_layer = []
    across = position_accumulator(profile.token_inputs)
    for name, d in zip(names, deltas, strict=True):
        if d is None:
            continue
        f, dg, t = layer_prices(profile, name, d, kfac=kfac, into=across if across.numel() else None)
        full += f
        diag += dg
        tok += t
        per_layer.append(t if math.isfinite(t) else f)
    total = sum(per_layer)
    top = max(per_layer) / total if per_layer and total > 0 else 0.0
    cross = cross_layer_price(profile, across)
    return {"kfac_quad": full, "kfac_quad_diag": diag, "kfac_max_layer_share": top, "token_gn_quad": tok,
            "token_cross_quad": cross}


#: bytes of Hessian factors a caller's ``factors`` cache of :func:`profile_deltas` may hold (SmolLM2's 210 layers
#: take 0.5 GiB; a 1.5B model's would take 9 GiB, so only its first layers are kept)
FACTOR_CACHE_BYTES = 1 << 30

#: working bytes of one stack of same-shape layers that the weights-only GPTQ price rounds in one column loop
#: (:func:`iter_profile_deltas`): SmolLM2's 30 q_proj in one; a 1.5B model's 8960-wide layers one at a time
STACK_BYTES = 256 << 20


def profile_deltas(refs: Sequence[arch.LinearRef], formats: Sequence[tuple[str, int | None] | None], method: str,
                   profile: SensitivityProfile, *, gptq_options: dict | None = None,
                   factors: dict | None = None, importance: Mapping[str, Any] | None = None,
                   hessians: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor | None]:
    """:func:`iter_profile_deltas` as a list: every layer's change held at once (a 1.5B model's linear layers take
    5.2 GB in float32). To price a recipe, hand the iterator to :func:`price_deltas` instead, which holds one."""
    return list(iter_profile_deltas(refs, formats, method, profile, gptq_options=gptq_options, factors=factors,
                                    importance=importance, hessians=hessians))


@torch.no_grad()  # per step of the generator (torch wraps generator functions): not leaked to the caller
def iter_profile_deltas(refs: Sequence[arch.LinearRef], formats: Sequence[tuple[str, int | None] | None],
                        method: str, profile: SensitivityProfile, *, gptq_options: dict | None = None,
                        factors: dict | None = None, importance: Mapping[str, Any] | None = None,
                        hessians: Mapping[str, torch.Tensor] | None = None) -> Iterator[torch.Tensor | None]:
    """Each layer's ``Q(W) - W`` ([out, in]) from its weights alone: RTN, or GPTQ with the profile's FP-input
    Hessian ``2A`` (the layer-wise GPTQ of :mod:`quantpredict.quantize.gptq`; the sequential pass of
    ``quantize_model`` feeds each block the already-quantized blocks' outputs instead). ``None`` for layers left in
    full precision. ``factors``: a dict the caller keeps across recipes, where each layer's GPTQ Hessian factor
    (:func:`~quantpredict.quantize.gptq.hessian_inverse_factor`, the same for every format) is kept while the dict
    holds at most :data:`FACTOR_CACHE_BYTES`: the same deltas, one factorisation per layer instead of one per
    recipe. ``importance``: HF layer name -> its [in] importance weights (llama-quantize's quant_weights of an
    imatrix, :func:`quantpredict.imatrix.layer_importance`): the RTN of a llama.cpp format of a layer named there
    quantizes with them (``fake_quantize(..., importance=...)``); other formats and layers as without (GPTQ with an
    imatrix is not llama.cpp's: a ``ValueError``). ``hessians`` (``{name: [in, in]}``, float64; e.g. a
    :class:`~quantpredict.features.moments.MomentHessians` of the recipe's calibration windows): the Hessians GPTQ
    rounds against, in place of the profile's ``2A``; a ``factors`` cache must then belong to those Hessians.

    GPTQ of a single-scale format (MX, int, fp8, float) without ``act_order`` rounds the same layer of later blocks
    (same shape and format) in one stacked column loop (:func:`~quantpredict.quantize.gptq.gptq_quantize_stacked`,
    up to :data:`STACK_BYTES` of work per stack): every layer's delta is still its GPTQ alone, bit for bit, held
    until its turn comes."""
    from quantpredict.formats import get_format
    from quantpredict.formats.params import is_shipped
    from quantpredict.quantize.gptq import gptq_quantize, gptq_quantize_stacked
    from quantpredict.quantize.rtn import rtn_quantize

    opts = dict(gptq_options or {})
    percdamp, act_order = opts.get("percdamp", 0.01), bool(opts.get("act_order", False))

    def hessian_of(name: str) -> torch.Tensor:
        return profile.hessian(name) if hessians is None else hessians[name]

    def factor_of(name: str, hessian: torch.Tensor) -> torch.Tensor:
        return _cached_factor(factors, (name, percdamp, act_order), hessian, percdamp, act_order)

    def stackable(k: int) -> bool:  # GPTQ's column loop can run this layer stacked with others of its shape
        fb = formats[k]
        return (method == "gptq" and fb is not None and not act_order and not is_shipped(get_format(fb[0]))
                and importance_of(importance, refs[k].name, fb[0]) is None)

    done: dict[int, torch.Tensor] = {}  # deltas computed in a stack ahead of their turn
    for k, (ref, fb) in enumerate(zip(refs, formats, strict=True)):
        if fb is None:
            yield None
            continue
        if k in done:
            yield done.pop(k)
            continue
        w = ref.weight.detach().float()
        imp = importance_of(importance, ref.name, fb[0])
        if stackable(k):
            # the same layer of later blocks (same shape and format) in one column loop: bit for bit each layer's
            # GPTQ alone (gptq_quantize_stacked), its Python cost paid once per stack, up to STACK_BYTES of work
            per = w.numel() * 4 * 4 + w.shape[1] ** 2 * 4  # W, its copy, Q and the held delta; the factor
            members = [k] + [j for j in range(k + 1, len(refs)) if formats[j] == fb and stackable(j)
                             and refs[j].weight.shape == ref.weight.shape]
            members = members[:max(1, STACK_BYTES // per)]
            ws, diags, fs = [], [], []
            for j in members:
                hessian = hessian_of(refs[j].name)
                ws.append(refs[j].weight.detach().float())
                diags.append(torch.diag(hessian).clone())
                fs.append(factor_of(refs[j].name, hessian))
                del hessian
            wq = gptq_quantize_stacked(torch.stack(ws), torch.stack(diags), torch.stack(fs), fb[0],
                                       block_size=fb[1], **{k_: v for k_, v in opts.items() if k_ == "blocksize"})
            for j, wj, qj in zip(members[1:], ws[1:], wq[1:], strict=True):
                done[j] = qj - wj
            yield wq[0] - ws[0]
            continue
        if method == "gptq":
            if imp is not None:
                raise ValueError(f"{ref.name}: GPTQ with an imatrix is not llama.cpp's quantization; price RTN")
            hessian = hessian_of(ref.name)
            factor = None if factors is None else factor_of(ref.name, hessian)
            wq = gptq_quantize(w.clone(), hessian, fb[0], block_size=fb[1], inverse_factor=factor, **opts)
        else:
            wq = rtn_quantize(w, fb[0], block_size=fb[1], importance=imp)
        yield wq - w


def _cached_factor(factors: dict | None, key: tuple, hessian: torch.Tensor, percdamp: float,
                   act_order: bool) -> torch.Tensor:
    """The layer's GPTQ Hessian factor from ``factors`` (keyed ``(name, percdamp, act_order)``), else computed and
    kept there while the cache holds at most :data:`FACTOR_CACHE_BYTES`."""
    from quantpredict.quantize.gptq import hessian_inverse_factor

    factor = None if factors is None else factors.get(key)
    if factor is None:
        factor = hessian_inverse_factor(hessian, percdamp, act_order)
        if factors is not None and sum(t.numel() * t.element_size() for t in factors.values()) \
                + factor.numel() * 4 <= FACTOR_CACHE_BYTES:
            factors[key] = factor
    return factor
