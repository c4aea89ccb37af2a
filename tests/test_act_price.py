"""The activation term of the weights-only price (:mod:`quantpredict.features.act_price`): against a float64 hand
computation on one layer, against the weight-only ``token_gn_quad`` where there is no activation quantization, and
against the output change of a real SmoothQuant + activation-quantized layer."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from quantpredict import arch
from quantpredict.features import act_price
from quantpredict.features.fisher import measure_profile, price_deltas, profile_deltas, token_quadratic
from quantpredict.formats import fake_quantize
from quantpredict.quantize.rtn import rtn_quantize


def _layer(seed=0, out=6, inp=64, T=40):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(T, inp, generator=g) * torch.linspace(0.1, 8.0, inp)  # outlier channels
    s = torch.randn(T, out, generator=g)
    scale = torch.rand(inp, generator=g, dtype=torch.float64) + 0.5
    return w, x, s, scale


def test_act_quadratic_equals_a_float64_hand_computation(float32_prices):
    w, x, s, scale = _layer()
    w_q, delta = act_price.smoothed_quantized(w, scale, ("int4", None), "rtn", None)
    total, weight, act = act_price.act_quadratic(w_q, delta, x, s, scale, "mxint8", 32)
    xs = (x.double() / scale).float()
    a = fake_quantize(xs, "mxint8", axis=-1, block_size=32).double()
    dy = a @ w_q.double().T - x.double() @ w.double().T  # W'_q A(x / s) - W x, token by token: [T, out]
    want = 0.5 * float(((s.double() * dy).sum(1) ** 2).mean())
    assert total == pytest.approx(want, rel=1e-4)
    dyw = xs.double() @ (w_q.double() - (w.double() * scale).float().double()).T
    assert weight == pytest.approx(0.5 * float(((s.double() * dyw).sum(1) ** 2).mean()), rel=1e-4)
    dya = (a - xs.double()) @ w_q.double().T
    assert act == pytest.approx(0.5 * float(((s.double() * dya).sum(1) ** 2).mean()), rel=1e-4)
    assert act > 0 and weight > 0


def test_without_activation_quantization_or_smoothing_it_is_the_token_quadratic():
    w, x, s, _ = _layer(1)
    w_q, delta = act_price.smoothed_quantized(w, None, ("mxint4", 32), "rtn", None)
    total, weight, act = act_price.act_quadratic(w_q, delta, x, s, None, None, None)
    assert torch.equal(w_q, rtn_quantize(w, "mxint4", block_size=32))
    assert total == weight == pytest.approx(token_quadratic(delta, x, s, x.shape[0]), rel=1e-6)
    assert act == 0.0


def test_gptq_is_run_against_the_scaled_hessian():
    from quantpredict.quantize.gptq import gptq_quantize

    w, x, _, scale = _layer(2)
    h = 2.0 * (x.double().T @ x.double()) / x.shape[0]
    w_q, delta = act_price.smoothed_quantized(w, scale, ("int4", None), "gptq", h)
    ws = (w.double() * scale).float()
    hs = h / scale.unsqueeze(0) / scale.unsqueeze(1)
    assert torch.equal(w_q, gptq_quantize(ws.clone(), hs, "int4"))
    assert torch.allclose(delta, w_q - ws)


def test_recipe_price_reduces_to_the_weight_only_price():
    model = tiny_model("llama", hidden=64)
    g = torch.Generator().manual_seed(0)
    prof = measure_profile(model, torch.randint(3, 320, (2, 16), generator=g), kfac=False)
    refs = arch.linear_layers(model)
    formats = [("mxint4", 32)] * len(refs)
    want = price_deltas(prof, [r.name for r in refs], profile_deltas(refs, formats, "rtn", prof), kfac=False)
    got = act_price.price_act_recipe(model, prof, refs, formats, "rtn", act_format=None, act_block=None,
                                     smoothquant_alpha=None)
    assert got["token_gn_quad"] == pytest.approx(want["token_gn_quad"], rel=1e-6)
    assert got["kfac_max_layer_share"] == pytest.approx(want["kfac_max_layer_share"], rel=1e-6)
    with_act = act_price.price_act_recipe(model, prof, refs, formats, "rtn", act_format="mxint8", act_block=32,
                                          smoothquant_alpha=0.5)
    assert with_act["act_input_quad"] > 0


def test_price_matches_the_output_change_of_a_smoothed_activation_quantized_layer():
    """Block 0's q/k/v see the FP norm output in both models: the price's ``dy`` is the layers' real output change."""
    from quantpredict.quantize.act import install_act_quant_on
    from quantpredict.quantize.smoothquant import apply_smoothing

    model = tiny_model("llama", hidden=64)
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    pairs = arch.smooth_pairs(model, 0)  # input_layernorm -> q, k, v; post_attention_layernorm -> gate, up
    names = [r.name for p in pairs for r in p.linears]

    def outputs(m):
        refs = [r for r in arch.linear_layers(m) if r.name in names]
        seen = {}
        hooks = [r.module.register_forward_hook(lambda mod, a, o, n=r.name: seen.update({n: (a[0], o)}))
                 for r in refs]
        with torch.no_grad():
            m(input_ids=ids)
        for h in hooks:
            h.remove()
        return {n: (a.reshape(-1, a.shape[-1]), o.reshape(-1, o.shape[-1])) for n, (a, o) in seen.items()}

    fp = outputs(model)
    scales = act_price.smoothing_scales_of(model, {n: fp[n][0] for n in names}, 0.5, blocks=[0])
    quant = copy.deepcopy(model)
    qpair = arch.smooth_pairs(quant, 0)[0]  # only the attention pair: the MLP's inputs then change with the outputs
    apply_smoothing(qpair, scales[qpair.linears[0].name])
    for r in qpair.linears:
        r.set_weight(rtn_quantize(r.weight.detach().float(), "int8"))
    install_act_quant_on(qpair.linears, "mxint8", 32)
    q = outputs(quant)
    x = fp[qpair.linears[0].name][0]
    g = torch.randn(x.shape[0], 64, generator=torch.Generator().manual_seed(2))
    for ref in pairs[0].linears:
        w_q, delta = act_price.smoothed_quantized(ref.weight, scales[ref.name], ("int8", None), "rtn", None)
        gs = g[:, : ref.out_features]
        total, weight, act = act_price.act_quadratic(w_q, delta, x, gs, scales[ref.name], "mxint8", 32)
        dy = (q[ref.name][1] - fp[ref.name][1]).double()
        want = 0.5 * float(((gs.double() * dy).sum(1) ** 2).mean())
        assert total == pytest.approx(want, rel=2e-2)
        assert act > weight  # int8 weights per channel, mxint8 inputs: the inputs' error dominates


