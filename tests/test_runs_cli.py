"""`quantpredict collect`, `quantpredict runs show` and `quantpredict runs export` through the real dispatcher."""

from __future__ import annotations

import pandas as pd
import pytest

from quantpredict.cli import main
from quantpredict.runs import PUBLIC_COLUMNS, RunStore

FAKE = "quantpredict.runs.fake:fake_run"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "runs.sqlite"
    rc = main(["collect", "--models", "m1,m2", "--formats", "mxint4", "int8", "--methods", "rtn", "gptq",
               "--block-sizes", "32", "128", "--block-size-formats", "mx", "--eval-max-windows", "4",
               "--store", str(path), "--run-fn", FAKE, "--run-kwargs", '{"fail_models": ["m2"]}',
               "--no-weights-hash", "--no-progress"])
    assert rc == 1  # some runs failed: non-zero so scripts notice
    return path


def test_collect_cli_fills_the_store(store_path, capsys):
    df = RunStore(store_path).to_frame()
    assert len(df) == 12 and (df["status"] == "done").sum() == 6
    assert set(df["recipe"]) == {"mxint4-rtn", "mxint4-gptq", "mxint4_b128-rtn", "mxint4_b128-gptq", "int8-rtn",
                                 "int8-gptq"}
    assert set(df["eval_max_windows"]) == {4}
    rc = main(["collect", "--models", "m1", "--formats", "int8", "--methods", "rtn", "gptq", "--eval-max-windows",
               "4", "--store", str(store_path), "--run-fn", FAKE, "--no-weights-hash", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 runs planned, 2 already in" in out and "0 to run" in out


def test_runs_show(store_path, capsys):
    assert main(["runs", "show", "--store", str(store_path)]) == 0
    out = capsys.readouterr().out
    assert "12 runs: 6 done, 6 failed" in out
    assert "by model:" in out and "by weight_format:" in out
    assert "mxint4_b128-gptq" in out and "fake failure for m2" in out
    assert main(["runs", "show", "--store", str(store_path), "--status", "done", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "6 runs: 6 done" in out and "fake failure" not in out


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_runs_export(store_path, tmp_path, suffix, capsys):
    out = tmp_path / f"runs{suffix}"
    assert main(["runs", "export", "--store", str(store_path), "--out", str(out)]) == 0
    assert "wrote 12 runs" in capsys.readouterr().out
    back = pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out)
    expected = RunStore(store_path).to_frame()
    assert list(back.columns) == list(expected.columns)
    assert list(back.columns[: len(PUBLIC_COLUMNS)]) == list(PUBLIC_COLUMNS)
    assert back["run_key"].tolist() == expected["run_key"].tolist()
    for col in ("ppl_quant", "hessian_trace", "delta_nll_se"):
        pd.testing.assert_series_equal(back[col].astype(float), expected[col].astype(float), check_names=False)


def test_cli_errors(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a store")
    assert main(["runs", "show", "--store", str(notes)]) == 2
    assert "not a quantpredict run store" in capsys.readouterr().err
    assert main(["runs", "show", "--store", str(tmp_path / "absent.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "absent.sqlite").exists()
    assert main(["runs", "export", "--store", str(notes), "--out", str(tmp_path / "x.xlsx")]) == 2
    assert main(["collect", "--models", "m", "--formats", "int8", "--methods", "rtn", "--store",
                 str(tmp_path / "s.sqlite"), "--run-kwargs", "{oops", "--no-weights-hash"]) == 2
    assert "--run-kwargs" in capsys.readouterr().err


def test_collect_cli_takes_explicit_recipes(tmp_path, capsys):
    from quantpredict.cli import main

    store = tmp_path / "r.sqlite"
    rc = main(["collect", "--models", "m", "--recipes", "mxint4-rtn-@mlp.down_proj=mxint8", "q4_k-gptq-L=mxint4*2",
               "--store", str(store), "--run-fn", "quantpredict.runs.fake:fake_run", "--no-weights-hash",
               "--no-progress"])
    assert rc == 0
    from quantpredict.runs import RunStore

    with RunStore(store, create=False) as st:
        assert sorted(r["recipe"] for r in st.rows()) == ["mxint4-rtn-@mlp.down_proj=mxint8", "q4_k-gptq-L=mxint4*2"]
    rc = main(["collect", "--models", "m", "--recipes", "mxint4-zzz", "--store", str(tmp_path / "x.sqlite"),
               "--run-fn", "quantpredict.runs.fake:fake_run", "--no-weights-hash"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown quantization method 'zzz'" in err and "Traceback" not in err
    assert not (tmp_path / "x.sqlite").exists()
