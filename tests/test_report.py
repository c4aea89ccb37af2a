"""The report: its tables (hand-checked), permutation importance (a known law), and the whole ``quantpredict report``
rendered from a small synthetic run store (every figure a valid PNG, every figure on the page)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from synthetic import synthetic_runs

from quantpredict.cli import main
from quantpredict.errors import StoreError
from quantpredict.report import FIGURES, finished, pareto_frontier, permutation_importance
from quantpredict.report.build import VALIDATION_PAGE
from quantpredict.report.figures import _number
from quantpredict.report.style import family_colors

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FORMATS = ("mxint8", "mxint4", "mxint3", "mxfp4_e2m1", "int4", "int8")


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    return synthetic_runs(n_models=4, formats=FORMATS, block_sizes=(32,), n_failed=2, seed=1)


def assert_png(path):
    import matplotlib.image as mpimg

    assert path.is_file(), f"{path} missing"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01, f"{path} is blank"


# ---- tables -----------------------------------------------------------------------------------------------------
def test_pareto_frontier_hand_example():
    df = pd.DataFrame({"x": [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, np.nan],
                       "y": [10.0, 12.0, 8.0, 9.0, 5.0, 5.0, 1.0]}, index=list("abcdefg"))
    # a: smallest; b: same x as c but worse; c beats a; d worse than c; e beats c; f ties e (not strictly better)
    assert list(pareto_frontier(df, "x", "y").index) == ["a", "c", "e"]
    assert pareto_frontier(df.iloc[:0], "x", "y").empty


def test_finished_derives_bits_kind_and_bytes():
    df = pd.DataFrame({
        "model": ["m", "m", "m", "m", "m"], "family": ["llama"] * 5, "n_params": [2e6] * 5,
        "weight_format": ["mxint4", "mxint4", "int4", "fp8_e4m3", "mxfp4_e2m1"],
        "block_size": [None, 128, None, None, 32], "act_format": [None, None, None, "mxint8", None],
        "nll_fp": [3.0] * 5, "nll_quant": [3.1, 3.05, np.nan, 3.01, 3.2], "status": ["done"] * 4 + ["failed"],
        "n_params_nonembed": [1e6] * 5, "bits_per_element": [np.nan, np.nan, np.nan, np.nan, np.nan],
    })
    d = finished(df)
    assert list(d.index) == [0, 1, 3]  # NaN delta and failed runs dropped
    np.testing.assert_allclose(d["delta"], [0.1, 0.05, 0.01], atol=1e-12)
    # MX: 4 element bits + one 8-bit scale per block (32 by default, 128 given); FP8 per channel: 8 bits
    np.testing.assert_allclose(d["bits"], [4 + 8 / 32, 4 + 8 / 128, 8.0])
    assert list(d["format_kind"]) == ["MXINT", "MXINT", "FP8 (per channel)"]
    np.testing.assert_allclose(d["weight_mb"], 1e6 * d["bits"] / 8 / 1e6)
    assert list(d["weight_only"]) == [True, True, False]
    # a measured bits_per_element feature wins over the format table
    df.loc[0, "bits_per_element"] = 4.5
    assert finished(df)["bits"].iloc[0] == 4.5


def test_tick_numbers_and_family_colours():
    assert [_number(v) for v in (0.02, 150, 2000, 30000, 2e7, 1e-5, 0)] == ["0.02", "150", "2000", "30k", "20M",
                                                                          "1e-05", "0"]
    c = family_colors(["opt", "llama", "zzz", "aaa"])
    assert c["llama"] == "tab:blue" and c["opt"] == "tab:orange"
    assert len({c["zzz"], c["aaa"], c["llama"], c["opt"]}) == 4
    assert family_colors(["llama"])["llama"] == c["llama"]  # the same colour whatever else is in the figure


# ---- permutation importance -------------------------------------------------------------------------------------
def test_permutation_importance_finds_the_law():
    """Delta follows 0.5 * quad_delta_h_delta exactly and rtn_rel_weight_error is independent noise: shuffling the
    law's feature must raise the held-out error, the noise feature's not at all, and only the seed matters."""
    runs = synthetic_runs(n_models=8, formats=FORMATS, block_sizes=(32,), n_failed=0, seed=2)
    rng = np.random.default_rng(0)
    runs["rtn_rel_weight_error"] = rng.uniform(0.01, 0.2, len(runs))
    runs["nll_quant"] = runs["nll_fp"] + 0.5 * runs["quad_delta_h_delta"]
    runs["delta_nll_se"] = 1e-7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imp = permutation_importance(runs, "ols", n_repeats=2, random_state=0)
        again = permutation_importance(runs, "ols", n_repeats=2, random_state=0)
    pd.testing.assert_frame_equal(imp, again)
    by = imp.set_index("feature")["importance"]
    assert imp.iloc[0]["feature"] == "quad_delta_h_delta" and by["quad_delta_h_delta"] > 1.0
    assert imp.iloc[0]["baseline_error"] < 1e-3  # the law is exact, so the unshuffled held-out error is ~0
    assert abs(by["rtn_rel_weight_error"]) < 1e-3 * by["quad_delta_h_delta"]
    assert (imp["n"] == 4 * 2).all()  # 4 families x 2 shuffles


# ---- the whole report, from a store -----------------------------------------------------------------------------
def _store(path, runs):
    from quantpredict.runs import RunStore

    with RunStore(path) as store:
        for i, row in runs.iterrows():
            store.add({**row.to_dict(), "run_key": f"synthetic|{row['model']}|{row['recipe']}|{i}"})
    return path


def _fake_foreign_results(out):
    """What `quantpredict study ptq-vs-qat` and `quantpredict attention bench` leave in reports/."""
    import matplotlib.image as mpimg

    out.mkdir(parents=True)
    img = np.linspace(0, 1, 200 * 200 * 3).reshape(200, 200, 3)
    for name in ("qat_ppl.png", "qat_misalignment.png", "attention_bench.png"):
        mpimg.imsave(out / name, img)
    (out / "qat.md").write_text("# PTQ vs QAT\n")


def test_report_cli_renders_every_figure_from_a_store(runs, tmp_path, capsys):
    store = _store(tmp_path / "runs.sqlite", runs)
    out = tmp_path / "reports"
    _fake_foreign_results(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["report", "--store", str(store), "--out", str(out), "--kinds", "ols,rf,bits,paper",
                   "--n-estimators", "10", "--repeats", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "best kind (leave-one-family-out)" in printed
    index = (out / "index.md").read_text()
    for name in FIGURES.values():
        assert_png(out / name)
        assert f"]({name})" in index, f"index.md does not embed {name}"
    assert_png(out / VALIDATION_PAGE.with_name("predictors_family.png"))
    assert f"({VALIDATION_PAGE.as_posix()})" in index
    assert "by `quantpredict report`" in (out / VALIDATION_PAGE).read_text()
    for name in ("qat_ppl.png", "qat_misalignment.png", "attention_bench.png"):
        assert f"]({name})" in index
    assert "](qat.md)" in index and "PTQ vs QAT" in index and "Sparse attention" in index
    # one sentence per figure: every embedded image is followed by its text
    blocks = index.split("![")[1:]
    assert all(len(b.split(")", 1)[1].strip()) > 20 for b in blocks)
    assert "48 finished runs of 4 models in 4 families (2 other runs left out)" in index
    assert "leave-one-family-out" in index


def test_report_errors(tmp_path, capsys):
    assert main(["report", "--store", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", "--runs", "x.parquet", "--kinds", "ols,nope", "--out", str(tmp_path / "r")]) == 2
    assert "unknown kinds ['nope']" in capsys.readouterr().err
    from quantpredict.report import render_report

    failed = synthetic_runs(n_models=2, formats=("mxint4",), block_sizes=(32,), n_failed=0)
    failed["status"] = "failed"
    with pytest.raises(StoreError, match="no finished runs"):
        render_report(failed, tmp_path / "r")


def test_allocation_checks_compare_with_the_uniform_recipe_whose_bits_were_the_budget():
    import pandas as pd

    from quantpredict.studies.rank_report import allocation_checks, rank_checks

    uniform = pd.DataFrame({"model": "m", "method": "rtn", "recipe": ["mxint6-rtn", "mxint4-rtn", "int8-rtn"],
                            "bits_per_element": [6.2526, 4.2526, 8.1], "kld": [2e-4, 5e-3, 1e-5],
                            "kld_se": [1e-6, 1e-5, 1e-7]}, index=[10, 11, 12])
    alloc = pd.DataFrame({"model": "m", "method": "rtn", "recipe": ["mix6"], "bits_per_element": [6.237],
                          "kld": [1.9e-4], "kld_se": [1e-6]})
    rows = allocation_checks(alloc, uniform, {"m": {"rtn@mxint6": {"recipe": "mix6", "budget": 6.2526}}})
    # the allocation landed 0.016 bits under its budget: it still competes with mxint6, not with mxint4
    assert rows.loc[0, "best_uniform"] == "mxint6-rtn" and bool(rows.loc[0, "below"]) and rows.loc[0, "below_2se"]
    preds = pd.DataFrame({"kld": [3e-4, 1e-3, 1e-6]}, index=[10, 11, 12])  # predicted KLDs, same order as truth
    r = rank_checks(uniform, preds.assign(model="m"), budgets=(6.5, 8.5))
    assert list(r["recommended"]) == ["mxint6-rtn", "int8-rtn"] and r["within_2se"].all()


def test_sweep_setting_runs_keeps_each_models_own_window_count():
    import pandas as pd

    from quantpredict.runs.table import sweep_setting_runs

    runs = pd.DataFrame({"model": ["a", "a", "a", "b", "b"], "eval_windows": [128, 128, 64, 256, 256]})
    kept, left_out = sweep_setting_runs(runs)
    assert left_out == 1 and list(kept.index) == [0, 1, 3, 4]


def test_sweep_setting_runs_keeps_a_recipe_measured_on_more_windows_once():
    """A recipe re-measured on more windows than the sweep (for its standard error) replaces its sweep-sized run; a
    recipe measured only on more windows stays; a rehearsal on fewer windows and an exact repeat go."""
    import pandas as pd

    from quantpredict.runs.table import sweep_setting_runs

    runs = pd.DataFrame({"model": ["q"] * 6 + ["s", "s"], "recipe": ["r1", "r2", "g", "g", "w", "w2", "r1", "r1"],
                         "eval_windows": [32, 32, 32, 64, 8, 64, 128, 128]})
    kept, left_out = sweep_setting_runs(runs)
    assert list(kept.index) == [0, 1, 3, 5, 6] and left_out == 3