def test_smoothing_scales_come_from_the_token_inputs_max():
    from quantpredict.quantize.smoothquant import smoothing_scales

    model = tiny_model("opt", hidden=32)
    refs = arch.linear_layers(model)
    g = torch.Generator().manual_seed(3)
    xs = {r.name: torch.randn(10, r.in_features, generator=g) for r in refs}
    scales = act_price.smoothing_scales_of(model, xs, 0.75)
    pairs = [p for i in range(len(arch.blocks(model))) for p in arch.smooth_pairs(model, i)]
    assert set(scales) == {r.name for p in pairs for r in p.linears}
    p = pairs[0]
    want = smoothing_scales(xs[p.linears[0].name].abs().amax(0), [r.weight for r in p.linears], 0.75)
    assert torch.equal(scales[p.linears[-1].name], want)


def test_recipe_row_prices_weight_activation_recipes_and_still_refuses_awq_with_activations():
    from test_physics import _calib_ids

    from quantpredict.errors import RecipeError
    from quantpredict.predict.rank import profile_model, recipe_row, weights_only
    from quantpredict.recipe import Recipe

    model = tiny_model("llama", hidden=64)
    mp = profile_model(model, calib=_calib_ids(), cache=False)
    plain = recipe_row(mp, Recipe("mxint8", method="gptq"))
    wa = Recipe.from_label("mxint8-gptq-sq0.5-a_mxint8")
    assert weights_only(wa)
    row = recipe_row(mp, wa)
    assert row["act_format"] == "mxint8" and row["smoothquant_alpha"] == 0.5
    assert row["token_gn_quad"] > plain["token_gn_quad"] and row["act_input_quad"] > 0
    no_act = recipe_row(mp, Recipe("mxint8", method="gptq", act_format="mxint8"))
    assert no_act["act_weight_quad"] == pytest.approx(plain["token_gn_quad"], rel=1e-6)
    assert weights_only(Recipe.from_label("mxint4-rtn-awq"))  # AWQ of weights alone: features.awq_price
    awq = Recipe.from_label("mxint4-rtn-awq-a_mxint8")
    assert not weights_only(awq)
    with pytest.raises(RecipeError, match="AWQ with activation quantization"):
        recipe_row(mp, awq)
