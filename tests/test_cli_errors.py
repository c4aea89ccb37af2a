"""Every CLI sub-command, given a bad input, exits 2 with one line on stderr, no traceback, and writes nothing.

In process (``quantpredict.cli.main``), cwd a fresh tmp dir whose whole tree is compared before and after; the
bad inputs are the usual ones: unknown format or method, out-of-range numbers, missing paths, a directory that is
not a model, a corrupt store, a predictor of another schema, a recipe dict with unknown keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from quantpredict.cli import build_parser, main
from quantpredict.report.cli_reference import commands


def _setup(root: Path) -> None:
    """The bad inputs on disk: a directory that is not a model, a corrupt store, a predictor of another schema,
    a recipe file with an unknown key."""
    (root / "notamodel").mkdir()
    (root / "notamodel" / "README").write_text("just a directory\n")
    (root / "corrupt.sqlite").write_bytes(b"this is not a sqlite database" * 10)
    pred = root / "otherpred"
    pred.mkdir()
    (pred / "predictor.json").write_text(json.dumps({"format": "quantpredict.predictor", "format_version": 1,
                                                     "kind": "tree", "schema": {"feature_names": ["a", "b"],
                                                                                "used": ["a"]}}))
    (root / "recipes.json").write_text(json.dumps([{"weight_format": "int4", "not_a_field": 1}]))


# (leaf command words, argv): at least one bad input per leaf; more where a command takes several kinds
CASES: list[tuple[str, list[str]]] = [
    ("demo", ["demo", "--model", "notamodel"]),
    ("demo", ["demo", "--recipes", "zzz9-rtn"]),
    ("formats", ["formats", "--block-size", "-3"]),
    ("zoo list", ["zoo", "list", "--bogus-flag"]),
    ("zoo build", ["zoo", "build", "--only", "no-such-zoo-model"]),
    ("zoo import", ["zoo", "import", "missing-dir"]),
    ("eval", ["eval", "notamodel"]),
    ("eval", ["eval", "missing-dir", "--seq-len", "0"]),
    ("quantize", ["quantize", "notamodel", "--format", "zzz9", "--out", "out"]),
    ("quantize", ["quantize", "notamodel", "--format", "int4", "--out", "out"]),
    ("features", ["features", "notamodel", "--format", "zzz9"]),
    ("collect", ["collect", "--models", "m1", "--formats", "int4", "--methods", "rtn", "--store", "s.sqlite"]),
    ("collect", ["collect", "--models", "llama-xs", "--formats", "zzz9", "--methods", "rtn", "--store", "s.sqlite"]),
    ("collect", ["collect", "--models", "llama-xs", "--formats", "int4", "--methods", "zzz", "--store", "s.sqlite"]),
    ("collect", ["collect", "--models", "llama-xs", "--recipes-file", "recipes.json", "--store", "s.sqlite"]),
    ("collect", ["collect", "--models", "llama-xs", "--formats", "int4", "--methods", "rtn", "--store",
                 "corrupt.sqlite"]),
    ("runs show", ["runs", "show", "--store", "missing.sqlite"]),
    ("runs show", ["runs", "show", "--store", "corrupt.sqlite"]),
    ("runs show", ["runs", "show", "--store", "missing.sqlite", "--limit", "-1"]),
    ("runs export", ["runs", "export", "--store", "corrupt.sqlite", "--out", "x.csv"]),
    ("backfill", ["backfill", "--store", "corrupt.sqlite"]),
    ("backfill", ["backfill", "--store", "corrupt.sqlite", "--groups", "fisher"]),
    ("backfill", ["backfill", "--store", "missing.sqlite", "--groups", "fisher"]),
    ("backfill", ["backfill", "--store", "missing.sqlite"]),
    ("fit", ["fit", "--runs", "missing.parquet", "--out", "p"]),
    ("fit", ["fit", "--store", "corrupt.sqlite", "--out", "p"]),
    ("predict", ["predict", "notamodel", "--format", "mxint4", "--predictor", "otherpred"]),
    ("predict", ["predict", "notamodel", "--format", "zzz9"]),
    ("rank", ["rank", "notamodel", "--predictor", "missing-pred"]),
    ("rank", ["rank", "notamodel", "--max-bits", "-1"]),
    ("allocate", ["allocate", "notamodel", "--target-bits", "-1"]),
    ("report", ["report", "--runs", "missing.parquet", "--out", "r"]),
    ("report", ["report", "--store", "corrupt.sqlite", "--out", "r"]),
    ("qat", ["qat", "notamodel", "--format", "zzz9", "--out", "o"]),
    ("qat", ["qat", "notamodel", "--format", "int4", "--steps", "-1", "--out", "o"]),
    ("study ptq-vs-qat", ["study", "ptq-vs-qat", "--formats", "zzz9", "--out", "o"]),
    ("study smoothquant", ["study", "smoothquant", "--models", "notamodel", "--formats", "zzz9", "--out", "o"]),
    ("attention bench", ["attention", "bench", "--contexts", "-5", "--out", "b"]),
    ("attention train-arith", ["attention", "train-arith", "--minutes", "-1", "--out", "t"]),
    ("attention eval-arith", ["attention", "eval-arith", "--model", "missing-dir", "--out", "e"]),
]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(root.rglob("*"))}


def test_every_leaf_command_has_a_case():
    leaves = {c.name.removeprefix("quantpredict ") for c in commands(build_parser())
              if c.words and not any(c.words == d.words[: len(c.words)] and d is not c
                                     for d in commands(build_parser()))}
    assert leaves - {w for w, _ in CASES} == set()


@pytest.mark.parametrize("words,argv", CASES, ids=[" ".join(a) for _, a in CASES])
def test_bad_input_exits_2_with_one_line(words, argv, tmp_path, monkeypatch, capsys):
    _setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTPREDICT_HOME", str(tmp_path / "home-never-created"))
    before = _tree(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert _tree(tmp_path) == before, "the command created or changed files"
    assert os.getcwd() == str(tmp_path)
