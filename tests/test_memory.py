"""Bounded memory: the chunked head, micro-batched second-order quantities and streamed statistics against the
whole-batch computations they replace (float64 on tiny models, float32 on a zoo model), and today's features."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch.autograd.gradcheck import gradcheck, gradgradcheck

from quantpredict import arch, lmhead
from quantpredict.errors import DeviceError, ResourceError
from quantpredict.features import ExtractOptions, extract
from quantpredict.features.context import Context
from quantpredict.features.direction import rtn_deltas
from quantpredict.features.extract import feature_windows
from quantpredict.features.hessian import AccumulatedHessianOperator, HessianOperator, directional_derivatives
from quantpredict.features.offsets import along_direction, offset_weights
from quantpredict.features.state import graph_bytes_per_window, mean_nll, prepared
from quantpredict.memory import logits_chunk_tokens, parse_bytes, resolve_device, resolve_dtype
from quantpredict.quantize import Recipe

REFERENCE = Path(__file__).parent / "data" / "features_reference.json"


def _windows(n: int = 4, seq: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 320, (n, seq), generator=torch.Generator().manual_seed(seed))


# ---- the chunked head ---------------------------------------------------------------------------------------------


def test_chunked_cross_entropy_value_gradient_and_hvp_equal_f_cross_entropy_in_float64():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 8, dtype=torch.float64, generator=g, requires_grad=True)
    m = torch.randn(8, 8, dtype=torch.float64, generator=g)
    w = torch.randn(50, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 50, (37,), generator=g)
    v = torch.randn(37, 8, dtype=torch.float64, generator=g)

    def terms(chunk):
        h = torch.tanh(a @ m)  # a nonlinear map in front: second derivatives flow through h
        loss = (lmhead.chunked_cross_entropy(h, w, y, chunk) if chunk
                else F.cross_entropy(F.linear(h, w), y, reduction="sum"))
        loss = loss * loss / 100  # the incoming gradient then depends on `a` too (the g-branch of the backward)
        (grad,) = torch.autograd.grad(loss, a, create_graph=True)
        (hv,) = torch.autograd.grad((grad * v).sum(), a)
        return loss.detach(), grad.detach(), hv

    ref = terms(None)
    for chunk in (1, 5, 37, 100):
        for ours, theirs in zip(terms(chunk), ref):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    h = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w2, y2 = torch.randn(9, 4, dtype=torch.float64, generator=g), torch.randint(0, 9, (6,), generator=g)
    assert gradcheck(lambda x: lmhead.chunked_cross_entropy(x, w2, y2, 4), (h,))
    assert gradgradcheck(lambda x: lmhead.chunked_cross_entropy(x, w2, y2, 4), (h,))


def test_chunked_cross_entropy_rejects_a_trainable_head_and_bad_chunks():
    w = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(ValueError, match="detach"):
        lmhead.chunked_cross_entropy(torch.randn(2, 3), w, torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="chunk"):
        lmhead.chunked_cross_entropy(torch.randn(2, 3), w.detach(), torch.tensor([0, 1]), 0)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gpt_neox"])
def test_final_hidden_times_the_head_is_the_models_logits(family):
    model = tiny_model(family, hidden=16, layers=2, heads=2)
    ids = _windows(2, 10)
    assert lmhead.supports_chunking(model)
    with torch.no_grad():
        ours = F.linear(lmhead.final_hidden(model, ids), lmhead.head_weight(model))
        theirs = model(ids, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mean_nll_in_token_chunks_equals_the_whole_logits_in_float64(family):
    model = tiny_model(family, hidden=16, layers=2, heads=2).double()
    ids = _windows(4, 12)
    params = [r.parameter for r in arch.linear_layers(model)]
    v = [torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) for p in params]
    out = []
    for chunk_bytes in (10**9, 4 * 320 * 7):  # whole logits; 7-token chunks of the 320-token vocabulary
        with prepared(model, params):
            op = HessianOperator(lambda cb=chunk_bytes: mean_nll(model, ids, 2, chunk_bytes=cb), params)
            out.append((op.loss, op.grad, op.apply(v)))
    (l0, g0, h0), (l1, g1, h1) = out
    assert l1 == pytest.approx(l0, rel=1e-12)
    for a, b in zip(g0 + h0, g1 + h1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---- micro-batched second order -----------------------------------------------------------------------------------


def _exact_setup():
    model = tiny_model("llama", hidden=16, layers=2, heads=2).double()
    ids = _windows(4, 12)
    params = [r.parameter for r in arch.linear_layers(model)]
    g = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, dtype=torch.float64, generator=g) * 0.01 for p in params]
    return model, ids, params, v


def test_accumulated_operator_equals_the_retained_graph_in_float64():
    model, ids, params, v = _exact_setup()
    total = ids.numel() - ids.shape[0]
    with prepared(model, params):
        whole = HessianOperator(lambda: mean_nll(model, ids), params)
        shares = [lambda w=ids[i : i + 1]: mean_nll(model, w) * (w.numel() - 1) / total for i in range(4)]
        acc = AccumulatedHessianOperator(shares, params)
        hv_whole, hv_acc = whole.apply(v), acc.apply(v)
    assert acc.loss == pytest.approx(whole.loss, rel=1e-12)
    assert acc.numel == whole.numel and acc.n_products == 1
    for a, b in zip(whole.grad + hv_whole, acc.grad + hv_acc):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


def test_directional_derivatives_equal_g_dot_v_and_v_h_v_in_float64():
    model, ids, params, v = _exact_setup()
    refs = arch.linear_layers(model)
    with prepared(model, params):
        op = HessianOperator(lambda: mean_nll(model, ids), params)
        g_dot = sum(float((a * b).sum()) for a, b in zip(op.grad, v))
        vhv = sum(float((a * b).sum()) for a, b in zip(op.apply(v), v))
    total = ids.numel() - ids.shape[0]

    def share(w):
        def fn(t):
            with along_direction(refs, v, t):
                return mean_nll(model, w) * (w.numel() - w.shape[0]) / total
        return fn

    with prepared(model, eager=True):
        loss, first, second = directional_derivatives([share(ids[:3]), share(ids[3:])],
                                                      torch.zeros((), dtype=torch.float64))
    assert loss == pytest.approx(op.loss, rel=1e-12)
    assert first == pytest.approx(g_dot, rel=1e-9)
    assert second == pytest.approx(vhv, rel=1e-9)


def test_offset_weights_compute_with_moved_weights_and_never_write_them():
    model = tiny_model("gpt2", hidden=16, layers=2, heads=2)  # Conv1D: offsets in the [in, out] storage layout
    ids = _windows(2, 10)
    refs = arch.linear_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    offsets = [torch.full_like(r.parameter, 0.01) for r in refs]
    moved = tiny_model("gpt2", hidden=16, layers=2, heads=2)
    with torch.no_grad():
        for r, d in zip(arch.linear_layers(moved), offsets):
            r.parameter.add_(d)
        expected = float(mean_nll(moved, ids))
        with offset_weights(refs, offsets.__getitem__):
            got = float(mean_nll(model, ids))
    assert got == expected  # the same elementwise sums: bit for bit
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), offset_weights(refs, offsets.__getitem__):
        model(ids)
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bounded_extract_equals_the_whole_batch_extract_in_float64(family):
    model = tiny_model(family, hidden=16, layers=2, heads=2).double()
    calib = torch.randint(3, 320, (4000,), generator=torch.Generator().manual_seed(0))
    opts = dict(n_windows=4, seq_len=16, n_probes=2, max_iter=3, curvature_windows=2)
    whole = extract(model, Recipe("mxint4"), calib, **opts)
    bounded = extract(model, Recipe("mxint4"), calib, micro_batch=1, logits_chunk_bytes=4 * 320 * 5, **opts)
    for k, v in whole.items():
        if not k.endswith("_seconds"):
            assert bounded[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_noise_traces_equal_quadratic_forms_of_the_float64_input_gram():
    model = tiny_model("opt", hidden=16, layers=2, heads=2).double()
    windows = feature_windows(model, _windows(4, 16), 4, 16)
    recipe = Recipe("int4")
    ctx = Context(model, recipe, windows, 0, ExtractOptions(), ("noise",))
    traces = ctx.calib_stats.traces
    inputs: dict[str, list[torch.Tensor]] = {r.name: [] for r in ctx.refs}
    handles = [r.module.register_forward_pre_hook(lambda _m, a, n=r.name: inputs[n].append(a[0].reshape(
        -1, a[0].shape[-1]))) for r in ctx.refs]
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    for ref, d in zip(ctx.refs, rtn_deltas(model, ctx.refs, recipe)):
        x = torch.cat(inputs[ref.name])
        h = 2.0 / x.shape[0] * x.T @ x  # float64 throughout: an independent reference
        w = ref.weight.detach()
        assert traces[ref.name][0] == pytest.approx(float(((w @ h) * w).sum()), rel=1e-12)
        assert traces[ref.name][1] == pytest.approx(float(((d @ h) * d).sum()), rel=1e-12)


def test_the_budget_sets_the_micro_batch():
    from transformers import LlamaConfig, LlamaForCausalLM

    # SmolLM2-135M's shape on the meta device: ~2.4 GB of double-backward graph per 256-token window
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        smol = LlamaForCausalLM(cfg)
    per = graph_bytes_per_window(smol, 256)
    assert 1.5e9 < per < 4e9
    model = tiny_model("llama", hidden=64, layers=2, heads=2)
    windows = _windows(8, 128)
    assert Context(model, Recipe("mxint4"), windows, 0, ExtractOptions()).whole_graph()  # a zoo-sized model
    small = ExtractOptions(max_memory=2 * graph_bytes_per_window(model, 128) + 1)
    assert Context(model, Recipe("mxint4"), windows, 0, small).micro_batch(8) == 2
    assert Context(model, Recipe("mxint4"), windows, 0, ExtractOptions(micro_batch=3)).micro_batch(8) == 3


# ---- the zoo: today's values, and the bounded paths in float32 -----------------------------------------------------


def _require_zoo(name: str = "llama-s") -> None:
    from quantpredict.models import zoo_root

    if not (zoo_root() / name / "model.safetensors").exists():
        pytest.skip(f"needs the zoo model {name} (data/zoo/{name}); a tree without the zoo weights skips it")


@pytest.fixture(scope="module")
def zoo_reference():
    from quantpredict import models

    _require_zoo()
    spec = json.loads(REFERENCE.read_text())
    model, tok = models.load(spec["model"], attn_implementation="eager")
    import importlib.util

    loader = importlib.util.spec_from_file_location("make_features_reference",
                                                    REFERENCE.parent / "make_features_reference.py")
    maker = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(maker)
    return model, maker.reference_windows(tok), spec["features"]


def _recipe(label: str) -> Recipe:
    fmt, method = label.split("-")
    return Recipe(weight_format=fmt, method=method)


# Recorded features and float32. The reference was recorded on another CPU (AMD EPYC, one thread); today's float32
# sums run in another order (vector width, BLAS blocking, threads), so a feature can only be asked to agree within what
# float32 rounding leaves of it. Error model: a quantity computed in float32 is off from its exact value by at most
# K roundings of size u * S, where u = 2^-23 (float32 epsilon) and S is its scale before cancellation (the magnitude
# of what the computation subtracts or sums away: for a difference of two NLLs, both NLLs). Two machines differ by at
# most 2 K u S. K = 4: against a float64 recomputation on an Intel Xeon (AVX-512) every feature's float32 error was
# at most 0.9 u S, the standard error's 1.7 u S in its own model below (measured for mxint4 RTN and GPTQ; the AMD
# reference's errors were of the same size, at most 0.9 u S).
#
#  feature                          S                                        why
#  fp_calib_nll                     NLL                                      a float32 mean of positive token NLLs
#  radial_dnll_*, sharpness_random  2 NLL                                    NLL(moved) - NLL(FP): the error of both
#                                                                            NLLs stays, the difference is ~1e-4 NLL
#                                                                            (relative tolerance 4 K u NLL / |D|)
#  grad_dot_delta                   mean_t |d l_t / dt|                      g.delta sums per-token directional
#                                                                            derivatives that cancel: their mean
#                                                                            absolute value, computed here (jvp)
#  quad_delta_h_delta               GN + |quad - GN|, GN = 1/2 mean_t dz^T   the Gauss-Newton part (a sum of
#                                   (diag p - p p^T) dz, computed here       squares) and the rest that adds to it
#  taylor_dnll                      the two above, summed
#  hessian_trace (per_param, x      |tr| + (n - 1) se                        every probe's v^T H v is within (n - 1)
#    noise_var: the same relative)                                           se of the mean (Samuelson)
#  hessian_trace_se                 (|tr| + (n - 1) se) / sqrt(n - 1)        a sample s.d. moves by at most the
#                                                                            largest probe error / sqrt(n - 1)
#  hessian_trace_max_block_share    (|tr| + (n - 1) se) (1 + share) / |tr|   a ratio of two such means
#  top_eigenvalue                   max_iter |lambda|                        each power-iteration product adds its
#                                                                            rounding to the iterate
#  gptq_proxy_*                     2 |proxy|                                ||X dW^T||^2: the activations X twice
#  out_sqnr_db_*                    4 * 10 / ln 10 (dB per relative error)   a ratio of two ||X W^T||^2
# The weight-only features (rtn_*) are float64 sums over N bitwise-equal elementwise roundings: 2 N eps_f64 per sum.
# Counts, sizes and the worst layer's depth are exact.
# GPTQ's direction is not a smooth function of the rounding: its error feedback rounds each weight to one of two grid
# points, and on another CPU a near-tie goes the other way (under ATEN_CPU_CAPABILITY=avx2 with 2 threads 5 of the
# 331,776 weights moved by one grid step: 0.9% of ||delta||). The features along that direction then move by more
# than rounding: g.delta by 0.7%, taylor_dnll by 1.2%, quad by 0.02%, ||delta||^2 by 0.004%. Those features of a GPTQ
# recipe get GPTQ_FLIP relative on top, four times the largest move measured. (RTN's direction is elementwise: the
# same bits everywhere.) Not covered: the power iteration stopping one product earlier or later (not seen).
F32_ROUNDINGS = 4  # K above
GPTQ_FLIP = 0.05
ALONG_DELTA = ("grad_dot_delta", "quad_delta_h_delta", "taylor_dnll", "radial_dnll_025", "radial_dnll_050",
               "radial_dnll_100", "sharpness_random", "trace_x_noise_var")
EXACT_FEATURES = ("bits_per_element", "block_size", "element_is_fp", "hidden_size", "n_layers", "n_params_nonembed",
                  "out_sqnr_worst_depth")


def directional_scales(model, recipe: Recipe, windows: torch.Tensor) -> tuple[float, float]:
    """``(mean_t |d l_t/dt|, GN)`` along the recipe's direction ``W + t delta`` at ``t = 0``: the per-token first
    derivatives of the NLL and the Gauss-Newton half of the second (``1/2 mean_t dz^T (diag p - p p^T) dz``), from one
    float32 Jacobian-vector product per window (their sizes, not their values, enter the tolerances)."""
    from torch.func import functional_call, jvp

    ctx = Context(model, recipe, windows, 0, ExtractOptions(), ("landscape",))
    names = {id(p): n for n, p in model.named_parameters()}
    primals = {names[id(r.parameter)]: r.parameter.detach() for r in ctx.refs}
    tangents = {names[id(r.parameter)]: d.contiguous() for r, d in zip(ctx.refs, ctx.param_layout(ctx.delta))}
    first = gn = 0.0
    with torch.no_grad(), prepared(model, eager=True):
        for ids in windows.split(1):
            def logits(weights, ids=ids):
                return functional_call(model, weights, args=(), kwargs={"input_ids": ids, "use_cache": False}
                                       ).logits[:, :-1]

            z, dz = jvp(logits, (primals,), (tangents,))
            p, dz = torch.softmax(z.double(), -1), dz.double()
            mean = (p * dz).sum(-1)
            first += float((mean - dz.gather(-1, ids[:, 1:, None]).squeeze(-1)).abs().sum())
            gn += float(((p * dz * dz).sum(-1) - mean * mean).sum())
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return first / tokens, 0.5 * gn / tokens


def recorded_tolerances(ref: dict[str, float], first: float, gn: float, gptq: bool = False) -> dict[str, float]:
    """Absolute tolerance of every recorded feature against today's (0: exact), by the error model above (the
    reference was extracted with the default options: their probe and power-iteration counts); ``gptq``: the
    direction is GPTQ's, whose rounding ties may go the other way."""
    opts = ExtractOptions()
    u, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    two_machines = 2 * F32_ROUNDINGS * u
    nll, trace, se, n = ref["fp_calib_nll"], abs(ref["hessian_trace"]), ref["hessian_trace_se"], opts.n_probes
    probe = trace + (n - 1) * se
    quad = ref["quad_delta_h_delta"]
    s_quad = gn + abs(quad - gn)
    db = 10 / math.log(10)
    scale = {
        "fp_calib_nll": nll,
        "radial_dnll_025": 2 * nll, "radial_dnll_050": 2 * nll, "radial_dnll_100": 2 * nll,
        "sharpness_random": 2 * nll,
        "grad_dot_delta": first,
        "quad_delta_h_delta": s_quad,
        "taylor_dnll": first + s_quad,
        "hessian_trace": probe,
        "hessian_trace_per_param": probe * abs(ref["hessian_trace_per_param"]) / trace,
        "trace_x_noise_var": probe * abs(ref["trace_x_noise_var"]) / trace,
        "hessian_trace_se": probe / math.sqrt(n - 1),
        "hessian_trace_max_block_share": probe * (1 + ref["hessian_trace_max_block_share"]) / trace,
        "top_eigenvalue": opts.max_iter * abs(ref["top_eigenvalue"]),
        "gptq_proxy_rtn": 2 * abs(ref["gptq_proxy_rtn"]), "gptq_proxy_gptq": 2 * abs(ref["gptq_proxy_gptq"]),
        "out_sqnr_db_mean": 4 * db, "out_sqnr_db_min": 4 * db,
    }
    tol = {k: two_machines * s for k, s in scale.items()}
    f64_sum = 2 * ref["n_params_nonembed"] * eps64  # two machines' float64 sums of N terms, relative
    tol |= {"rtn_sqnr_db": 2 * f64_sum * db, "rtn_sqnr_db_min": 2 * f64_sum * db,  # a ratio of two sums, in dB
            "rtn_rel_weight_error": f64_sum * ref["rtn_rel_weight_error"]}  # the square root of that ratio
    tol |= {k: 0.0 for k in EXACT_FEATURES}
    if gptq:
        tol |= {k: tol[k] + GPTQ_FLIP * abs(ref[k]) for k in ALONG_DELTA}
    assert set(tol) == set(ref), set(ref) ^ set(tol)  # every recorded feature has its derived tolerance
    return tol


