"""The training-tokens study's law fits, on synthetic runs generated from a known law."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from quantpredict.studies.training_tokens import base_of, fit_ouyang, law_predict, study_frame


def _runs(beta=0.8, alpha=0.3, gamma=5.0, log_k=2.0, noise=0.0, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for n in (1e5, 3e5, 1e6):
        for tpp in (3, 10, 30, 100, 300):
            for p in (2, 3, 4, 6, 8):
                d = tpp * n
                y = np.exp(log_k + beta * np.log(d) - alpha * np.log(n) - gamma * np.log(p) + noise * rng.normal())
                rows.append({"model": f"m{int(n)}-d{tpp}", "tokens_per_param": tpp, "n_params_nonembed": n, "P": p,
                             "kld": y, "delta": y, "delta_nll_se": y / 100})
    return pd.DataFrame(rows)


def test_ouyang_form_recovers_the_exponents_it_was_generated_with():
    f = fit_ouyang(_runs(), "kld")
    assert f["beta"] == pytest.approx(0.8, abs=1e-9) and f["alpha"] == pytest.approx(0.3, abs=1e-9)
    assert f["gamma"] == pytest.approx(5.0, abs=1e-9) and f["r2"] == pytest.approx(1.0)


def test_ratio_form_is_the_alpha_equals_beta_case_and_predicts_through_law_predict():
    df = _runs(beta=0.7, alpha=0.7)
    f = fit_ouyang(df, "delta", form="ratio")
    assert f["beta"] == pytest.approx(0.7, abs=1e-9) and f["alpha"] == f["beta"]
    pred = law_predict(f, df["tokens_per_param"] * df["n_params_nonembed"], df["n_params_nonembed"], df["P"])
    np.testing.assert_allclose(pred, df["delta"], rtol=1e-9)


def test_noisy_fit_reports_standard_errors_that_cover_the_truth():
    f = fit_ouyang(_runs(noise=0.3, seed=1), "kld")
    assert abs(f["beta"] - 0.8) < 3 * f["beta_se"] and abs(f["gamma"] - 5.0) < 3 * f["gamma_se"]


def test_unresolved_deltas_and_too_few_runs_are_left_out():
    df = _runs()
    df["delta_nll_se"] = df["delta"]  # nothing above 2 SE
    assert fit_ouyang(df, "delta") == {"n": 0, "form": "ouyang"}
    with pytest.raises(ValueError, match="form"):
        fit_ouyang(df, "kld", form="power")


def test_study_frame_keeps_the_default_block_weight_only_runs_of_the_bases():
    assert base_of("llama-xs-d300") == "llama-xs" and base_of("llama-xs") == "llama-xs"
    assert base_of("smollm2-135m") == "smollm2-135m"
    runs = pd.DataFrame({"model": ["llama-xs", "llama-xs-d30", "llama-xs-d30", "opt-s"], "status": "done",
                         "act_format": [None, None, "mxint8", None], "smoothquant_alpha": None,
                         "recipe_block_size": None, "weight_format": "mxint4", "nll_quant": 2.0, "nll_fp": 1.5})
    df = study_frame(runs, ["llama-xs"])
    assert list(df["model"]) == ["llama-xs", "llama-xs-d30"] and (df["P"] == 4).all() and (df["delta"] == 0.5).all()
