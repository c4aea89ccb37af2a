"""The FP reference every printed perplexity rests on (issue #29 item 2) and the practitioner's answer of rank,
allocate, predict and demo (item 3): the resolver's source order and cache key, the interval widening by the FP's
SE, invalid --ppl-fp, the damage-bound fold, warnings as one note, and one cost model in every command."""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from contextlib import redirect_stdout

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_model
from scipy.stats import norm
from test_physics import synthetic_runs

from quantpredict.cli import answer, main
from quantpredict.errors import PredictorError
from quantpredict.predict import fp_reference as fpr
from quantpredict.predict.physics import OutOfRangeWarning, PhysicsPredictor


# ---- invalid --ppl-fp ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["predict", "llama-xs", "--format", "mxint4"], ["rank", "llama-xs"],
                                     ["allocate", "llama-xs", "--target-bits", "4.5"]])
@pytest.mark.parametrize("value", ["-5", "0", "0.5", "nan", "inf", "abc"])
def test_invalid_ppl_fp_exits_2_naming_the_flag(command, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--ppl-fp", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--ppl-fp" in err and "Traceback" not in err


def test_invalid_fp_windows_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["rank", "llama-xs", "--fp-windows", "0"])
    assert exc.value.code == 2 and "--fp-windows" in capsys.readouterr().err


def test_check_ppl_fp_values():
    assert fpr.check_ppl_fp("34.8") == 34.8 and fpr.check_ppl_fp(1) == 1.0
    assert fpr.check_ppl_fp("predicted") == fpr.PREDICTED and fpr.check_ppl_fp(" Predicted ") == fpr.PREDICTED
    for bad in (-5, 0, 0.999, math.nan, math.inf, "x", None):
        with pytest.raises(PredictorError, match="ppl_fp"):
            fpr.check_ppl_fp(bad, "ppl_fp")


# ---- the resolver's source order and cache key -----------------------------------------------------------------------
def test_zoo_card_first_then_given_number_then_predicted():
    card = json.loads((fpr.Path(__file__).parents[1] / "data/zoo/llama-xs/zoo_card.json").read_text())
    ref = fpr.resolve_fp_reference("llama-xs")
    assert ref.source == "zoo card" and ref.ppl == pytest.approx(math.exp(card["test_nll"]))
    assert ref.nll_se == card["test_nll_se"] and ref.windows == card["test_tokens"] // 255
    assert "zoo card" in ref.describe() and "±" in ref.describe()
    given = fpr.resolve_fp_reference("llama-xs", ppl_fp=50.0)
    assert given.source == "--ppl-fp" and given.ppl == 50.0 and math.isnan(given.nll_se)
    assert given.forward_seconds_per_window == ref.forward_seconds_per_window  # the timing is still the card's
    pred = fpr.resolve_fp_reference("llama-xs", ppl_fp="predicted")
    assert pred.predicted and pred.columns() == {} and "predicted" in pred.describe(120.0)
    assert fpr.resolve_fp_reference("anything", ppl_fp=ref) is ref  # an FPReference passes through


def test_card_without_se_says_so(monkeypatch):
    card = {"test_ppl": 68.6, "test_nll": math.log(68.6), "test_tokens": 255 * 10, "eval_seq_len": 256,
            "test_eval_seconds": 3.0}
    ref = fpr._card_reference(card)
    assert math.isnan(ref.nll_se) and "SE not recorded" in ref.describe()
    assert ref.columns() == {"ppl_fp": pytest.approx(68.6), "nll_fp_se": 0.0}


def _long_tiny(seed=0):
    model = tiny_model("llama", seed=seed)
    model.config.max_position_embeddings = 256  # rotary positions: the 256-token windows of the FP protocol
    return model


def test_measured_once_then_cached_keyed_by_weights_and_setting(tokenizer, monkeypatch):
    model = _long_tiny()
    calls = []
    real = fpr._measure
    monkeypatch.setattr(fpr, "_measure", lambda *a: calls.append(a[2]) or real(*a))
    first = fpr.resolve_fp_reference(model, model=model, tokenizer=tokenizer, fp_windows=2, name="tiny")
    assert first.source == "measured" and first.windows == 2 and first.setting == "seq256-w2"
    assert first.path and fpr.Path(first.path).parent == fpr.fp_root() and first.nll_se > 0
    again = fpr.resolve_fp_reference(model, model=model, tokenizer=tokenizer, fp_windows=2, name="tiny")
    assert again.source == "cache" and again.ppl == first.ppl and again.nll_se == first.nll_se
    assert again.path == first.path and calls == [2]
    # the key: another window count, or other weights, is another entry
    other = fpr.resolve_fp_reference(model, model=model, tokenizer=tokenizer, fp_windows=3, name="tiny")
    assert other.source == "measured" and other.path != first.path and calls == [2, 3]
    parts = fpr.key_parts(model, model, tokenizer, 2)
    assert parts["setting"] == "seq256-w2" and parts["weights"].startswith("tensors:")
    changed = _long_tiny(seed=1)
    assert fpr.key_parts(changed, changed, tokenizer, 2)["weights"] != parts["weights"]
    # no cache: measured again, nothing written
    fresh = fpr.resolve_fp_reference(model, model=model, tokenizer=tokenizer, fp_windows=2, name="tiny", cache=False)
    assert fresh.source == "measured" and fresh.path is None and calls == [2, 3, 2]