@pytest.fixture(scope="module")
def zoo_whole(zoo_reference):
    """Today's features by the default (whole-batch) path, computed once per label and shared by the tests below."""
    model, windows, _ = zoo_reference
    cache: dict[str, dict[str, float]] = {}

    def features(label: str) -> dict[str, float]:
        if label not in cache:
            cache[label] = extract(model, _recipe(label), windows)
        return cache[label]

    return features


@pytest.mark.recorded
@pytest.mark.parametrize("label", ["mxint4-rtn", "mxint4-gptq"])
def test_zoo_features_equal_the_recorded_within_float32_rounding(zoo_reference, zoo_whole, label):
    """Every feature as the code computed it before the bounded-memory paths (tests/data/features_reference.json),
    within the tolerance its float32 conditioning allows (derived above, printed on failure)."""
    model, windows, reference = zoo_reference
    out = zoo_whole(label)
    recipe = _recipe(label)
    scales = directional_scales(model, recipe, windows)
    tol = recorded_tolerances(reference[label], *scales, gptq=recipe.method == "gptq")
    bad = [f"{k}: today {out[k]!r}, recorded {v!r}, |difference| {abs(out[k] - v):.3g} > tolerance {tol[k]:.3g}"
           for k, v in reference[label].items() if (out[k] != v if tol[k] == 0.0 else abs(out[k] - v) > tol[k])]
    assert not bad, "\n".join(bad)


