"""Loss-landscape features: the Hessian estimators against exact Hessians, and extract() end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import FAMILIES, tiny_model
from torch.func import functional_call

from quantpredict import arch
from quantpredict.errors import ModelError
from quantpredict.features import (
    FEATURE_NAMES,
    FEATURES,
    GROUPS,
    TIMING_NAMES,
    HessianOperator,
    extract,
    feature_table_markdown,
    hutchinson_trace,
    hvp,
    mean_nll,
    parse_which,
    top_eigenvalue,
)
from quantpredict.quantize import Recipe

FAST = dict(n_windows=2, seq_len=24, n_probes=2, max_iter=3, n_noise_draws=1)


# ---- hand-made quadratics: exact answers without any reference implementation --------------------------------------


def _quadratic(diag: list[float]):
    """loss(x, y) = 0.5 sum_i a_i x_i^2 + x_0 * y (a cross term between two tensors), H known in closed form."""
    x = torch.ones(len(diag), dtype=torch.float64, requires_grad=True)
    y = torch.ones(1, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(diag, dtype=torch.float64)

    def loss_fn():
        return 0.5 * (a * x * x).sum() + x[0] * y[0]

    h = torch.zeros(len(diag) + 1, len(diag) + 1, dtype=torch.float64)
    h[: len(diag), : len(diag)] = torch.diag(a)
    h[0, -1] = h[-1, 0] = 1.0
    return loss_fn, [x, y], h


def test_hvp_of_a_known_quadratic():
    loss_fn, params, h = _quadratic([3.0, -1.0, 2.0])
    v = [torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)]
    hv = hvp(loss_fn, params, v)
    expected = h @ torch.cat(v)
    torch.testing.assert_close(torch.cat(hv), expected, rtol=0, atol=1e-12)


def test_hutchinson_is_exact_on_a_diagonal_hessian():
    # Rademacher probes have v_i^2 = 1, so v^T D v = tr(D) for every probe: zero variance
    loss_fn, params, _ = _quadratic([3.0, -1.0, 2.0, 5.0])
    mean, se = hutchinson_trace(loss_fn, params[:1], n_probes=5, seed=0)
    assert mean == pytest.approx(9.0, abs=1e-12)
    assert se == pytest.approx(0.0, abs=1e-12)


def test_power_iteration_returns_the_dominant_eigenvalue_with_its_sign():
    loss_fn, params, h = _quadratic([5.0, 1.0, 0.5])
    top = float(torch.linalg.eigvalsh(h)[-1])
    assert top_eigenvalue(loss_fn, params, tol=1e-10, max_iter=500) == pytest.approx(top, rel=1e-6)
    # a negative eigenvalue larger in magnitude than every positive one is what power iteration finds (documented)
    loss_fn, params, h = _quadratic([-6.0, 1.0, 0.5])
    ev = torch.linalg.eigvalsh(h)
    dominant = float(ev[ev.abs().argmax()])
    assert dominant < 0
    assert top_eigenvalue(loss_fn, params, tol=1e-10, max_iter=500) == pytest.approx(dominant, rel=1e-6)


def test_building_blocks_reject_bad_input():
    loss_fn, params, _ = _quadratic([1.0, 2.0])
    with pytest.raises(ValueError, match="n_probes"):
        hutchinson_trace(loss_fn, params, n_probes=1)
    with pytest.raises(ValueError, match="requires_grad"):
        hvp(loss_fn, [torch.ones(2)], [torch.ones(2)])
    with pytest.raises(ValueError, match="empty"):
        hvp(loss_fn, [], [])


# ---- a tiny Llama whose Hessian over a parameter subset fits in memory ------------------------------------------


@pytest.fixture(scope="module")
def exact():
    """A 1-layer hidden-8 Llama in float64, trained a few steps towards a minimum of its batch (so the Hessian is
    nearly PSD and its top eigenvalue is the dominant one), with the exact Hessian over three weight matrices."""
    model = tiny_model("llama", hidden=8, layers=1, heads=2).double()
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):
        opt.zero_grad()
        mean_nll(model, ids).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
             "model.layers.0.mlp.down_proj.weight"]
    named = dict(model.named_parameters())
    params = [named[n] for n in names]

    def flat_loss(flat):
        parts = torch.split(flat, [p.numel() for p in params])
        return mean_nll_functional(model, {n: t.view(p.shape) for n, t, p in zip(names, parts, params)}, ids)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    h = torch.autograd.functional.hessian(flat_loss, flat)
    return model, ids, params, h


def mean_nll_functional(model, overrides, ids):
    logits = functional_call(model, overrides, (ids,), {"use_cache": False}).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_hutchinson_within_three_standard_errors_of_the_exact_trace(exact):
    model, ids, params, h = exact
    mean, se = hutchinson_trace(lambda: mean_nll(model, ids), params, n_probes=64, seed=0)
    trace = float(h.trace())
    assert se > 0
    assert abs(mean - trace) < 3 * se, (mean, se, trace)


def test_power_iteration_within_one_percent_of_eigvalsh(exact):
    model, ids, params, h = exact
    ev = torch.linalg.eigvalsh(h)
    assert ev[-1] > ev[0].abs(), "the fixture must make the largest eigenvalue the dominant one"
    est = top_eigenvalue(lambda: mean_nll(model, ids), params, tol=1e-6, max_iter=500)
    assert est == pytest.approx(float(ev[-1]), rel=1e-2)


def test_quadratic_form_matches_the_exact_hessian(exact):
    model, ids, params, h = exact
    g = torch.Generator().manual_seed(1)
    delta = [torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.01 for p in params]
    hd = hvp(lambda: mean_nll(model, ids), params, delta)
    d = torch.cat([x.reshape(-1) for x in delta])
    ours = 0.5 * sum(float((a * b).sum()) for a, b in zip(delta, hd))
    assert ours == pytest.approx(float(0.5 * d @ h @ d), rel=1e-6)
    torch.testing.assert_close(torch.cat([x.reshape(-1) for x in hd]), h @ d, rtol=1e-6, atol=1e-10)


def test_operator_shares_one_graph_and_reports_loss_and_gradient(exact):
    model, ids, params, _ = exact
    op = HessianOperator(lambda: mean_nll(model, ids), params)
    grads = torch.autograd.grad(mean_nll(model, ids), params)
    with torch.no_grad():
        assert op.loss == pytest.approx(float(mean_nll(model, ids)))
    for a, b in zip(op.grad, grads):
        torch.testing.assert_close(a, b)
    v = [torch.ones_like(p) for p in params]
    first, second = op.apply(v), op.apply(v)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert op.n_products == 2


# ---- extract ---------------------------------------------------------------------------------------------------------


def _calib(n: int = 4000) -> torch.Tensor:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(0))


def _finite_and_complete(out: dict[str, float], groups=GROUPS) -> None:
    expected = {f.name for f in FEATURES if f.group in groups} | {f"{g}_seconds" for g in groups}
    assert set(out) == expected
    bad = {k: v for k, v in out.items() if not math.isfinite(v)}
    assert not bad


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_every_family_all_groups(family):
    model = tiny_model(family, hidden=16, layers=2, heads=2)
    out = extract(model, Recipe("mxint4"), _calib(), **FAST)
    _finite_and_complete(out)
    assert out["n_layers"] == 2 and out["hidden_size"] == 16
    assert out["n_params_nonembed"] == arch.non_embedding_parameters(model)
    # 4 bits + an 8-bit scale per block of 32 along each row; a row shorter than 32 still pays a whole scale
    sizes = [(r.weight.numel(), r.in_features) for r in arch.linear_layers(model)]
    expected = sum(n * (4 + 8 * math.ceil(k / 32) / k) for n, k in sizes) / sum(n for n, _ in sizes)
    assert out["bits_per_element"] == pytest.approx(expected)
    assert out["element_is_fp"] == 0.0 and out["block_size"] == 32
    assert out["taylor_dnll"] == pytest.approx(out["grad_dot_delta"] + out["quad_delta_h_delta"])
    assert out["gptq_proxy_gptq"] <= out["gptq_proxy_rtn"] * 1.0001  # GPTQ minimises exactly this objective


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "int4", "fp8_e4m3", "mxint8", "bf16"])
def test_extract_formats_are_finite_and_ordered_by_bits(fmt):
    model = tiny_model("llama", hidden=16, layers=1, heads=2)
    which = ("format", "noise")
    out = extract(model, Recipe(fmt), _calib(), which=which, **FAST)
    _finite_and_complete(out, which)
    assert out["element_is_fp"] == (0.0 if "int" in fmt else 1.0)
    # about 6 dB of SQNR per bit of precision (a generous band: scales and grids differ); bf16 keeps 8 significant
    # bits (7 stored + the implicit one), so it counts as 8, not as its 16 storage bits
    bits = {"mxfp4_e2m1": 4, "int4": 4, "fp8_e4m3": 8, "mxint8": 8, "bf16": 8}[fmt]
    assert 3.5 * bits < out["rtn_sqnr_db"] < 7.5 * bits
    assert out["rtn_sqnr_db_min"] <= out["rtn_sqnr_db"] + 1e-9
    assert out["out_sqnr_db_min"] <= out["out_sqnr_db_mean"]


def test_noise_features_against_a_direct_computation():
    from quantpredict.formats import fake_quantize

    model = tiny_model("gpt2", hidden=16, layers=2, heads=2)
    out = extract(model, Recipe("int4"), _calib(), which="noise", **FAST)
    w2 = d2 = 0.0
    for ref in arch.linear_layers(model):  # GPT-2's Conv1D seen as [out, in]: per-channel scales along `in`
        w = ref.weight.detach().double()
        d = fake_quantize(ref.weight.detach(), "int4", axis=-1).double() - w
        w2, d2 = w2 + float((w * w).sum()), d2 + float((d * d).sum())
    assert out["rtn_sqnr_db"] == pytest.approx(10 * math.log10(w2 / d2), rel=1e-5)
    assert out["rtn_rel_weight_error"] == pytest.approx(math.sqrt(d2 / w2), rel=1e-5)


def test_landscape_terms_match_the_exact_hessian_and_the_radial_profile():
    """In float64, extract's quadratic term equals 0.5 delta^T H delta with the exact Hessian over every linear
    weight, and its Taylor terms predict the measured loss along the ray for small t."""
    model = tiny_model("llama", hidden=8, layers=1, heads=2).double()
    windows = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    recipe = Recipe("mxint4")
    out = extract(model, recipe, windows, which="landscape", n_noise_draws=1)

    refs = arch.linear_layers(model)
    from quantpredict.formats import fake_quantize

    names = [n for n, p in model.named_parameters() if any(p is r.parameter for r in refs)]
    params = [r.parameter for r in refs]
    delta = torch.cat([(fake_quantize(p.detach(), "mxint4", axis=-1) - p.detach()).reshape(-1) for p in params])

    def flat_loss(flat):
        parts = torch.split(flat, [p.numel() for p in params])
        return mean_nll_functional(model, {n: t.view(p.shape) for n, t, p in zip(names, parts, params)}, windows)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    h = torch.autograd.functional.hessian(flat_loss, flat)
    g = torch.autograd.functional.jacobian(flat_loss, flat)
    assert out["quad_delta_h_delta"] == pytest.approx(float(0.5 * delta @ h @ delta), rel=1e-6)
    assert out["grad_dot_delta"] == pytest.approx(float(g @ delta), rel=1e-6)
    # NLL(W + t delta) - NLL(W) = t g.d + t^2 q + O(t^3): at t = 1/4 the cubic remainder is small
    t = 0.25
    taylor = t * out["grad_dot_delta"] + t * t * out["quad_delta_h_delta"]
    assert out["radial_dnll_025"] == pytest.approx(taylor, rel=0.05, abs=1e-7)


def test_nan_weights_raise_a_model_error_naming_the_parameter():
    model = tiny_model("opt", hidden=16, layers=1, heads=2)
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"model\.decoder\.layers\.0\.fc1\.weight"):
        extract(model, Recipe("mxint4"), _calib(), **FAST)


def test_extract_is_deterministic_and_leaves_the_model_untouched():
    model = tiny_model("llama", hidden=16, layers=2, heads=2)
    model.set_attn_implementation("sdpa")  # extract must switch to eager for the HVPs and switch back
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    a = extract(model, Recipe("mxint4"), _calib(), seed=3, **FAST)
    b = extract(model, Recipe("mxint4"), _calib(), seed=3, **FAST)
    c = extract(model, Recipe("mxint4"), _calib(), seed=4, **FAST)
    strip = lambda d: {k: v for k, v in d.items() if not k.endswith("_seconds")}  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)  # another seed: other windows and probes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.config._attn_implementation == "sdpa"
    assert all(p.grad is None for p in model.parameters())


def test_gptq_and_smoothquant_recipes():
    model = tiny_model("opt", hidden=16, layers=2, heads=2)
    out = extract(model, Recipe("int4", method="gptq", smoothquant_alpha=0.5, skip=("fc2",)), _calib(), **FAST)
    _finite_and_complete(out)
    assert out["gptq_proxy_gptq"] < out["gptq_proxy_rtn"]


def test_which_selects_groups_and_rejects_unknown_ones():
    model = tiny_model("llama", hidden=16, layers=1, heads=2)
    out = extract(model, Recipe("mxint4"), _calib(), which="format,model", **FAST)
    _finite_and_complete(out, ("model", "format"))
    assert parse_which(["noise", "model"]) == ("model", "noise")  # schema order
    with pytest.raises(ValueError, match="valid groups"):
        parse_which("curvature,bogus")


def test_schema_table_lists_every_feature():
    table = feature_table_markdown()
    assert all(f"`{name}`" in table for name in FEATURE_NAMES)
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert TIMING_NAMES == tuple(f"{g}_seconds" for g in GROUPS)


def test_cli_features_json(tiny_hf_dir, capsys, monkeypatch):
    from quantpredict import data
    from quantpredict.cli import main

    # tokenizing all of WikiText-2 train takes most of a minute on a busy CPU; the CLI's own logic is under test
    calls = []
    monkeypatch.setattr(data, "token_ids", lambda tok, name, split: calls.append((name, split)) or _calib())

    rc = main(["features", str(tiny_hf_dir), "--format", "mxint4", "--method", "rtn", "--which", "model,noise",
               "--n-windows", "2", "--seq-len", "32", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["features"]) >= {"fp_calib_nll", "rtn_sqnr_db", "model_seconds", "noise_seconds"}
    assert out["recipe"] == "mxint4-rtn"
    assert calls == [("wikitext2", "train")]  # calibration from train, never test
    rc = main(["features", str(tiny_hf_dir), "--format", "mxint4", "--which", "format"])
    assert rc == 0
    assert "bits_per_element" in capsys.readouterr().out


def test_mean_nll_cross_entropy_derivatives_equal_autograd_of_f_cross_entropy():
    """mean_nll's cross-entropy (lmhead.summed_cross_entropy) has its own (differentiable) backward: gradient and
    Hessian-vector product must equal autograd's through F.cross_entropy, in float64."""
    from torch.autograd.gradcheck import gradcheck, gradgradcheck

    from quantpredict import lmhead
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randint(0, 5, (7,), generator=g)
    ours = lmhead.summed_cross_entropy(z, target)
    ref = torch.nn.functional.cross_entropy(z, target, reduction="sum")
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-15)
    (g1,) = torch.autograd.grad(ours, z, create_graph=True)
    (r1,) = torch.autograd.grad(ref, z, create_graph=True)
    assert torch.allclose(g1, r1, rtol=1e-12, atol=1e-14)
    v = torch.randn(7, 5, dtype=torch.float64, generator=g)
    (hv,) = torch.autograd.grad((g1 * v).sum(), z)
    (rv,) = torch.autograd.grad((r1 * v).sum(), z)
    assert torch.allclose(hv, rv, rtol=1e-12, atol=1e-14)
    assert gradcheck(lambda x: lmhead.summed_cross_entropy(x, target), (z,))
    assert gradgradcheck(lambda x: lmhead.summed_cross_entropy(x, target), (z,))


def test_predictor_groups_share_one_forward_and_agree_with_separate_passes():
    """With landscape and without curvature, the layer Hessians and the FP NLL come from the Hessian operator's
    forward pass: the values must equal those of the separate no-grad pass (float64, eager both ways)."""
    model = tiny_model("gpt2", hidden=16, layers=2, heads=2).double()
    merged = extract(model, Recipe("int4"), _calib(), which="model,noise,landscape", **FAST)
    alone = extract(model, Recipe("int4"), _calib(), which="model,noise", **FAST)
    landscape = extract(model, Recipe("int4"), _calib(), which="landscape", **FAST)
    for k, v in {**alone, **landscape}.items():
        if not k.endswith("_seconds"):
            assert merged[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
