"""One answer per recipe (issues #28 and #29): ``predict_quality``, ``rank_recipes``, ``allocate``, ``quantpredict
predict`` and ``quantpredict demo`` price a recipe through one path (``quantpredict.predict.rank.price``), so
they print the same KLD and perplexity for the same model and recipe, bit for bit.

A zoo model and the shipped profile predictor; profiles are cached in the session's temporary folder (conftest)."""

from __future__ import annotations

import pytest

from quantpredict.cli import main
from quantpredict.predict.allocate import allocate
from quantpredict.predict.quality import HOW_MEASURED, HOW_PROFILE, predict_quality
from quantpredict.predict.rank import rank_recipes

MODEL = "llama-xs"
RECIPES = ["mxint4-rtn", "int8-rtn", "mxint4-gptq"]


@pytest.fixture(scope="module")
def ranked():
    return rank_recipes(MODEL, RECIPES).set_index("recipe")


def test_predict_quality_is_rank_bit_for_bit(ranked):
    for label in RECIPES:
        pr = predict_quality(MODEL, label)
        row = ranked.loc[label]
        assert pr.how == HOW_PROFILE and pr.predictor_kind == "profile" and pr.note == ""
        for k in ("kld", "kld_low", "kld_high", "ppl", "ppl_low", "ppl_high", "delta_nll", "top1", "ppl_fp"):
            assert getattr(pr, k) == float(row[k]), (label, k)  # the same floats, not approximately


def test_allocate_prices_its_comparisons_as_rank_does(ranked):
    res = allocate(MODEL, 6.0, candidates=["mxint4", "int8"], compare=["mxint4-rtn", "int8-rtn"])
    for c in res.compared:
        for k in ("kld", "ppl", "ppl_low", "ppl_high"):
            assert c["prediction"][k] == float(ranked.loc[c["recipe"], k]), (c["recipe"], k)
    # a uniform candidate priced inside allocate is the rank row too
    best = res.best_uniform
    assert best["prediction"]["kld"] == float(ranked.loc[best["recipe"], "kld"])


def _line(out: str, label: str) -> str:
    return next(x for x in out.splitlines() if x.startswith(label + " "))


def test_the_commands_print_the_same_perplexity(ranked, capsys):
    want = f" {float(ranked.loc['mxint4-rtn', 'ppl']):.2f} ["  # every table prints the perplexity, then its interval
    assert main(["predict", MODEL, "--format", "mxint4"]) == 0
    predicted = capsys.readouterr().out
    assert main(["demo", "--model", MODEL, "--recipes", "mxint4:rtn"]) == 0
    demo = capsys.readouterr().out
    assert main(["rank", MODEL, "--recipes", "mxint4-rtn", "--all"]) == 0
    rank = capsys.readouterr().out
    assert "profile predictor: priced from the weights" in predicted and "profile predictor" in demo
    # the profile rank measured (the fixture) is the one predict and demo read: the same cache entry, not a second
    assert "profile: read from the cache" in predicted and "profile: read from the cache" in demo
    for out in (predicted, demo, rank):
        assert want in _line(out, "mxint4-rtn"), out


def test_awq_recipes_are_priced_from_the_weights_as_rank_prices_them():
    labels = ["mxint4-rtn-awq", "int4-gptq-awq"]
    ranked = rank_recipes(MODEL, labels + ["mxint4-rtn"]).set_index("recipe")
    for label in labels:
        pr = predict_quality(MODEL, label)
        assert pr.how == HOW_PROFILE and pr.predictor_kind == "profile" and pr.note == ""
        assert pr.kld == float(ranked.loc[label, "kld"]) and pr.ppl_low <= pr.ppl <= pr.ppl_high
    # AWQ's search and clipping lower the 4-bit RTN price of the same format
    assert float(ranked.loc["mxint4-rtn-awq", "token_gn_quad"]) < float(ranked.loc["mxint4-rtn", "token_gn_quad"])


def test_recipes_the_weights_only_path_does_not_price_are_measured_and_say_so():
    pr = predict_quality(MODEL, "mxint4-rtn-awq-a_mxint8")
    assert pr.how == HOW_MEASURED and pr.predictor_kind == "physics"
    assert "does not price" in pr.note and "measured on the calibration windows" in pr.note
    assert pr.ppl_low <= pr.ppl <= pr.ppl_high