LOSS_DIFFERENCES = ("radial_dnll_025", "radial_dnll_050", "radial_dnll_100", "sharpness_random")


@pytest.mark.parametrize("label", ["mxint4-rtn", "mxint4-gptq"])
def test_zoo_bounded_paths_equal_the_whole_batch_within_1e_5(zoo_reference, zoo_whole, label):
    """Micro-batches of one window and a head chunked into 16-token blocks against the whole-batch path computed in
    this run, float32. Loss differences (NLL at a moved point minus the FP NLL) are compared at 4 float32 units in
    the last place of the NLL they are differences of: the whole path's own float32 sums are no finer than that."""
    model, windows, _ = zoo_reference
    whole = zoo_whole(label)
    out = extract(model, _recipe(label), windows, micro_batch=1, logits_chunk_bytes=16 * 4096 * 4)
    ulp = torch.finfo(torch.float32).eps * whole["fp_calib_nll"]
    for k, v in whole.items():
        if k.endswith("_seconds"):
            continue
        if k in LOSS_DIFFERENCES:
            assert out[k] == pytest.approx(v, abs=4 * ulp), k
        else:
            assert out[k] == pytest.approx(v, rel=1e-5, abs=1e-12), k


# ---- budgets, devices, dtypes ------------------------------------------------------------------------------------


