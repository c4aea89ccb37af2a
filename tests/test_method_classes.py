"""Method classes (``predict.classes``), the predictor's per-class interval widths, and per-class validation."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from quantpredict.predict.classes import METHOD_CLASSES, method_class, method_classes
from quantpredict.predict.physics import MIN_CLASS_RUNS, LogLaw, OutOfRangeWarning, PhysicsPredictor, conformal_quantile


@pytest.mark.parametrize("run, expected", [
    ({"recipe": "mxint4-rtn", "method": "rtn"}, "RTN"),
    ({"recipe": "mxint4-gptq", "method": "gptq"}, "GPTQ"),
    ({"recipe": "mxint4-qat_gptq", "method": "qat_gptq"}, "GPTQ"),
    ({"recipe": "int4-rtn-awq", "method": "rtn"}, "AWQ"),
    ({"recipe": "int4-gptq-awq", "method": "gptq"}, "AWQ"),
    # q4_k_m on a model whose rows no 256-block tiles: its fallbacks and 16-bit layers are still llama.cpp's
    ({"recipe": "q4_k-rtn-L=q5_0*6,fp16,q5_0*2,q8_0,q4_k", "method": "rtn"}, "named mix"),
    ({"recipe": "q4_k-rtn-L=q5_0*2,q4_k-E=q4_k-H=q6_k", "method": "rtn"}, "named mix"),
    ({"recipe": "mxint2-rtn-L=mxint2*2,mxint3,mxint4_b64", "method": "rtn"}, "allocated mix"),
    ({"recipe": "q4_k-rtn-L=q4_k*2,mxint4", "method": "rtn"}, "allocated mix"),
    # a format this version does not know: the list is read as text, and it is not llama.cpp's
    ({"recipe": "q4_k-rtn-L=q5_0*2,zz_b3", "method": "rtn"}, "allocated mix"),
    ({"recipe": "mxint4-gptq-a_mxint8", "method": "gptq", "act_format": "mxint8"}, "weight+activation"),
    ({"recipe": "mxint4-rtn", "method": "rtn", "act_format": float("nan")}, "RTN"),
    ({"recipe": "mxint4-rtn", "method": "rtn", "act_format": "none"}, "RTN"),
])
def test_method_class_of_each_kind_of_recipe(run, expected):
    assert expected in METHOD_CLASSES
    assert method_class(run) == expected
    assert method_class(pd.Series(run)) == expected


def test_method_classes_of_a_frame_in_row_order():
    runs = pd.DataFrame([{"recipe": "int4-rtn-awq", "method": "rtn", "act_format": None},
                         {"recipe": "mxint4-rtn", "method": "rtn", "act_format": None}], index=[7, 3])
    assert method_classes(runs).tolist() == ["AWQ", "RTN"]
    assert method_classes(runs.iloc[:0]).tolist() == []


def _runs(n_models: int, seed: int, noise: dict[str, float], n_recipes: int = 24) -> pd.DataFrame:
    """Runs whose KLD is 0.9 token_gn_quad^1.02 times log-normal noise of ``noise[method]`` (RTN rows, GPTQ rows):
    the two classes share one law and differ in scatter only."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in range(n_models):
        ent = rng.uniform(3, 5)
        for r in range(n_recipes):
            method = "rtn" if r % 2 else "gptq"
            q = 10 ** rng.uniform(-5, -0.5)
            kld = 0.9 * q**1.02 * np.exp(rng.normal(0, noise[method]))
            delta = 1.2 * kld
            rows.append({"model": f"m{m}", "family": f"f{m % 4}", "recipe": f"mxint{r}-{method}", "status": "done",
                         "method": method, "act_format": None, "element_is_fp": 0.0, "token_gn_quad": q,
                         "token_cross_quad": q * rng.uniform(0.5, 1.5),
                         "kfac_max_layer_share": rng.uniform(0.1, 0.4), "fp_calib_nll": 3.6,
                         "fp_entropy_calib": ent, "nll_fp": 3.5, "nll_quant": 3.5 + delta, "delta_nll_se": delta / 50,
                         "kld": kld, "top1_agree": 1 - 0.8 * np.sqrt(kld), "ppl_fp": np.exp(3.5)})
    return pd.DataFrame(rows)


