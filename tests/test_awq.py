"""AWQ: the scale search, the clip search and the whole-model path, on cases whose answer is known."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from quantpredict import arch, features
from quantpredict.formats import fake_quantize
from quantpredict.quantize import Recipe, quantize_model, search_clip, search_scales
from quantpredict.quantize.awq import apply_clip, scales_for_ratio, weight_mean


def _outlier_inputs(n_tokens=4096, n=128, outliers=(3, 40, 77, 101), boost=25.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, n, generator=g, dtype=torch.float64)
    x[:, list(outliers)] *= boost
    return x


def _direct_error(w, q, x):
    """``||X (Q - W)^T||_F^2 * 2 / N``: the output error from the tokens themselves."""
    return float(((x @ (q.double() - w.double()).T) ** 2).sum() * 2 / x.shape[0])


def test_constant_activation_magnitudes_leave_the_weights_alone():
    # every channel has the same mean |x|: every grid point normalises to s = 1, so AWQ is RTN exactly
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    x = torch.sign(torch.randn(500, 64, generator=g, dtype=torch.float64))  # |x| = 1 everywhere
    h = 2 * x.T @ x / x.shape[0]
    c = search_scales([w], [("uint4", 32)], h, x.abs().mean(0))
    assert c.ratio == 0.0 and torch.equal(c.scales, torch.ones(64, dtype=torch.float64))
    assert c.loss == c.loss_rtn and len(set(c.losses)) == 1


def test_outlier_channels_are_protected():
    # a few input channels 25x larger than the rest: scaling their weight columns up before rounding (and their
    # activations down) protects them; the search picks alpha > 0, the largest scales on exactly those channels,
    # and a clearly lower output error than RTN
    outliers = (3, 40, 77, 101)
    x = _outlier_inputs(outliers=outliers)
    h = 2 * x.T @ x / x.shape[0]
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(48, 128, generator=g), torch.randn(32, 128, generator=g)]
    for fmt in (("uint4", None), ("int4", None), ("nf4", None), ("uint3", 64)):
        c = search_scales(ws, [fmt, fmt], h, x.abs().mean(0))
        assert c.ratio > 0, fmt
        assert set(torch.topk(c.scales, len(outliers)).indices.tolist()) == set(outliers), fmt
        assert c.loss < 0.8 * c.loss_rtn, (fmt, c.loss / c.loss_rtn)
        # the loss is the group's output error, measured independently on the tokens
        s = c.scales
        direct = sum(_direct_error(w, fake_quantize((w.double() * s).float(), fmt[0], block_size=fmt[1]).double()
                                   / s, x) for w in ws)
        # float32 products of the search over 128-term rows: ~1e-6 relative (awq._scaled_error)
        assert direct == pytest.approx(c.loss, rel=1e-5)
        assert c.losses[0] == c.loss_rtn == pytest.approx(
            sum(_direct_error(w, fake_quantize(w, fmt[0], block_size=fmt[1]), x) for w in ws), rel=1e-5)


def test_scales_for_ratio_matches_the_definition():
    xm = torch.tensor([0.5, 2.0, 8.0, 0.0], dtype=torch.float64)
    s = scales_for_ratio(xm, 0.5)
    raw = torch.tensor([0.5**0.5, 2.0**0.5, 8.0**0.5, 1e-4], dtype=torch.float64)
    torch.testing.assert_close(s, raw / (raw.max() * raw.min()).sqrt())
    assert torch.equal(scales_for_ratio(xm, 0.0), torch.ones(4, dtype=torch.float64))
    # duo scaling divides by the normalised weight magnitude to the power 1 - alpha
    w = torch.tensor([[1.0, -2.0, 4.0, 0.5], [2.0, 2.0, -1.0, 1.0]])
    wm = weight_mean([w], None)
    torch.testing.assert_close(wm, ((w.abs() / w.abs().amax(1, keepdim=True)).mean(0)).double(), atol=1e-6,
                               rtol=1e-6)
    duo = scales_for_ratio(xm, 0.25, wm)
    raw = (xm.pow(0.25) / (wm.pow(0.75) + 1e-4)).clamp(min=1e-4)
    torch.testing.assert_close(duo, raw / (raw.max() * raw.min()).sqrt())


def test_duo_scaling_search_runs_and_never_loses_to_rtn():
    x = _outlier_inputs(n_tokens=1024)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    c = search_scales([w], [("uint4", None)], h, x.abs().mean(0), duo_scaling=True)
    assert c.loss <= c.loss_rtn and c.scales.shape == (128,)


def test_clip_search_shrinks_an_outlier_weight_group():
    # one huge weight per row-group wastes the 4-bit grid on it: clipping it (with its inputs small) wins
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 128, generator=g)
    w[:, 5] = 12.0  # an outlier in the first group of 64 of every row
    x = torch.randn(2048, 128, generator=g, dtype=torch.float64)
    x[:, 5] *= 0.05  # ... whose input is small
    h = 2 * x.T @ x / x.shape[0]
    max_val, group = search_clip(w, "uint4", 64, h)
    assert group == 64 and max_val.shape == (8, 2)
    assert (max_val[:, 0] < 12.0).all()
    clipped = apply_clip(w, max_val, group)
    q_clip, q_plain = fake_quantize(clipped, "uint4", block_size=64), fake_quantize(w, "uint4", block_size=64)
    assert _direct_error(w, q_clip, x) < 0.8 * _direct_error(w, q_plain, x)
    # a per-channel format clips whole rows; a row that is not a multiple of the block clips whole rows too
    assert search_clip(w, "int4", None, h)[1] == 128
    assert search_clip(w[:, :96], "uint4", 64, h[:96, :96])[1] == 96


def _salient_llama():
    """A tiny llama whose norms make a few channels of every layer input 20x larger (AWQ's setting)."""
    model = tiny_model("llama", hidden=64, layers=2)
    with torch.no_grad():
        for block in arch.blocks(model):
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[[5, 17, 42]] = 20.0
    return model


def test_awq_rtn_lowers_the_output_error_of_a_model_with_salient_channels():
    stream = torch.randint(3, 320, (2000,), generator=torch.Generator().manual_seed(5))
    reports = {}
    for awq in (False, True):
        model = _salient_llama()
        reports[awq] = quantize_model(model, Recipe("uint4", block_size=32, awq=awq, calib_samples=16,
                                                    calib_seq_len=32), stream, progress=False, output_errors=True)
    plain, scaled = reports[False], reports[True]
    for a, b in zip(plain.layers, scaled.layers):
        assert b.output_error_rtn == pytest.approx(a.output_error_rtn, rel=1e-6) if b.block_index == 0 else True
    qkv = [r for r in scaled.layers if r.name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))]
    assert all(r.output_error < r.output_error_rtn for r in qkv), [(r.name, r.output_error / r.output_error_rtn)
                                                                   for r in qkv]
    assert scaled.summary()["mean_output_error"] < 0.8 * plain.summary()["mean_output_error"]
    norm_groups = [g for g in scaled.awq if "layernorm" in g.name]
    assert norm_groups and all(g.ratio > 0 for g in norm_groups)