def test_parse_bytes_reads_units_and_rejects_nonsense():
    assert parse_bytes("6GiB") == 6 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes(2e9) == 2 * 10**9
    assert parse_bytes(None) > 2**30
    for bad in ("six gigs", "12 parsecs", "0.1KB", True):
        with pytest.raises(ResourceError, match="max_memory"):
            parse_bytes(bad)


def test_resolve_device_and_dtype():
    assert resolve_device(None) == torch.device("cpu") == resolve_device("cpu")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp32") is torch.float32
    assert resolve_dtype(None) is None
    with pytest.raises(ResourceError, match="--dtype"):
        resolve_dtype("int8", flag="--dtype")
    with pytest.raises(DeviceError, match="--device"):
        resolve_device("warp-drive", flag="--device")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"--device cuda: CUDA is not available.*available: cpu"):
            resolve_device("cuda", flag="--device")


def test_logits_chunk_tokens():
    assert logits_chunk_tokens(49152) == 341  # 64 MiB of float32 rows
    assert logits_chunk_tokens(10**9) == 1


# ---- evaluation streamed in token chunks ---------------------------------------------------------------------------


def _rtn_copy(model, fmt: str = "int4"):
    import copy

    from quantpredict.quantize import quantize_model

    q = copy.deepcopy(model)
    quantize_model(q, Recipe(fmt), torch.zeros(1, 8, dtype=torch.long), progress=False)
    return q


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_scoring_in_token_chunks_equals_the_whole_logits(family):
    from quantpredict.evaluate import FPLogitsCache, Windows
    from quantpredict.evaluate.scoring import nll_sums, pair_sums

    model = tiny_model(family, hidden=16, layers=2, heads=2)  # scoring is float32 by design: so is the test
    q = _rtn_copy(model)
    ids = _windows(5, 20)
    windows = Windows(ids, torch.tensor([1, 1, 4, 1, 7]))
    small = 4 * 320 * 6  # 6-token chunks of the 320-token vocabulary
    torch.testing.assert_close(nll_sums(model, windows, batch_size=2, chunk_bytes=small),
                               nll_sums(model, windows, batch_size=2), rtol=1e-6, atol=0)
    whole = pair_sums(model, q, windows, batch_size=2)
    cache = FPLogitsCache()
    for _ in range(2):  # the second pass takes the FP hidden states from the cache
        chunked = pair_sums(model, q, windows, batch_size=2, chunk_bytes=small, fp_cache=cache, fp_key="m")
        for k in whole:
            torch.testing.assert_close(chunked[k], whole[k], rtol=1e-5, atol=1e-7)
    assert cache.hits == 3 and cache.entry[-1] == "hidden"
    assert all(t.shape[-1] == 16 for t in cache.logits.values())  # hidden states, not logits