def test_a_model_object_without_tokenizer_cannot_be_measured():
    model = tiny_model("llama")
    with pytest.raises(PredictorError, match="tokenizer"):
        fpr.resolve_fp_reference(model, model=model)


# ---- the interval: the delta interval and the FP SE in quadrature, in log space ----------------------------------
def test_interval_widening_against_a_hand_computation():
    ppl, lo, hi = fpr.combine_interval(0.45, 0.35, 0.63, math.log(34.8), 0.03, alpha=0.1)
    z = 1.6448536269514722
    assert ppl == pytest.approx(34.8 * math.exp(0.45))
    assert lo == pytest.approx(34.8 * math.exp(0.45 - math.sqrt(0.10**2 + (z * 0.03) ** 2)))
    assert hi == pytest.approx(34.8 * math.exp(0.45 + math.sqrt(0.18**2 + (z * 0.03) ** 2)))
    same = fpr.combine_interval(0.45, 0.35, 0.63, math.log(34.8), 0.0)
    assert same[1] == pytest.approx(34.8 * math.exp(0.35)) and same[2] == pytest.approx(34.8 * math.exp(0.63))


def test_the_predictors_widen_by_the_fp_se_as_combine_interval_does():
    warnings.simplefilter("ignore", OutOfRangeWarning)
    p = PhysicsPredictor("profile").fit(synthetic_runs())
    rows = synthetic_runs(n_models=1, n_recipes=3, seed=3).assign(ppl_fp=34.8, nll_fp_se=0.03)
    out = p.predict(rows)
    ppl, lo, hi = fpr.combine_interval(out["delta_nll"], out["delta_low"], out["delta_high"], math.log(34.8), 0.03,
                                       p.alpha)
    np.testing.assert_allclose(out["ppl_low"], lo, rtol=1e-12)
    np.testing.assert_allclose(out["ppl_high"], hi, rtol=1e-12)
    narrow = p.predict(rows.drop(columns=["nll_fp_se"]))
    assert (narrow["ppl_low"] > out["ppl_low"]).all() and (narrow["ppl_high"] < out["ppl_high"]).all()
    assert norm.ppf(0.95) == pytest.approx(1.6448536269514722)


# ---- the answer: folding, notes, cost ------------------------------------------------------------------------------
def _frame():
    rows = []
    for name, bits, kld, inc, rec in (("int2-rtn", 2.1, 12.0, 1.3e9, False), ("mxint3-rtn", 3.25, 1.4, 250.0, False),
                                      ("mxint4-gptq", 4.25, 0.2, 25.0, True), ("mxint4-rtn", 4.25, 0.5, 60.0, False),
                                      ("int4-rtn", 4.02, 0.9, 120.0, False)):
        d = math.log1p(inc / 100)
        rows.append({"recipe": name, "mix": None, "bits_per_element": bits, "size_bytes": 2**20, "kld": kld,
                     "kld_low": kld / 2, "kld_high": kld * 2, "delta_nll": d, "ppl_fp": 34.8,
                     "ppl": 34.8 * math.exp(d), "ppl_low": 34.8 * math.exp(d / 2),
                     "ppl_high": 34.8 * math.exp(2 * d), "ppl_increase_pct": inc, "top1": 0.5, "pareto": True,
                     "recommended": rec, "out_of_range": "log token_gn_quad" if bits < 3 else "",
                     "price_seconds": 0.1})
    frame = pd.DataFrame(rows)
    from quantpredict.predict.rank import past_damage_bound

    frame["past_damage_bound"] = past_damage_bound(frame)
    ref = fpr.FPReference(ppl=34.8, nll_se=0.03, source="cache", setting="seq256-w64-bos", windows=64,
                          tokens=16320, forward_seconds_per_window=0.1, full_split_windows=1100, timing="t",
                          path="/x.json")
    frame.attrs.update({"model": "m", "recommended": "mxint4-gptq", "constraint": {"max_bits": 4.5},
                        "seconds": 1.0, "profile_seconds": 0.5, "profile_cached": True, "seconds_per_recipe": 0.1,
                        "full_eval_seconds": 220.0, "full_eval": fpr.full_eval_cost(ref).to_dict(),
                        "fp_reference": ref.to_dict(), "kept_16bit": ["Embedding"], "predictor_kind": "profile",
                        "notes": []})
    return frame


