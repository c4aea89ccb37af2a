"""Predictors on synthetic run tables drawn from a known law (tests/synthetic.py): fit/predict/save/load,
errors, interval coverage with known noise, validation splits and metrics, the subsample baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from synthetic import LAW_FP, LAW_QUAD, synthetic_runs

from quantpredict.errors import PredictorError
from quantpredict.predict import (
    Predictor,
    crossover,
    delta_metrics,
    group_splits,
    store_subsample_curve,
    subsample_curve,
    validate,
)
from quantpredict.predict.design import DEFAULT_FEATURES, KINDS, from_target, to_target
from quantpredict.predict.engines import conformal_quantile
from quantpredict.predict.saved import FPModel

SMALL_TREES = {"n_estimators": 20}


def make(kind: str, **kw) -> Predictor:
    return Predictor(kind, **({} if kind in ("ols", "bits") else SMALL_TREES), **kw)


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    return synthetic_runs(6, seed=0)


@pytest.fixture(scope="module")
def fitted(runs) -> dict[str, Predictor]:
    return {k: make(k).fit(runs) for k in KINDS}


def done(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "done"]


# ---- fit / predict / save / load ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_identical_predictions(kind, runs, fitted, tmp_path):
    p = fitted[kind]
    test = done(runs).sample(40, random_state=1)
    before = p.predict(test)
    p.save(tmp_path / kind)
    q = Predictor.load(tmp_path / kind)
    pd.testing.assert_frame_equal(before, q.predict(test), check_exact=True)
    meta = json.loads((tmp_path / kind / "predictor.json").read_text())
    assert meta["schema"]["used"] == list(p.features)
    assert meta["training"]["n_runs"] == len(done(runs)) == q.metadata["n_runs"]
    assert meta["versions"]["scikit-learn"] and meta["versions"]["statsmodels"]
    assert q.kind == kind and q.summary()  # statsmodels table (ols/bits) or importances (trees) after a load
    assert not any(f.suffix == ".pkl" for f in (tmp_path / kind).iterdir())


def test_output_columns_index_and_consistency(runs, fitted):
    test = done(runs).sample(30, random_state=2)
    test.index = [f"r{i}" for i in range(len(test))]
    for kind, p in fitted.items():
        out = p.predict(test)
        assert list(out.index) == list(test.index)
        assert {"ppl", "ppl_low", "ppl_high", "delta_nll", "delta_low", "delta_high"} <= set(out.columns)
        assert (out["delta_low"] <= out["delta_nll"]).all() and (out["delta_nll"] <= out["delta_high"]).all(), kind
        assert (out["ppl_low"] <= out["ppl"]).all() and (out["ppl"] <= out["ppl_high"]).all(), kind
        np.testing.assert_allclose(out["ppl"], test["ppl_fp"] * np.exp(out["delta_nll"]), rtol=1e-12)
        assert (out["ppl_fp_source"] == "measured").all()


def test_ppl_fp_measured_predicted_unavailable(runs, fitted):
    test = done(runs).head(5)
    p = fitted["ols"]
    pred = p.predict(test.drop(columns=["ppl_fp"]))
    assert (pred["ppl_fp_source"] == "predicted").all()
    fp = p.fp_model
    np.testing.assert_allclose(np.log(pred["ppl_fp"]), fp.a + fp.b * test["fp_calib_nll"], rtol=1e-12)
    # a predicted FP perplexity widens the interval
    meas = p.predict(test)
    assert ((pred["ppl_high"] / pred["ppl"]) > (meas["ppl_high"] / meas["ppl"])).all()
    # the bits baseline needs neither; without both, perplexity is unavailable but delta is still predicted
    out = fitted["bits"].predict(test[["bits_per_element"]])
    assert (out["ppl_fp_source"] == "unavailable").all() and out["ppl"].isna().all()
    assert out["delta_nll"].notna().all()


def test_fp_model_interval_matches_statsmodels():
    import statsmodels.api as sm

    rng = np.random.default_rng(0)
    x = rng.uniform(3, 6, 9)
    y = 0.2 + 0.95 * x + rng.normal(0, 0.05, 9)
    frame = pd.DataFrame({"model": [f"m{i}" for i in range(9)], "fp_calib_nll": x, "nll_fp": y})
    fp = FPModel.fit(frame)
    ref = sm.OLS(y, sm.add_constant(x)).fit()
    xs = np.array([3.5, 7.0])
    mid, half = fp.predict(xs, 0.1)
    sf = ref.get_prediction(sm.add_constant(xs)).summary_frame(alpha=0.1)
    np.testing.assert_allclose(mid, sf["mean"], rtol=1e-10)
    np.testing.assert_allclose(half, sf["obs_ci_upper"] - sf["mean"], rtol=1e-8)


def test_deterministic_for_random_state(runs):
    test = done(runs).head(20)
    a = make("rf", random_state=3).fit(runs).predict(test)
    b = make("rf", random_state=3).fit(runs).predict(test)
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_only_done_rows_are_fitted(runs):
    assert (runs["status"] == "failed").sum() == 2
    p = Predictor("bits").fit(runs)
    assert p.metadata["n_runs"] == len(done(runs))


def test_negative_and_tiny_deltas_are_handled():
    r = synthetic_runs(4, formats=("mxint8", "mxint6", "mxint4", "mxint3"), delta_se=2e-3, seed=5)
    d = r["nll_quant"] - r["nll_fp"]
    assert (d < 0).sum() > 5  # noise pushes many 8-bit deltas below zero
    for kind in ("ols", "rf"):
        out = make(kind).fit(r).predict(done(r))
        assert np.isfinite(out[["delta_nll", "delta_low", "delta_high"]].to_numpy()).all()
        # the interval is wide enough to cover noise-level (negative) measurements
        dd = d[done(r).index]
        small = dd.abs() < 2e-3
        covered = (out["delta_low"] <= dd) & (dd <= out["delta_high"])
        assert covered[small].mean() >= 0.8, (kind, covered[small].mean())


def test_asinh_target_inverse():
    d = np.array([-1e-3, 0.0, 1e-5, 0.3, 4.0])
    np.testing.assert_allclose(from_target(to_target(d, 3e-4), 3e-4), d, rtol=1e-12, atol=1e-18)


# ---- errors -------------------------------------------------------------------------------------------------------
def test_schema_mismatch_is_a_clear_error(fitted, tmp_path):
    d = fitted["ols"].save(tmp_path / "p")
    meta = json.loads((d / "predictor.json").read_text())
    meta["schema"]["used"] = [f if f != "quad_delta_h_delta" else "quad_old_name" for f in meta["schema"]["used"]]
    (d / "predictor.json").write_text(json.dumps(meta))
    with pytest.raises(PredictorError, match="different feature schema.*quad_old_name.*refit"):
        Predictor.load(d)


def test_missing_feature_columns_at_predict(runs, fitted):
    with pytest.raises(PredictorError, match=r"lacks the columns \['quad_delta_h_delta'\]"):
        fitted["ols"].predict(done(runs).drop(columns=["quad_delta_h_delta"]))
    nan = done(runs).head(3).copy()
    nan.loc[nan.index[1], "rtn_sqnr_db"] = np.nan
    with pytest.raises(PredictorError, match="rtn_sqnr_db"):
        fitted["paper"].predict(nan)


def test_unseen_recipe_level_is_an_error(runs, fitted):
    odd = done(runs).head(2).assign(method="awq")
    with pytest.raises(PredictorError, match="awq.*never seen"):
        fitted["ols"].predict(odd)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "file", "bad_json", "other_json", "newer"])
def test_not_a_predictor(case, tmp_path):
    path = tmp_path / "x"
    if case == "empty_dir":
        path.mkdir()
    elif case == "file":
        path.write_text("hello")
    elif case in ("bad_json", "other_json", "newer"):
        path.mkdir()
        text = {"bad_json": "{not json", "other_json": json.dumps({"format": "something-else"}),
                "newer": json.dumps({"format": "quantpredict.predictor", "format_version": 99})}[case]
        (path / "predictor.json").write_text(text)
    with pytest.raises(PredictorError, match="not a|does not exist|newer|not a predictor|format marker") as exc:
        Predictor.load(path)
    assert "fit" in str(exc.value) or "upgrade" in str(exc.value)


def test_skops_file_outside_allow_list_is_refused(fitted, tmp_path):
    import hashlib

    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    d = fitted["rf"].save(tmp_path / "rf")
    est = d / "estimator.skops"
    est.write_bytes(est.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(PredictorError, match="checksum"):
        Predictor.load(d)

    def swap(obj):
        sio.dump(obj, est)
        meta = json.loads((d / "predictor.json").read_text())
        meta["engine"]["estimator_sha256"] = hashlib.sha256(est.read_bytes()).hexdigest()
        (d / "predictor.json").write_text(json.dumps(meta))

    swap(FunctionTransformer(func=os.system))  # would call os.system if loaded with trust
    with pytest.raises(PredictorError, match="allow-list"):
        Predictor.load(d)
    swap(FunctionTransformer(func=np.log1p))  # only trusted types, but not the estimator the metadata promises
    with pytest.raises(PredictorError, match="expected RandomForestRegressor"):
        Predictor.load(d)


def test_bad_arguments(runs):
    with pytest.raises(PredictorError, match="unknown predictor kind"):
        Predictor("svm")
    with pytest.raises(PredictorError, match="not in quantpredict.schema"):
        Predictor("rf", features=["nope"], **SMALL_TREES).fit(runs)
    with pytest.raises(PredictorError, match="no values for the requested features"):
        Predictor("rf", features=["bits_per_element", "sharpness_random"], **SMALL_TREES).fit(
            runs.drop(columns=["sharpness_random"]))
    with pytest.raises(PredictorError, match="not fitted"):
        Predictor("ols").predict(runs)
    with pytest.raises(PredictorError, match="no finished runs"):
        Predictor("ols").fit(runs.assign(status="failed"))


# ---- what each kind sees ------------------------------------------------------------------------------------------
def test_paper_and_bits_use_only_their_inputs(runs, fitted):
    paper, bits = fitted["paper"], fitted["bits"]
    assert paper.features == DEFAULT_FEATURES["paper"] == (
        "n_params_nonembed", "fp_calib_nll", "rtn_sqnr_db", "bits_per_element", "element_is_fp")
    assert bits.features == ("bits_per_element",)
    assert paper.design.columns == DEFAULT_FEATURES["paper"] and not paper.design.categories
    test = done(runs).head(25)
    scrambled = test.copy()
    others = [c for c in test.columns if c not in DEFAULT_FEATURES["paper"] and c != "ppl_fp"]
    rng = np.random.default_rng(0)
    for c in others:  # permuting every other column (other features, method, model) changes nothing
        scrambled[c] = rng.permutation(scrambled[c].to_numpy())
    pd.testing.assert_frame_equal(paper.predict(test), paper.predict(scrambled))
    pd.testing.assert_frame_equal(paper.predict(test), paper.predict(test[list(DEFAULT_FEATURES["paper"])
                                                                         + ["ppl_fp"]]))


def test_ols_recovers_the_law_and_covers_90_percent():
    """Known law, Gaussian log-space noise sigma = 0.3, negligible measurement noise: the OLS form contains the law,
    so its coefficients come back and statsmodels' 90% prediction intervals cover ~90% of unseen models' runs."""
    train = synthetic_runs(16, sigma=0.3, delta_se=1e-9, seed=0)
    test = done(synthetic_runs(30, sigma=0.3, delta_se=1e-9, seed=1))
    p = Predictor("ols").fit(train)
    params = p.engine.result.params
    assert abs(params["log_quad_delta_h_delta"] - LAW_QUAD) < 0.1
    assert abs(params["element_is_fp"] - LAW_FP) < 0.1
    assert abs(np.sqrt(p.engine.result.scale) - 0.3) < 0.03
    out = p.predict(test)
    d = test["nll_quant"] - test["nll_fp"]
    cover = ((out["delta_low"] <= d) & (d <= out["delta_high"])).mean()
    assert 0.85 <= cover <= 0.95, cover
    assert "OLS Regression Results" in p.summary()


def test_conformal_interval_covers_90_percent():
    train = synthetic_runs(16, sigma=0.3, delta_se=1e-9, seed=0)
    test = done(synthetic_runs(30, sigma=0.3, delta_se=1e-9, seed=2))
    p = Predictor("rf", n_estimators=40, features=["quad_delta_h_delta", "element_is_fp", "n_params_nonembed"]
                  ).fit(train)
    out = p.predict(test)
    d = test["nll_quant"] - test["nll_fp"]
    cover = ((out["delta_low"] <= d) & (d <= out["delta_high"])).mean()
    assert 0.85 <= cover <= 0.95, cover


def test_conformal_quantile_by_hand():
    r = np.arange(1, 20, dtype=float)  # n = 19: ceil(20 * 0.9) = 18th smallest
    assert conformal_quantile(r, 0.1) == 18.0
    assert conformal_quantile(np.array([1.0, 2.0]), 0.1) == float("inf")  # too few to certify 90%


# ---- validation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", ["model", "family"])
def test_group_splits_never_leak(runs, groups):
    seen = []
    for held, tr, te in group_splits(runs, groups):
        assert set(runs.loc[te, groups]) == {held}
        assert held not in set(runs.loc[tr, groups])
        assert len(tr) + len(te) == len(runs)
        seen.append(held)
    assert sorted(seen) == sorted(runs[groups].unique())


def test_validate_fits_without_the_held_out_group(runs, monkeypatch):
    calls = []
    orig = Predictor.fit

    def spy(self, df):
        calls.append(set(df["family"]))
        return orig(self, df)

    monkeypatch.setattr(Predictor, "fit", spy)
    v = validate(runs, kinds=["bits"], groups="family")
    assert len(calls) == runs["family"].nunique()
    preds = v.predictions
    for fam_train, (held, sub) in zip(calls, preds.groupby("held_out")):
        assert held not in fam_train and set(sub["family"]) == {held}
    assert preds.index.is_unique and len(preds) == len(done(runs))


def test_validate_metrics_and_baseline_ranking(runs):
    metrics, preds = validate(runs, kinds=["ols", "bits", "paper"], groups=["family"],
                              predictor_params={"paper": SMALL_TREES})
    assert list(metrics["kind"]) == ["ols", "bits", "paper"]
    by = metrics.set_index("kind")
    assert (by["n_runs"] == len(done(runs))).all() and (by["n_failed_runs"] == 0).all()
    assert by.loc["ols", "median_rel_error_resolved"] < 0.8 * by.loc["paper", "median_rel_error_resolved"]
    assert by.loc["ols", "r2"] > by.loc["bits", "r2"]
    # the table is exactly delta_metrics of the stored predictions
    sub = preds[preds["kind"] == "ols"]
    assert delta_metrics(sub)["r2"] == by.loc["ols", "r2"]


def test_delta_metrics_by_hand():
    p = pd.DataFrame({
        "model": ["a", "a", "a", "b", "b", "b"],
        "delta": [0.01, 0.02, 0.04, 0.1, 0.2, 0.4],
        "delta_nll": [0.011, 0.018, 0.05, 0.1, 0.3, 0.2],
        "delta_low": [0.0, 0.0, 0.0, 0.2, 0.0, 0.0],
        "delta_high": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        "delta_nll_se": [0.011] * 6,
        "ppl_quant": [10.0, 10.0, 10.0, 20.0, 20.0, 20.0],
        "ppl": [11.0, 10.0, 9.0, 20.0, 22.0, 20.0],
    })
    m = delta_metrics(p)
    d, dh = p["delta"].to_numpy(), p["delta_nll"].to_numpy()
    assert m["r2"] == pytest.approx(1 - np.sum((dh - d) ** 2) / np.sum((d - d.mean()) ** 2))
    rel = [0.1, 0.1, 0.25, 0.0, 0.5, 0.5]
    assert m["median_rel_error"] == pytest.approx(np.median(rel))
    assert m["median_rel_error_resolved"] == pytest.approx(np.median(rel[2:]))  # |delta| > 0.022 only
    # model a ranks perfectly (rho 1); model b: predicted order (0.1, 0.3, 0.2) vs (0.1, 0.2, 0.4): rho 0.5
    assert m["spearman_within_model"] == pytest.approx(0.75)
    assert m["coverage"] == pytest.approx(5 / 6)  # run 4's measured 0.1 is below its interval
    assert m["median_rel_ppl_error"] == pytest.approx(np.median([0.1, 0.0, 0.1, 0.0, 0.1, 0.0]))


def test_subsample_curve_and_crossover_by_hand():
    rng = np.random.default_rng(0)
    runs = [rng.normal(0.01, 0.02, 64) for _ in range(5)]
    c = subsample_curve(runs, window_seconds=0.5, ks=[1, 4, 64])
    full = np.array([r.mean() for r in runs])
    one = np.array([r[0] for r in runs])
    assert c.loc[0, "median_rel_error"] == pytest.approx(np.median(np.abs(one - full) / np.abs(full)))
    assert c.loc[2, "median_rel_error"] == 0.0  # all windows = the measured delta
    assert list(c["seconds"]) == [0.5, 2.0, 32.0]
    curve = pd.DataFrame({"seconds": [1.0, 10.0, 100.0], "median_rel_error": [0.8, 0.4, 0.1]})
    x = crossover(curve, predictor_error=0.2, predictor_seconds=10.0)
    assert x["subsample_error_at_equal_cost"] == pytest.approx(0.4) and x["predictor_better_at_equal_cost"]
    # 0.2 lies 2/3 of the way from 0.4 (10 s) to 0.1 (100 s) in log-seconds
    assert x["crossover_seconds"] == pytest.approx(10 ** (1 + 2 / 3))
    assert np.isnan(crossover(curve, 0.01, 5.0)["crossover_seconds"])
    with pytest.raises(PredictorError):
        subsample_curve([np.ones(4)], 1.0, ks=[8])


def test_import_quantpredict_stays_light():
    code = "import sys, quantpredict; assert callable(quantpredict.predict_quality) or True; " \
           "print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", "import sys, quantpredict; print('torch' in sys.modules, "
                          "'sklearn' in sys.modules, 'statsmodels' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"], (code, out.stdout)


def test_store_subsample_curve_reads_window_deltas_and_charges_quantization():
    import json

    runs = pd.DataFrame({
        "status": ["done", "done", "failed", "done"],
        "window_delta_nll": [json.dumps([0.1, 0.3, 0.2, 0.2]), json.dumps([1.0, 1.0, 2.0, 0.0]), None, None],
        "eval_windows": [4, 4, 4, 4], "eval_seconds": [2.0, 4.0, 1.0, 1.0],
        "run_quantize_seconds": [1.0, 3.0, 0.0, 0.0],
    })
    c = store_subsample_curve(runs, ks=[1, 2, 4]).set_index("k")
    # run 1: delta 0.2, prefixes 0.1 / 0.2 / 0.2; run 2: delta 1.0, prefixes 1.0 / 1.0 / 1.0
    assert c.loc[1, "median_rel_error"] == pytest.approx(np.median([0.5, 0.0]))
    assert c.loc[2, "median_rel_error"] == pytest.approx(0.0) and c.loc[4, "n_runs"] == 2
    # seconds: quantize + k windows at eval_seconds / eval_windows (0.5 s and 1.0 s): medians of (1.5, 4) etc.
    assert c.loc[1, "seconds"] == pytest.approx(np.median([1.0 + 0.5, 3.0 + 1.0]))
    assert c.loc[4, "seconds"] == pytest.approx(np.median([1.0 + 2.0, 3.0 + 4.0]))
    assert store_subsample_curve(runs.drop(columns="window_delta_nll")) is None


def test_limits_section_numbers_by_hand():
    from quantpredict.report.validation import limits_section

    pred = pd.DataFrame({"kind": "gbm", "model": ["a", "a", "b", "b"],
                         "delta": [0.001, 0.02, 0.0005, 0.05], "delta_nll": [0.002, 0.022, 0.0004, 0.045],
                         "delta_nll_se": [0.001, 0.001, 0.0005, 0.001]})
    text = "\n".join(limits_section(pred, "gbm"))
    # SE/|delta| = 1, 0.05, 1, 0.02 -> median 52%; unresolved: runs 1 and 3 -> 50%
    assert "a median 52% of delta" in text and "50% of the runs" in text
    # resolved runs 2 and 4: rel errors 10% and 10%; both lose > 0.01 nats
    assert "resolved runs the median relative error is 10.0%" in text and "it is 10.0%" in text
    assert "cover 2 models" in text
    assert limits_section(pred.assign(delta_nll=np.nan), "gbm") == []