def test_zoo_comparison_in_head_chunks_equals_the_whole_logits_within_1e_5(zoo_calibration):
    """llama-s, float32, 8 windows: the head in 100-token chunks (as SmolLM2's 49k vocabulary runs it) against the
    whole logits, for the perplexity and every comparison statistic."""
    from quantpredict.evaluate import make_windows
    from quantpredict.evaluate.scoring import nll_sums, pair_sums

    model, _, ids = zoo_calibration
    q = _rtn_copy(model, "mxint4")
    windows = make_windows(ids, 256, max_windows=8)
    small = 100 * 4096 * 4
    torch.testing.assert_close(nll_sums(model, windows, chunk_bytes=small), nll_sums(model, windows),
                               rtol=1e-5, atol=0)
    whole, chunked = pair_sums(model, q, windows), pair_sums(model, q, windows, chunk_bytes=small)
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-5, atol=1e-6)


def test_bf16_evaluation_tracks_float32_on_a_zoo_model():
    """bf16 forward passes (head, softmax and sums in float32/float64) on llama-s against float32: the perplexity
    within 1e-3 nats and the quantization's delta NLL within 10% (measured: 6e-5 nats and 1.6%)."""
    from quantpredict import evaluate, models

    _require_zoo()
    fp32, tok = models.load("llama-s")
    bf16, _ = models.load("llama-s", dtype="bf16")
    assert next(bf16.parameters()).dtype is torch.bfloat16
    a = evaluate.perplexity(fp32, tok, max_windows=8, progress=False)
    b = evaluate.perplexity(bf16, tok, max_windows=8, progress=False)
    assert abs(a.nll - b.nll) < 1e-3
    c32 = evaluate.compare(fp32, _rtn_copy(fp32, "mxint4"), tok, max_windows=8, progress=False)
    c16 = evaluate.compare(bf16, _rtn_copy(bf16, "mxint4"), tok, max_windows=8, progress=False)
    assert c16.delta_nll == pytest.approx(c32.delta_nll, rel=0.10)
    assert c16.kld == pytest.approx(c32.kld, rel=0.10)


