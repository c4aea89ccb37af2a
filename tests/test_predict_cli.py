"""``quantpredict fit`` / ``quantpredict predict`` and ``predict_quality`` (feature extraction monkeypatched where the
test is about the plumbing; one real extraction on a tiny model)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_model
from synthetic import synthetic_runs

import quantpredict
from quantpredict.cli import main
from quantpredict.errors import PredictorError
from quantpredict.predict import Prediction, Predictor, predict_quality
from quantpredict.quantize import Recipe
from quantpredict.schema import FEATURE_NAMES, TIMING_NAMES


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    return synthetic_runs(6, seed=0)


@pytest.fixture(scope="module")
def ols(runs) -> Predictor:
    return Predictor("ols").fit(runs)


def fake_extract(runs: pd.DataFrame, calls: list):
    """features.extract stand-in: the synthetic features of llama-00 for the recipe's format and method."""

    def extract(model, recipe, calib_ids, *, seed=0, which=None, **overrides):
        calls.append({"which": which, "recipe": recipe, "n_ids": int(calib_ids.numel())})
        row = runs[(runs["model"] == "llama-00") & (runs["weight_format"] == recipe.weight_format)
                   & (runs["method"] == recipe.method) & (runs["status"] == "done")].iloc[0]
        return {k: float(row[k]) for k in FEATURE_NAMES + TIMING_NAMES if k in row and pd.notna(row[k])}

    return extract


def test_predict_quality_with_patched_features(runs, ols, monkeypatch):
    calls = []
    monkeypatch.setattr("quantpredict.features.extract", fake_extract(runs, calls))
    ids = torch.arange(3, 300)
    recipe = Recipe(weight_format="mxint4", method="gptq")
    pr = quantpredict.predict_quality(tiny_model("llama"), recipe, ols, calib_ids=ids, ppl_fp="predicted")
    assert isinstance(pr, Prediction)
    assert calls[0]["which"] == list(ols.required_groups) == ["model", "format", "noise", "landscape"]
    assert pr.recipe == recipe.label and pr.predictor_kind == "ols" and pr.ppl_fp_source == "predicted"
    assert pr.ppl_low <= pr.ppl <= pr.ppl_high and pr.delta_low <= pr.delta_nll <= pr.delta_high
    assert set(pr.features) <= set(FEATURE_NAMES) and "quad_delta_h_delta" in pr.features
    assert pr.seconds > 0 and set(pr.feature_seconds) <= set(TIMING_NAMES)
    # the same numbers as Predictor.predict on the synthetic run row (FP perplexity predicted in both)
    row = runs[(runs["model"] == "llama-00") & (runs["recipe"] == "mxint4-b32-gptq")].drop(columns=["ppl_fp"])
    ref = ols.predict(row).iloc[0]
    assert pr.delta_nll == pytest.approx(ref["delta_nll"], rel=1e-12)
    assert pr.ppl == pytest.approx(ref["ppl"], rel=1e-12)
    measured = predict_quality(tiny_model("llama"), recipe, ols, calib_ids=ids, ppl_fp=50.0)
    assert measured.ppl_fp_source == "--ppl-fp" and measured.ppl == pytest.approx(50 * np.exp(pr.delta_nll))
    with pytest.raises(PredictorError, match="tokenizer"):  # nothing to measure the FP perplexity with
        predict_quality(tiny_model("llama"), recipe, ols, calib_ids=ids)
    json.dumps(pr.to_dict())  # serialisable for --json
    seen = predict_quality(tiny_model("llama"), recipe, ols, calib_ids=ids, model_name="llama-00", ppl_fp=50.0)
    assert seen.model == "llama-00" and seen.eval_seconds is None  # synthetic runs carry no eval_seconds
    timed = Predictor("bits").fit(runs.assign(eval_seconds=np.where(runs["model"] == "llama-00", 12.0, 30.0)))
    assert predict_quality(tiny_model("llama"), recipe, timed, calib_ids=ids, model_name="llama-00", ppl_fp=50.0
                           ).eval_seconds == 12.0


