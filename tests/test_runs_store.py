"""The run store: round trip, public column order, refusing foreign files untouched, concurrent writers."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import sqlite3

import pandas as pd
import pytest

from quantpredict.errors import StoreError
from quantpredict.recipe import EvalSetting, Recipe
from quantpredict.runs import PUBLIC_COLUMNS, SCHEMA_VERSION, RunSpec, RunStore, run_one
from quantpredict.runs.fake import fake_run
from quantpredict.schema import FEATURE_NAMES, TIMING_NAMES


def _spec(model="m", fmt="mxint4", method="rtn", **kw) -> RunSpec:
    return RunSpec(model=model, weight_format=fmt, method=method, seq_len=64, eval_max_windows=4, **kw)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_record_and_frame(tmp_path):
    spec = _spec(block_size=128, smoothquant_alpha=0.5, act_format="mxint8", model_id="m@abc")
    outcome = run_one(spec, fake_run)
    with RunStore(tmp_path / "runs.sqlite") as store:
        assert store.record(spec, outcome)
        assert store.done_keys() == {spec.key} and len(store) == 1
        df = store.to_frame()
    expected = fake_run(spec)
    row = df.iloc[0]
    assert row["run_key"] == spec.key and row["model"] == "m" and row["model_id"] == "m@abc"
    assert row["recipe"] == spec.label and row["status"] == "done" and pd.isna(row["error"])
    assert (row["weight_format"], row["method"], row["act_format"]) == ("mxint4", "rtn", "mxint8")
    assert row["recipe_block_size"] == 128 and row["smoothquant_alpha"] == 0.5
    cmp = expected["comparison"]
    for col in ("ppl_fp", "ppl_quant", "nll_fp", "nll_quant", "delta_nll", "delta_nll_se", "kld", "top1_agree"):
        assert row[col] == pytest.approx(cmp[col], rel=1e-12)
    assert row["eval_tokens"] == cmp["eval_tokens"] and row["eval_windows"] == cmp["windows"]
    assert row["family"] == "fake" and row["n_params"] == expected["n_params"]
    for name in FEATURE_NAMES:  # every feature in its own column, value preserved exactly
        assert row[name] == pytest.approx(expected["features"][name], rel=1e-12), name
    assert row["git_commit"] == outcome["provenance"]["git_commit"]
    prov = json.loads(row["provenance"])
    assert prov["host"] and prov["packages"]["quantpredict"]
    assert row["started_at"] <= row["finished_at"] and row["seconds"] >= 0


def test_public_columns_first_then_features_in_schema_order(tmp_path):
    with RunStore(tmp_path) as store:  # a directory gets runs.sqlite inside
        assert store.path == tmp_path / "runs.sqlite"
        empty = store.to_frame()
        spec = _spec()
        store.record(spec, run_one(spec, fake_run))
        df = store.to_frame()
    for frame in (empty, df):
        cols = list(frame.columns)
        assert cols[: len(PUBLIC_COLUMNS)] == list(PUBLIC_COLUMNS)
        # the feature `block_size` shares the public column; the rest follow the status column in schema order
        feats = [f for f in FEATURE_NAMES + TIMING_NAMES if f not in PUBLIC_COLUMNS]
        assert cols[len(PUBLIC_COLUMNS): len(PUBLIC_COLUMNS) + len(feats)] == feats
        assert {"run_key", "seq_len", "eval_windows", "seconds", "error", "provenance"} <= set(cols)
    assert len(empty) == 0
    # the public block_size column carries the measured (resolved) block size; the recipe's own field is kept
    assert df["block_size"].iloc[0] == fake_run(spec)["features"]["block_size"]
    assert pd.isna(df["recipe_block_size"].iloc[0])


def test_failed_row_keeps_error_and_never_replaces_done(tmp_path):
    store = RunStore(tmp_path / "s.sqlite")
    spec = _spec()
    failed = run_one(spec, fake_run, {"fail_formats": ["mxint4"]})
    assert failed["status"] == "failed" and "fake failure" in failed["error"] and "Traceback" in failed["error"]
    store.record(spec, failed)
    assert store.failed_keys() == {spec.key} and store.done_keys() == set()
    assert "RuntimeError: fake failure" in store.to_frame()["error"].iloc[0]
    store.record(spec, run_one(spec, fake_run))  # the retry succeeds: the row is replaced, attempts counted
    row = store.get(spec.key)
    assert row["status"] == "done" and row["attempts"] == 2 and row["error"] is None
    assert not store.record(spec, failed)  # a later failure does not erase a finished run
    assert store.get(spec.key)["status"] == "done"
    with pytest.raises(StoreError, match="status"):
        store.add({"run_key": "k", "status": "running"})
    with pytest.raises(StoreError, match="run_key"):
        store.add({"status": "done"})
    assert store.delete([spec.key]) == 1 and len(store) == 0


def test_add_flat_row_and_nan(tmp_path):
    with RunStore(f"sqlite:///{tmp_path / 'u.sqlite'}") as store:  # an SQLAlchemy URL works too
        store.add({"run_key": "x|r|v|e", "status": "done", "model": "x", "ppl_fp": 10.0, "hessian_trace": math.nan,
                   "taylor_dnll": 0.25, "my_new_feature": 3.0, "windows": 7})
        df = store.to_frame()
    assert df["taylor_dnll"].iloc[0] == 0.25 and math.isnan(df["hessian_trace"].iloc[0])
    assert df["eval_windows"].iloc[0] == 7 and df["my_new_feature"].iloc[0] == 3.0
    assert (tmp_path / "u.sqlite").exists()


def test_text_file_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are my notes\n" * 20)
    before = _digest(path)
    with pytest.raises(StoreError, match="not a quantpredict run store"):
        RunStore(path)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_foreign_sqlite_is_refused_untouched(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO customers VALUES (1, 'ada')")
    con.commit()
    con.close()
    before = _digest(path)
    with pytest.raises(StoreError, match="customers"):
        RunStore(path)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "runs.sqlite"
    with RunStore(path) as store:
        spec = _spec()
        store.record(spec, run_one(spec, fake_run))
    con = sqlite3.connect(path)
    con.execute("UPDATE quantpredict_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    before = _digest(path)
    with pytest.raises(StoreError, match="newer"):
        RunStore(path)
    assert _digest(path) == before


def test_missing_store_without_create(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        RunStore(tmp_path / "absent.sqlite", create=False)
    assert not (tmp_path / "absent.sqlite").exists()


def _writer(path: str, prefix: str, n: int, start) -> None:
    start.wait()
    store = RunStore(path)
    for i in range(n):
        store.add({"run_key": f"{prefix}{i}|r|v|e", "status": "done", "model": prefix, "ppl_fp": float(i),
                   "features": {"hessian_trace": float(i)}})
    store.close()


def test_second_writer_process_appends_concurrently(tmp_path):
    path = str(tmp_path / "runs.sqlite")
    RunStore(path).close()
    # fork: the children only touch SQLite (no torch), and skip re-importing the test's modules (seconds each)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(path, p, 40, start)) for p in ("a", "b")]
    for p in procs:
        p.start()
    start.set()
    _writer(path, "c", 40, start)  # this process writes at the same time
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with RunStore(path) as store:
        keys = store.done_keys()
        df = store.to_frame()
    assert keys == {f"{p}{i}|r|v|e" for p in "abc" for i in range(40)}
    assert sorted(df.groupby("model")["ppl_fp"].sum().tolist()) == [sum(range(40))] * 3


# ---- the shipped runs: one Recipe, one key ------------------------------------------------------------------------


def test_every_shipped_run_key_is_rebuilt_from_its_recipe_and_evaluation_setting():
    """The 992 shipped runs keep their keys: every stored label parses into a Recipe whose label is the same, and a
    RunSpec built from the Recipe and the evaluation setting has exactly the stored key."""
    from quantpredict.data import data_dir
    from quantpredict.recipe import EvalSetting, Recipe

    with RunStore(data_dir() / "runs" / "runs.sqlite", create=False) as store:
        rows = store.rows()
    assert len(rows) >= 992
    for r in rows:
        recipe = Recipe.from_label(r["recipe"])
        assert recipe.label == r["recipe"]
        assert recipe.columns() == {k: r[k] for k in recipe.columns()}
        spec = RunSpec(r["model"], recipe, EvalSetting(r["seq_len"], r["eval_max_windows"]), model_id=r["model_id"],
                       code_version=r["code_version"])
        assert spec.key == r["run_key"]
        legacy = RunSpec(r["model"], r["weight_format"], r["method"], block_size=r["block_size"],
                         smoothquant_alpha=r["smoothquant_alpha"], act_format=r["act_format"], seq_len=r["seq_len"],
                         eval_max_windows=r["eval_max_windows"], model_id=r["model_id"],
                         code_version=r["code_version"])
        assert legacy == spec


def test_run_keys_are_built_without_torch():
    import subprocess
    import sys

    code = ("import sys; from quantpredict.runs import RunSpec, RunStore; from quantpredict.recipe import Recipe;"
            "k = RunSpec('llama-s', Recipe('mxint4', method='gptq', layers=('mlp.down_proj=mxint8',))).key;"
            "assert k == 'llama-s|mxint4-gptq-@mlp.down_proj=mxint8|0.1.0+m1|seq256-wall', k;"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_runspec_pickles_and_keeps_its_key():
    import pickle

    from quantpredict.recipe import EvalSetting, Recipe

    spec = RunSpec("m", Recipe("int4", method="gptq", qat=True, qat_lr=1e-4), EvalSetting(256, 64, bos=True),
                   model_id="m@abc")
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and back.key == spec.key == "m@abc|int4-qat_gptq-qlr0.0001|0.1.0+m1|seq256-w64-bos"
    assert back.method == "qat_gptq" and back.recipe_fields()["method"] == "qat_gptq"


def test_update_features_and_extra_touch_nothing_measured(tmp_path):
    spec = _spec()
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.record(spec, run_one(spec, fake_run))
        before = store.get(spec.key)
        store.update_features(spec.key, {"fisher_quad": 0.25, "kl_calib": 0.3}, timings={"backfill_seconds": 1.5})
        store.update_extra(spec.key, {"tokens_per_param": 12.0})
        after = store.get(spec.key)
        with pytest.raises(StoreError, match="not schema features"):
            store.update_features(spec.key, {"kld": 1.0})
        with pytest.raises(StoreError, match="stored columns"):
            store.update_extra(spec.key, {"kld": 1.0})
        with pytest.raises(StoreError, match="is not in"):
            store.update_features("nope", {"fisher_quad": 1.0})
    assert after["features"]["fisher_quad"] == 0.25 and after["extra"]["tokens_per_param"] == 12.0
    assert after["timings"]["backfill_seconds"] == 1.5
    for col in ("kld", "nll_fp", "nll_quant", "delta_nll_se", "status", "finished_at"):
        assert after[col] == before[col]
    changed = ("fisher_quad", "kl_calib")
    assert {k: v for k, v in after["features"].items() if k not in changed} == \
        {k: v for k, v in before["features"].items() if k not in changed}


def test_read_runs_merges_stores_and_refuses_a_missing_one(tmp_path):
    from quantpredict.errors import PredictorError
    from quantpredict.runs.table import read_runs

    a, b = _spec(model="a"), _spec(model="b")
    for spec, name in ((a, "a.sqlite"), (b, "b.sqlite")):
        with RunStore(tmp_path / name) as store:
            store.record(spec, run_one(spec, fake_run))
    frame = read_runs([tmp_path / "a.sqlite", tmp_path / "b.sqlite"])
    assert sorted(frame["model"]) == ["a", "b"]
    with pytest.raises(PredictorError, match="does not exist"):
        read_runs(tmp_path / "typo.sqlite")
    assert not (tmp_path / "typo.sqlite").exists()  # a read never creates a store


def test_one_run_key_version_and_one_build_version():
    """The run-key version has one value under its names; the build version is a different thing (no run key)."""
    from quantpredict import __version__, recipe, runs, version
    from quantpredict.runs import spec

    assert version.MEASUREMENT_VERSION == recipe.CODE_VERSION == runs.CODE_VERSION == spec.CODE_VERSION == "0.1.0+m1"
    assert recipe.__version__ == __version__ == version.__version__
    assert version.build_version().startswith(__version__)


def test_backfill_fills_only_the_runs_of_the_methods_asked_for(tmp_path):
    """A real backfill of the fisher group on a zoo model: the RTN run gains the features, the GPTQ run is left
    for a later call, and nothing measured changes."""
    from quantpredict.runs.backfill import backfill
    from quantpredict.schema import FEATURES

    fisher = {f.name: None for f in FEATURES if f.group == "fisher"}
    rtn, gptq = _spec("llama-xs", "mxint4", "rtn"), _spec("llama-xs", "mxint4", "gptq")
    path = tmp_path / "runs.sqlite"
    with RunStore(path) as store:
        for spec in (rtn, gptq):
            store.record(spec, run_one(spec, fake_run))
            store.update_features(spec.key, fisher)  # a run of a sweep that predates the group
        before = {k: store.get(k.key) for k in (rtn, gptq)}
    summary = backfill(path, ["fisher"], methods=["rtn"], torch_threads=1, progress=False)
    assert (summary.runs, summary.filled, summary.failed) == (1, 1, 0)
    assert before[rtn]["features"]["fisher_quad"] is None
    with RunStore(path, create=False) as store:
        after = {k: store.get(k.key) for k in (rtn, gptq)}
    assert after[rtn]["features"]["fisher_quad"] > 0 and after[rtn]["features"]["kl_calib"] > 0
    assert after[gptq]["features"] == before[gptq]["features"]
    for col in ("kld", "nll_fp", "nll_quant", "status"):
        assert after[rtn][col] == before[rtn][col]


def test_profile_backfill_writes_what_rank_prices(tmp_path):
    """`backfill --groups profile` goes through rank's pricing path: the stored features of a run are those
    rank_recipes computes for its recipe (so a refit reads what predictions read; a weight+activation run gets the
    activation term, an AWQ run its weights-only AWQ price), a feature the run already had is kept, and a recipe the
    weights-only path does not price (AWQ with activation quantization) fails with the reason and keeps its row."""
    from quantpredict.cli import main
    from quantpredict.predict.rank import rank_recipes
    from quantpredict.schema import FEATURES

    profile = {f.name: None for f in FEATURES if f.group == "profile"}
    rtn, wa = _spec("llama-xs", "mxint4", "rtn"), _spec("llama-xs", "mxint4", "rtn", act_format="mxint8")
    awq = RunSpec("llama-xs", Recipe("mxint4", awq=True, act_format="mxint8"), EvalSetting(64, 4))
    awq_w = RunSpec("llama-xs", Recipe("mxint4", awq=True), EvalSetting(64, 4))
    path = tmp_path / "runs.sqlite"
    with RunStore(path) as store:
        for spec in (rtn, wa, awq, awq_w):
            store.record(spec, run_one(spec, fake_run))
            store.update_features(spec.key, profile | {"fp_entropy_calib": None})
        store.update_features(rtn.key, {"fp_entropy_calib": 1.25})  # measured by the sweep: kept
        before = store.get(awq.key)
    assert main(["backfill", "--store", str(path), "--groups", "profile", "--no-progress"]) == 1  # awq failed
    want = rank_recipes("llama-xs", ["mxint4-rtn", "mxint4-rtn-a_mxint8", "mxint4-rtn-awq"]).set_index("recipe")
    with RunStore(path, create=False) as store:
        got, got_wa, awq_after = (store.get(rtn.key)["features"], store.get(wa.key)["features"],
                                  store.get(awq.key))
        got_awq = store.get(awq_w.key)["features"]
    assert got_awq["token_gn_quad"] == float(want.loc["mxint4-rtn-awq", "token_gn_quad"]) > 0
    assert got["token_gn_quad"] == float(want.loc["mxint4-rtn", "token_gn_quad"]) > 0
    assert got["kfac_max_layer_share"] == float(want.loc["mxint4-rtn", "kfac_max_layer_share"])
    assert got_wa["token_gn_quad"] == float(want.loc["mxint4-rtn-a_mxint8", "token_gn_quad"]) > got["token_gn_quad"]
    assert got["fp_entropy_calib"] == 1.25 and got["kfac_quad"] is None  # kept; the lean profile has no K-FAC
    assert awq_after["features"] == before["features"]


def test_recompute_calibrated_prices_again_only_gptq_and_awq_runs(tmp_path):
    """`backfill --groups profile --recompute calibrated` overwrites the stored price of the GPTQ and AWQ runs (whose
    price reads their calibration windows' Hessians) with rank's, and leaves an RTN run's as it was."""
    from quantpredict.cli import main
    from quantpredict.predict.rank import rank_recipes

    stale = {"token_gn_quad": 9.0, "token_cross_quad": 9.0}
    specs = {"mxint4-rtn": _spec("llama-xs", "mxint4", "rtn"), "mxint4-gptq": _spec("llama-xs", "mxint4", "gptq"),
             "mxint4-rtn-awq": RunSpec("llama-xs", Recipe("mxint4", awq=True), EvalSetting(64, 4))}
    path = tmp_path / "runs.sqlite"
    with RunStore(path) as store:
        for spec in specs.values():
            store.record(spec, run_one(spec, fake_run))
            store.update_features(spec.key, stale)
    assert main(["backfill", "--store", str(path), "--groups", "profile", "--recompute", "calibrated",
                 "--no-progress"]) == 0
    want = rank_recipes("llama-xs", list(specs)).set_index("recipe")
    with RunStore(path, create=False) as store:
        got = {label: store.get(spec.key)["features"] for label, spec in specs.items()}
    assert got["mxint4-rtn"]["token_gn_quad"] == 9.0  # not a calibrated recipe: kept
    for label in ("mxint4-gptq", "mxint4-rtn-awq"):
        assert got[label]["token_gn_quad"] == float(want.loc[label, "token_gn_quad"]) != 9.0