def _rank_text(frame, all_=False):
    import argparse

    from quantpredict.cli.rank import _print

    buf = io.StringIO()
    with redirect_stdout(buf):
        _print(argparse.Namespace(json=False, all=all_), frame)
    return buf.getvalue()


def test_damage_bound_rows_fold_into_one_line_unless_all():
    frame = _frame()
    assert frame["past_damage_bound"].tolist() == [True, True, False, False, True]
    text = _rank_text(frame)
    assert "FP perplexity 34.80 ± 1.04" in text and "cache" in text
    body = [ln.split()[0] for ln in text.splitlines()[3:8]]
    assert "mxint4-gptq" in body and "mxint4-rtn" in body and "int2-rtn" not in body
    fold = [ln for ln in text.splitlines() if "past the damage bound" in ln]
    assert len(fold) == 1 and fold[0].startswith("3 recipes") and "int2-rtn" in fold[0] and "--all" in fold[0]
    assert "+25.0%" in text and "recommended under max-bits 4.5: mxint4-gptq" in text
    everything = _rank_text(frame, all_=True)
    assert "past the damage bound" not in everything and "int2-rtn" in everything and ">+999%" in everything
    row = next(ln for ln in everything.splitlines() if ln.startswith("int2-rtn"))
    assert "e+" in row and len(row) < 140  # a huge perplexity stays in its column
    frame.loc[0, "recommended"] = True  # a recommended row is shown even past the bound
    assert any(ln.startswith("int2-rtn") for ln in _rank_text(frame).splitlines())


def test_out_of_range_warnings_become_one_note():
    with answer.caught_warnings() as caught:
        for col in ("log token_gn_quad", "bits_per_element"):
            warnings.warn(f"profile predictor: input {col} = 9 lies outside", OutOfRangeWarning, stacklevel=1)
        warnings.warn("profile predictor: input x lies outside", OutOfRangeWarning, stacklevel=1)
    lines = answer.notes(caught, [("int2-rtn", "log token_gn_quad"), ("mxint2-rtn", "bits_per_element; x"),
                                  ("int8-rtn", "")])
    assert len(lines) == 1
    assert lines[0].startswith("note: 2 recipes lie outside the predictor's training range: int2-rtn, mxint2-rtn")
    assert "rank.py" not in lines[0] and "OutOfRangeWarning" not in lines[0]


def test_foreign_warnings_pass_through_and_ours_are_kept():
    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        with answer.caught_warnings() as caught:
            warnings.warn("a library's deprecation", FutureWarning, stacklevel=1)
            warnings.warn("profile cache entry x is unusable", fpr_warning(), stacklevel=1)
    assert [str(w.message) for w in caught] == ["profile cache entry x is unusable"]
    assert [str(w.message) for w in outer] == ["a library's deprecation"]
    assert answer.notes(caught) == ["note: profile cache entry x is unusable"]


def fpr_warning():
    from quantpredict.predict.profile_cache import ProfileCacheWarning

    return ProfileCacheWarning


def test_cost_model_by_hand():
    ref = fpr.FPReference(ppl=30.0, forward_seconds_per_window=0.05, full_split_windows=1000, timing="x")
    cost = fpr.full_eval_cost(ref)
    assert cost.seconds == pytest.approx(2 * 0.05 * 1000) and "x 2 (FP and quantized)" in cost.how
    assert fpr.full_eval_cost(fpr.FPReference(ppl=30.0)).seconds is None


def _cost(text: str) -> str:
    m = re.search(r"a full WikiText-2 test evaluation of one recipe: ~(\d+) s", text)
    assert m, text
    return m.group(1)


def test_every_command_prints_the_same_fp_and_cost(capsys):
    """demo, predict, rank and allocate on one zoo model: the same FP line and the same full-evaluation estimate."""
    out = {}
    for name, argv in (("rank", ["rank", "llama-xs", "--formats", "mxint4", "--methods", "rtn"]),
                       ("allocate", ["allocate", "llama-xs", "--target-bits", "5", "--candidates", "mxint4,mxint6"]),
                       ("predict", ["predict", "llama-xs", "--format", "mxint4"]),
                       ("demo", ["demo", "--model", "llama-xs", "--recipes", "mxint4:rtn"])):
        assert main(argv) == 0, name
        out[name] = capsys.readouterr().out
    fp_lines = {k: next(ln for ln in v.splitlines() if ln.startswith("FP perplexity")) for k, v in out.items()}
    assert len(set(fp_lines.values())) == 1, fp_lines
    costs = {k: _cost(v) for k, v in out.items()}
    assert len(set(costs.values())) == 1, costs