def test_predict_quality_errors(ols, monkeypatch, tmp_path):
    from quantpredict.predict import shipped

    monkeypatch.setattr(shipped, "PROFILE_PREDICTOR_DIR", tmp_path / "nothing")
    monkeypatch.setattr(shipped, "PHYSICS_PREDICTOR_DIR", tmp_path / "nothing")
    with pytest.raises(PredictorError, match="no default predictor.*quantpredict fit.*--kind profile"):
        predict_quality(tiny_model("llama"), Recipe(weight_format="mxint4"))
    with pytest.raises(PredictorError, match="no physics predictor.*--kind physics"):
        predict_quality(tiny_model("llama"), Recipe(weight_format="mxint4"), "physics")
    with pytest.raises(PredictorError, match="tokenizer"):
        predict_quality(tiny_model("llama"), Recipe(weight_format="mxint4"), ols)
    with pytest.raises(PredictorError, match="not a saved predictor"):
        predict_quality(tiny_model("llama"), Recipe(weight_format="mxint4"), tmp_path)


def test_fit_cli_writes_predictor_report_and_figure(runs, tmp_path, capsys):
    path = tmp_path / "runs.csv"
    runs.to_csv(path, index=False)
    out, report = tmp_path / "pred", tmp_path / "reports" / "predictors.md"
    rc = main(["fit", "--runs", str(path), "--kind", "ols", "--out", str(out), "--validate", "--kinds",
               "ols,bits", "--groups", "family", "--report", str(report)])
    assert rc == 0
    text = report.read_text()
    assert "Leave-one-family-out" in text and "| ols |" in text and "| bits |" in text and "Targets" in text
    png = report.with_name("predictors_family.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = Predictor.load(out)
    assert p.kind == "ols" and p.metadata["validation"][0]["kind"] == "ols"
    assert p.metadata["validation"][0]["groups"] == "family"
    assert "saved to" in capsys.readouterr().out


def test_fit_cli_subsample_section(runs, tmp_path):
    path = tmp_path / "runs.parquet"
    runs.to_parquet(path)
    rng = np.random.default_rng(0)
    sub = tmp_path / "windows.json"
    sub.write_text(json.dumps({"window_seconds": 0.5,
                               "window_deltas": [rng.normal(0.01, 0.02, 32).tolist() for _ in range(4)]}))
    report = tmp_path / "r" / "predictors.md"
    assert main(["fit", "--runs", str(path), "--kind", "bits", "--out", str(tmp_path / "p"), "--validate",
                 "--kinds", "bits", "--groups", "family", "--report", str(report), "--subsample", str(sub)]) == 0
    text = report.read_text()
    assert "first k test windows" in text and "at equal cost" in text
    assert report.with_name("predictors_subsample.png").is_file()


def test_fit_from_a_run_store(tmp_path):
    """The run store's real export (fake run results): recipe_block_size, None act_format, every column type."""
    from quantpredict.runs import RunStore, collect

    store = tmp_path / "runs.sqlite"
    collect(["m1", "m2", "m3"], ["mxint4", "mxint8", "int4", "mxint3"], ["rtn", "gptq"], store=store,
            run_fn="quantpredict.runs.fake:fake_run", identify=None, progress=False)
    assert main(["fit", "--store", str(store), "--kind", "ols", "--out", str(tmp_path / "p")]) == 0
    p = Predictor.load(tmp_path / "p")
    frame = RunStore(store).to_frame()
    out = p.predict(frame)
    assert out.index.equals(frame.index) and np.isfinite(out["ppl"]).all()


def test_fit_cli_errors(tmp_path, capsys):
    assert main(["fit", "--runs", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_cli_json_and_table(runs, ols, tmp_path, monkeypatch, capsys, tokenizer):
    d = ols.save(tmp_path / "pred")
    calls = []
    monkeypatch.setattr("quantpredict.features.extract", fake_extract(runs, calls))
    monkeypatch.setattr("quantpredict.models.load", lambda name, **kw: (tiny_model("llama"), tokenizer))
    monkeypatch.setattr("quantpredict.models.check_model_dir", lambda name, **kw: name)  # "tiny" is not on disk
    monkeypatch.setattr("quantpredict.data.token_ids", lambda tok, name="wikitext2", split="test":
                        torch.arange(3, 200) if split == "train" else pytest.fail("test split used for calibration"))
    monkeypatch.setattr("quantpredict.predict.fp_reference._time_forward", lambda model, tok: (0.01, 100))
    rc = main(["predict", "tiny", "--format", "mxint4,mxint8", "--method", "rtn", "--predictor", str(d), "--json",
               "--ppl-fp", "50"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["recipe"] for r in res] == ["mxint4-rtn", "mxint8-rtn"]
    assert res[0]["delta_nll"] > res[1]["delta_nll"]  # 4 bits lose more than 8
    assert res[0]["model"] == "tiny" and res[0]["eval_seconds"] is None  # not a training model
    assert res[0]["ppl_fp"] == pytest.approx(50.0) and res[0]["ppl_fp_source"] == "--ppl-fp"
    assert res[0]["full_eval_seconds"] == pytest.approx(2.0)  # 0.01 s per window x 100 windows x 2
    assert main(["predict", "tiny", "--format", "mxint4", "--predictor", str(d), "--ppl-fp", "50"]) == 0
    table = capsys.readouterr().out
    assert "mxint4-rtn" in table and "interval" in table and "FP perplexity 50.00 (given with --ppl-fp" in table
    assert "~2 s (estimated" in table


def test_predict_cli_missing_predictor(tmp_path, capsys):
    assert main(["predict", "tiny", "--format", "mxint4", "--predictor", str(tmp_path / "none")]) == 2
    assert "no predictor at" in capsys.readouterr().err


@pytest.mark.e2e  # in CI: about a second
def test_predict_quality_real_features_tiny_model(runs, ols):
    """The real features.extract on a tiny random Llama, through the OLS predictor fitted on synthetic runs."""
    ids = torch.randint(3, 320, (2000,), generator=torch.Generator().manual_seed(0))
    pr = predict_quality(tiny_model("llama"), Recipe(weight_format="mxint4", method="rtn"), ols, calib_ids=ids,
                         extract_options={"n_windows": 2, "seq_len": 32}, ppl_fp="predicted")
    assert np.isfinite([pr.ppl, pr.ppl_low, pr.ppl_high, pr.delta_nll]).all()
    assert set(pr.features) >= set(ols.features)


def test_fit_cli_feature_groups_restrict_what_predict_computes(runs, tmp_path, capsys):
    path = tmp_path / "runs.parquet"
    runs.to_parquet(path)
    assert main(["fit", "--runs", str(path), "--kind", "ols", "--out", str(tmp_path / "p"),
                 "--feature-groups", "model,format,noise"]) == 0
    p = Predictor.load(tmp_path / "p")
    assert set(p.required_groups) <= {"model", "format", "noise"}
    assert main(["fit", "--runs", str(path), "--kind", "ols", "--out", str(tmp_path / "q"),
                 "--feature-groups", "model,sharpness"]) == 2  # the exit status of every user error
    assert "unknown feature group" in capsys.readouterr().err


def test_fit_cli_subsample_from_the_runs_own_window_deltas(runs, tmp_path):
    rng = np.random.default_rng(1)
    frame = runs.copy()
    done = frame.index[frame["status"] == "done"][:30]
    delta = frame.loc[done, "nll_quant"] - frame.loc[done, "nll_fp"]
    frame["window_delta_nll"] = None
    frame.loc[done, "window_delta_nll"] = [json.dumps((d + rng.normal(0, 0.01, 16)).tolist()) for d in delta]
    frame.loc[done, ["eval_windows", "eval_seconds", "run_quantize_seconds"]] = [16, 8.0, 1.0]
    path = tmp_path / "runs.parquet"
    frame.to_parquet(path)
    report = tmp_path / "r" / "predictors.md"
    assert main(["fit", "--runs", str(path), "--kind", "bits", "--out", str(tmp_path / "p"), "--validate",
                 "--kinds", "bits,ols", "--groups", "family", "--report", str(report)]) == 0
    text = report.read_text()
    assert "covers the 30 runs that stored per-window deltas" in text and "at equal cost" in text
    assert report.with_name("predictors_subsample.png").is_file()