def test_awq_gptq_is_on_the_grid_and_features_take_awq_recipes():
    stream = torch.randint(3, 320, (2000,), generator=torch.Generator().manual_seed(6))
    model = _salient_llama()
    recipe = Recipe("nf4", method="gptq", awq=True, calib_samples=8, calib_seq_len=32)
    q = _salient_llama()
    report = quantize_model(q, recipe, stream, progress=False)
    assert report.awq and report.recipe_label == "nf4-gptq-awq-cal8x32"
    for ref in arch.linear_layers(q):  # NF4: at most 16 values (code times absmax) in every block of 64
        blocks = ref.weight.detach().reshape(ref.out_features, -1, 64)
        assert max(len(b.unique()) for row in blocks for b in row) <= 16, ref.name
    # the features run the same backend on a copy: the direction is measured at the AWQ-scaled FP point, whose loss
    # is the FP model's
    plain = features.extract(model, Recipe("nf4"), stream, which="model", n_windows=2, seq_len=16)
    feats = features.extract(model, recipe, stream, which="model,format,noise,gptq_proxy", n_windows=2, seq_len=16)
    assert feats["fp_calib_nll"] == pytest.approx(plain["fp_calib_nll"], abs=1e-5)
    assert all(torch.isfinite(torch.tensor(v)) for v in feats.values())


def test_the_model_group_of_an_awq_recipe_runs_no_awq_search(monkeypatch):
    """The FP NLL of an AWQ recipe is the FP model's (the scaled model computes the same function): the model and
    format groups, which a backfill of a 1.5B AWQ run asks for, never build the scaled model (its search over the
    calibration batch took over an hour there)."""
    import quantpredict.features.context as context

    def no_search(*args, **kwargs):
        raise AssertionError("the model group ran AWQ's search")

    stream = torch.randint(3, 320, (2000,), generator=torch.Generator().manual_seed(6))
    model = _salient_llama()
    plain = features.extract(model, Recipe("nf4"), stream, which="model,format", n_windows=2, seq_len=16)
    monkeypatch.setattr(context, "awq_backend", no_search)
    awq = features.extract(model, Recipe("nf4", awq=True), stream, which="model,format", n_windows=2, seq_len=16)
    assert awq["fp_calib_nll"] == plain["fp_calib_nll"]  # the same model, the same windows: the same float
    assert awq["bits_per_element"] == plain["bits_per_element"]