def test_each_class_gets_the_conformal_width_of_its_own_out_of_fold_residuals():
    noise = {"rtn": 0.02, "gptq": 0.3}
    p = PhysicsPredictor("profile").fit(_runs(10, 0, noise))
    law = p.laws["kld"]
    train = p.usable(_runs(10, 0, noise))
    y = np.log(train["kld"].to_numpy(float))
    resid = np.abs(y - law.oof)
    classes = method_classes(train)
    for c in ("RTN", "GPTQ"):  # the class's own split-conformal quantile, recomputed here
        assert law.q_class[c] == conformal_quantile(resid[classes == c], p.alpha)
    assert law.q == conformal_quantile(resid, p.alpha)
    assert law.q_class["GPTQ"] > 5 * law.q_class["RTN"]  # noise 0.3 against 0.02
    assert law.q_class["RTN"] < law.q < law.q_class["GPTQ"]

    test = _runs(20, 1, noise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfRangeWarning)
        out = p.predict(test)
        one_width = p.predict(test.drop(columns=["recipe"]))  # no recipe: no class, the all-runs width
    kld = test["kld"]
    for method in ("rtn", "gptq"):
        sel = (test["method"] == method).to_numpy()
        cover = np.mean((out["kld_low"][sel] <= kld[sel]) & (kld[sel] <= out["kld_high"][sel]))
        assert 0.8 <= cover <= 0.99, (method, cover)
    # one width for both classes covers the noisy class too rarely (its pooled quantile sits near the noisy class's
    # 80th percentile, the quiet rows never reaching it) and the quiet one always, with an interval 5x too wide
    inside = (one_width["kld_low"] <= kld) & (kld <= one_width["kld_high"])
    assert inside[test["method"] == "gptq"].mean() < 0.88
    assert inside[test["method"] == "rtn"].mean() == 1.0
    assert law.q > 5 * law.q_class["RTN"]
    inside_ranges = (out["out_of_range"] == "").to_numpy()  # rows outside the training ranges are widened
    width = np.log(out["kld_high"] / out["kld_low"]).to_numpy()
    rtn = (test["method"] == "rtn").to_numpy() & inside_ranges
    assert rtn.sum() > 100 and np.allclose(width[rtn], 2 * law.q_class["RTN"])
    assert np.allclose(np.log(one_width["kld_high"] / one_width["kld_low"]).to_numpy()[inside_ranges], 2 * law.q)


def test_a_class_with_too_few_runs_takes_the_all_runs_width():
    runs = _runs(10, 0, {"rtn": 0.05, "gptq": 0.05})
    awq = runs.index[runs["method"] == "gptq"][: MIN_CLASS_RUNS - 1]
    runs.loc[awq, "recipe"] = runs.loc[awq, "recipe"] + "-awq"  # 29 AWQ runs: below MIN_CLASS_RUNS
    law = PhysicsPredictor("profile").fit(runs).laws["kld"]
    assert "AWQ" not in law.q_class and {"RTN", "GPTQ"} <= set(law.q_class)
    assert law.half_widths(np.array(["AWQ", "RTN"], dtype=object), 2).tolist() == [law.q, law.q_class["RTN"]]
    assert law.half_widths(None, 3).tolist() == [law.q] * 3


def test_class_widths_survive_save_and_load_and_older_saves_read_as_one_width(tmp_path):
    from quantpredict.predict import Predictor

    runs = _runs(8, 0, {"rtn": 0.02, "gptq": 0.3})
    p = PhysicsPredictor("profile").fit(runs)
    p.save(tmp_path / "k")
    back = Predictor.load(tmp_path / "k")
    assert back.laws["kld"].q_class == p.laws["kld"].q_class
    pd.testing.assert_frame_equal(back.predict(runs.head(10)), p.predict(runs.head(10)))
    saved = p.laws["kld"].to_json()
    del saved["q_class"]  # a predictor saved before the per-class widths
    assert LogLaw.from_json(saved).q_class == {}