def test_evaluation_device_argument_and_its_error():
    from quantpredict import evaluate

    model = tiny_model("llama", hidden=16, layers=1, heads=2)
    windows = evaluate.Windows(_windows(3, 12), torch.ones(3, dtype=torch.long))
    from quantpredict.evaluate.perplexity import perplexity_of_windows

    cpu = perplexity_of_windows(model, windows, progress=False)
    from quantpredict.memory import placed

    with placed([model], "cpu"):
        again = perplexity_of_windows(model, windows, progress=False)
    assert again.nll == cpu.nll
    with pytest.raises(DeviceError, match="device"):
        with placed([model], "cuda:7" if torch.cuda.is_available() else "cuda"):
            pass


# ---- calibration block by block within a budget ------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_calibration():
    from quantpredict import models
    from quantpredict.data import load_text

    _require_zoo()
    model, tok = models.load("llama-s")
    ids = torch.tensor(tok(load_text("wikitext2", "train")[:120_000], add_special_tokens=False)["input_ids"])
    return model, tok, ids


def _gptq(model, ids, **kwargs):
    import copy

    from quantpredict.quantize import quantize_model

    q = copy.deepcopy(model)
    report = quantize_model(q, Recipe("mxint4", method="gptq", calib_samples=16), ids, progress=False, **kwargs)
    return q, report


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_spilled_block_inputs_give_the_same_gptq_model(zoo_calibration, monkeypatch):
    from quantpredict.quantize import offload

    model, _, ids = zoo_calibration
    whole, _ = _gptq(model, ids)
    stores = []
    real = offload.ActivationStore.__init__

    def spy(self, on_disk=False, directory=None):
        real(self, on_disk, directory)
        stores.append(self)

    monkeypatch.setattr(offload.ActivationStore, "__init__", spy)
    spilled, _ = _gptq(model, ids, max_memory="1MiB", device="cpu")
    assert stores and all(s.on_disk for s in stores)
    assert all(not s.directory.exists() for s in stores)  # the files and directories are gone
    assert _same_weights(whole, spilled)