def test_activation_recipes_are_priced_from_the_weights_as_rank_prices_them():
    """Weight+activation recipes go through the one path too (the activation term of features.act_price)."""
    labels = ["mxint4-rtn-a_mxint8", "mxint8-rtn-sq0.5-a_mxint8"]
    ranked = rank_recipes(MODEL, labels).set_index("recipe")
    for label in labels:
        pr = predict_quality(MODEL, label)
        assert pr.how == HOW_PROFILE and pr.note == ""
        assert pr.kld == float(ranked.loc[label, "kld"]) and pr.ppl == float(ranked.loc[label, "ppl"])
    # activation quantization costs something on top of the weights' own error
    wonly = rank_recipes(MODEL, ["mxint4-rtn"]).iloc[0]
    assert float(ranked.loc["mxint4-rtn-a_mxint8", "token_gn_quad"]) > float(wonly["token_gn_quad"])


def test_measure_flag_uses_the_measurement_predictor(capsys):
    assert main(["predict", MODEL, "--format", "int8", "--measure", "2"]) == 0
    out = capsys.readouterr().out
    assert "physics predictor: measured on the calibration windows" in out
    assert "measured recipes:" in out


def test_gptq_pricing_reuses_each_layers_factor_with_the_same_deltas():
    """rank keeps each layer's GPTQ Hessian factor across recipes (ModelProfile.gptq_factors): the second GPTQ
    recipe factorises nothing and its deltas are those of an uncached pricing, bit for bit."""
    import torch

    from quantpredict.features.fisher import profile_deltas
    from quantpredict.predict.rank import profile_model

    mp = profile_model(MODEL)
    formats = [("mxint4", None)] * len(mp.refs)
    cache: dict = {}
    first = profile_deltas(mp.refs, formats, "gptq", mp.profile, factors=cache)
    assert len(cache) == len(mp.refs)
    kept = {k: v for k, v in cache.items()}
    again = profile_deltas(mp.refs, [("int4", None)] * len(mp.refs), "gptq", mp.profile, factors=cache)
    assert all(cache[k] is kept[k] for k in kept)  # reused, not recomputed
    plain = profile_deltas(mp.refs, [("int4", None)] * len(mp.refs), "gptq", mp.profile)
    assert all(torch.equal(a, b) for a, b in zip(again, plain))
    assert all(torch.equal(a, b) for a, b in zip(first, profile_deltas(mp.refs, formats, "gptq", mp.profile)))


@pytest.mark.parametrize("fmt,act_order", [(("mxint4", None), False), (("int4", None), False),
                                           (("int8", 32), False), (("mxint4", None), True), (("uint4", 16), False)])
def test_gptq_price_stacks_same_shape_layers_with_each_layers_own_deltas(fmt, act_order, monkeypatch):
    """The weights-only GPTQ price rounds the same layer of every block in one stacked column loop
    (gptq_quantize_stacked) where it can (single-scale formats, no act_order); every layer's delta is still
    gptq_quantize of that layer alone against its own Hessian, bit for bit, in the layers' order."""
    import torch

    from quantpredict.features import fisher
    from quantpredict.predict.rank import profile_model
    from quantpredict.quantize import gptq

    mp = profile_model(MODEL)
    calls = []
    stacked = gptq.gptq_quantize_stacked
    monkeypatch.setattr(gptq, "gptq_quantize_stacked", lambda w, *a, **k: calls.append(w.shape[0]) or
                        stacked(w, *a, **k))
    formats = [fmt] * len(mp.refs)
    opts = {"act_order": act_order, "percdamp": 0.01, "blocksize": 128}
    got = fisher.profile_deltas(mp.refs, formats, "gptq", mp.profile, gptq_options=opts, factors={})
    for ref, d in zip(mp.refs, got, strict=True):
        w = ref.weight.detach().float()
        alone = gptq.gptq_quantize(w, mp.profile.hessian(ref.name), fmt[0], block_size=fmt[1], **opts) - w
        assert torch.equal(d, alone), ref.name
    shapes = {tuple(r.weight.shape) for r in mp.refs}
    if act_order or fmt[0] == "uint4":  # act_order's orders differ per layer; uint4 is a shipped layout
        assert calls == []
    else:  # a tiny model's stacks fit the budget: one per distinct shape, every layer in one
        assert len(calls) == len(shapes) and sum(calls) == len(mp.refs)