def test_class_metrics_are_the_target_metrics_of_each_class():
    from quantpredict.predict.targets import class_metrics, target_metrics

    runs = _runs(6, 0, {"rtn": 0.05, "gptq": 0.05})
    runs.loc[runs.index[:4], "recipe"] = "int4-rtn-awq"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfRangeWarning)
        pred = PhysicsPredictor("profile").fit(runs).predict(runs)
    pred = pred.assign(kind="profile", split="family")
    cm = class_metrics(runs, pred)
    assert cm["method_class"].tolist() == ["RTN", "GPTQ", "AWQ"]  # METHOD_CLASSES order, empty classes left out
    classes = method_classes(runs)
    for _, row in cm.iterrows():
        sel = classes == row["method_class"]
        expected = target_metrics(runs[sel], pred[sel])
        assert row["n_runs"] == sel.sum()
        assert row["kld_median_rel_err"] == expected["kld_median_rel_err"]
        assert row["kld_coverage"] == expected["kld_coverage"]


def test_awq_rows_are_priced_on_the_cross_layer_base():
    """Runs whose AWQ rows measure 0.9 token_cross_quad^1.02 (their token-wise price 0.5-1.5x off): the fitted law
    predicts them from the cross-layer price; a predictor with one base for every row cannot."""
    from quantpredict.predict.physics import AWQ_BASE_FEATURE

    def runs(seed):
        r = _runs(10, seed, {"rtn": 0.02, "gptq": 0.02})
        awq = r.index[r["method"] == "gptq"]
        r.loc[awq, "recipe"] = r.loc[awq, "recipe"].str.replace("-gptq", "-rtn-awq")
        r.loc[awq, "method"] = "rtn"
        cross = r.loc[awq, "token_cross_quad"]
        r.loc[awq, "kld"] = 0.9 * cross**1.02
        r.loc[awq, "top1_agree"] = 1 - 0.8 * np.sqrt(r.loc[awq, "kld"])
        r.loc[awq, "nll_quant"] = r.loc[awq, "nll_fp"] + 1.2 * r.loc[awq, "kld"]
        return r, awq

    train, _ = runs(0)
    test, awq = runs(1)
    assert AWQ_BASE_FEATURE["profile"] == "token_cross_quad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfRangeWarning)
        p = PhysicsPredictor("profile").fit(train)
        one_base = PhysicsPredictor("profile", awq_base=None).fit(train)
        err = np.abs(p.predict(test)["kld"] / test["kld"] - 1)
        err_one = np.abs(one_base.predict(test)["kld"] / test["kld"] - 1)
    assert p.awq_base == "token_cross_quad" and one_base.awq_base is None
    assert np.median(err[awq]) < 0.05 < np.median(err_one[awq])
    assert np.median(err.drop(awq)) < 0.05
    # an AWQ run without the cross-layer price is not fitted on, and predicting one names the fix
    lacking = train.copy()
    lacking.loc[lacking.index[lacking["recipe"].str.contains("-awq")][:5], "token_cross_quad"] = np.nan
    assert len(PhysicsPredictor("profile").usable(lacking)) == len(train) - 5
    from quantpredict.errors import PredictorError

    with pytest.raises(PredictorError, match="non-finite"):
        p.predict(lacking.loc[lacking["token_cross_quad"].isna()])


def test_the_awq_base_is_saved_and_an_older_save_keeps_one_base(tmp_path):
    import json

    from quantpredict.predict import Predictor

    p = PhysicsPredictor("profile").fit(_runs(8, 0, {"rtn": 0.05, "gptq": 0.05}))
    p.save(tmp_path / "k")
    assert Predictor.load(tmp_path / "k").awq_base == "token_cross_quad"
    meta = json.loads((tmp_path / "k" / "predictor.json").read_text())
    del meta["params"]["awq_base"]  # saved before session 13
    (tmp_path / "k" / "predictor.json").write_text(json.dumps(meta))
    assert Predictor.load(tmp_path / "k").awq_base is None
    assert PhysicsPredictor("physics").awq_base is None  # the exact quadratic has the cross-layer terms already