def test_a_bf16_model_calibrated_in_float32_one_block_at_a_time(zoo_calibration):
    """The bf16 model stays bf16; each block is upcast for its forward passes. For MXINT4 (its grid is exact in
    bf16) the result is bit for bit the float32 model's GPTQ cast to bf16."""
    model, _, ids = zoo_calibration
    bf16 = __import__("copy").deepcopy(model).to(torch.bfloat16)
    blockwise, _ = _gptq(bf16, ids, dtype="fp32")
    assert next(blockwise.parameters()).dtype is torch.bfloat16
    reference, _ = _gptq(bf16.float(), ids)
    assert _same_weights(blockwise, reference.to(torch.bfloat16))


def test_bf16_calibration_of_a_float32_model_tracks_float32(zoo_calibration):
    """bf16 block forward passes (Hessians and GPTQ in float32/64): a few rounding decisions move (measured 1.1% of
    the weights), the quantized model's loss does not (within its paired standard error)."""
    from quantpredict import evaluate

    model, tok, ids = zoo_calibration
    q32, _ = _gptq(model, ids)
    q16, _ = _gptq(model, ids, dtype="bf16")
    assert next(q16.parameters()).dtype is torch.float32
    changed = sum(int((a != b).sum()) for a, b in zip(q32.state_dict().values(), q16.state_dict().values()))
    assert 0 < changed < 0.05 * sum(p.numel() for p in model.parameters())
    c32 = evaluate.compare(model, q32, tok, max_windows=16, progress=False)
    c16 = evaluate.compare(model, q16, tok, max_windows=16, progress=False)
    assert abs(c16.delta_nll - c32.delta_nll) < 2 * c32.delta_nll_se


def test_quantize_rejects_an_unavailable_device(zoo_calibration):
    model, _, ids = zoo_calibration
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="device cuda: CUDA is not available"):
        _gptq(model, ids, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU paths are tested above)")
def test_cuda_calibration_evaluation_and_features_match_cpu():
    """On a GPU: GPTQ with blocks computed there, the comparison and the features equal the CPU's within float
    tolerance (a tiny seeded model: no zoo weights needed; benchmarks/gpu_check.py checks more)."""
    from quantpredict import evaluate

    model = tiny_model("llama", hidden=64, layers=2, heads=4)
    ids = _windows(16, 64)
    cpu, _ = _gptq(model, ids)
    gpu, _ = _gptq(model, ids, device="cuda")  # blocks copied to the GPU one at a time
    changed = sum(int((a != b).sum()) for a, b in zip(cpu.state_dict().values(), gpu.state_dict().values()))
    assert changed < 0.01 * sum(p.numel() for p in model.parameters())  # rounding ties may flip on another device
    windows = evaluate.Windows(ids[:8], torch.ones(8, dtype=torch.long))
    c_cpu = evaluate.compare_windows(model, cpu, windows, progress=False)
    with __import__("quantpredict.memory", fromlist=["placed"]).placed([model, cpu], "cuda"):
        c_gpu = evaluate.compare_windows(model, cpu, windows, progress=False)
    assert c_gpu.delta_nll == pytest.approx(c_cpu.delta_nll, rel=1e-3, abs=1e-5)
    assert next(model.parameters()).device.type == "cpu"  # moved back
    f_cpu = extract(model, Recipe("mxint4"), ids, which="model,noise,landscape", micro_batch=2)
    f_gpu = extract(model, Recipe("mxint4"), ids, which="model,noise,landscape", micro_batch=2, device="cuda")
    for k in ("fp_calib_nll", "out_sqnr_db_mean", "grad_dot_delta", "quad_delta_h_delta"):
        assert f_gpu[k] == pytest.approx(f_cpu[k], rel=1e-3), k


# ---- the command line: --device, --dtype, --max-memory ------------------------------------------------------------


NO_CUDA = not torch.cuda.is_available()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: the error path cannot be reached")
@pytest.mark.parametrize("argv", [
    ["eval", "{dir}"],
    ["eval", "{dir}", "--against", "{dir}", "--dtype", "bf16"],
    ["quantize", "{dir}", "--format", "mxint4", "--out", "{tmp}/q"],
    ["features", "{dir}", "--format", "mxint4"],
    ["predict", "{dir}", "--format", "mxint4"],
    ["qat", "{dir}", "--format", "mxint4", "--out", "{tmp}/q"],
    ["demo", "--model", "{dir}"],
    ["study", "ptq-vs-qat", "--models", "{dir}", "--out", "{tmp}/s"],
    ["collect", "--models", "{dir}", "--formats", "mxint4", "--methods", "rtn", "--store", "{tmp}/s.sqlite"],
])
def test_every_model_command_refuses_an_unavailable_device_with_one_message(argv, tiny_hf_dir, tmp_path, capsys):
    from quantpredict.cli import main

    argv = [a.format(dir=tiny_hf_dir, tmp=tmp_path) for a in argv] + ["--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--device cuda: CUDA is not available" in err and "available: cpu" in err
    assert len(err.splitlines()) == 1


def test_cli_device_cpu_dtype_and_max_memory(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    from quantpredict import data
    from quantpredict.cli import main

    calib = torch.randint(3, 320, (6000,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(data, "token_ids", lambda tok, name, split: calib.clone())
    assert main(["eval", str(tiny_hf_dir), "--max-windows", "3", "--seq-len", "32", "--device", "cpu",
                 "--dtype", "bf16", "--json"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tiny_hf_dir), "--max-windows", "3", "--seq-len", "32", "--device", "cpu",
                 "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert bf16["nll"] == pytest.approx(fp32["nll"], abs=0.05)
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_hf_dir), "--format", "mxint4", "--calib-samples", "4", "--calib-seq-len", "32",
                 "--device", "cpu", "--dtype", "bf16", "--max-memory", "1MiB", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    assert (out / "model.safetensors").exists()
    assert main(["features", str(tiny_hf_dir), "--format", "mxint4", "--which", "landscape", "--n-windows", "2",
                 "--seq-len", "32", "--device", "cpu", "--max-memory", "1MiB", "--json"]) == 0
    assert "grad_dot_delta" in json.loads(capsys.readouterr().out)["features"]
    assert main(["quantize", str(tiny_hf_dir), "--format", "mxint4", "--max-memory", "lots", "--out", str(out)]) == 2
    assert "--max-memory" in capsys.readouterr().err


def test_a_bf16_model_is_measured_in_float32_and_left_bf16():
    """Features of a bf16 model are those of its stored weights measured in float32, with the MXINT4 direction kept
    in bf16 (exact there): equal to the features of a float32 copy, and the model is bitwise as it was."""
    import copy

    model = tiny_model("llama", hidden=16, layers=2, heads=2).to(torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    calib = torch.randint(3, 320, (4000,), generator=torch.Generator().manual_seed(0))
    opts = dict(n_windows=4, seq_len=16, n_probes=2, max_iter=3)
    for extra in ({}, {"micro_batch": 1}):
        ours = extract(model, Recipe("mxint4"), calib, **opts, **extra)
        theirs = extract(copy.deepcopy(model).float(), Recipe("mxint4"), calib, **opts, **extra)
        for k, v in theirs.items():
            if not k.endswith("_seconds"):
                assert ours[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (extra, k)
    assert all(p.dtype is torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    refs = arch.linear_layers(model)
    deltas = rtn_deltas(model.float(), refs, Recipe("mxint4"), compact=torch.bfloat16)
    assert all(d.dtype is torch.bfloat16 for d in deltas)  # MXINT4 of bf16 weights: exact in bf16


def test_gpu_check_script_cpu_fallback(capsys):
    """benchmarks/gpu_check.py is run by hand on a GPU machine; here its CPU fallback runs every check (small model,
    no pytest runs) and refuses CUDA cleanly where there is none."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    checks = gpu_check.run_checks("cpu", hidden=32, layers=2, vocab=1024, pytests=False)
    assert len(checks.rows) == 14 and checks.failed == 0
    if NO_CUDA:
        assert gpu_check.main(["--no-pytest"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_every_zoo_model_keeps_the_whole_batch_graph_under_the_default_budget():
    """The shipped runs' features were computed with one graph over the 8 calibration windows: under the default
    max_memory every zoo model must still take that path (so its features reproduce, see the recorded test above)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantpredict.memory import DEFAULT_MAX_MEMORY
    from quantpredict.models import list_zoo, resolve

    names = list_zoo()
    if not names:
        pytest.skip("no zoo models on disk")
    for name in names:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve(name)))
        assert 8 * graph_bytes_per_window(model, 256) <= DEFAULT_MAX_MEMORY, name
