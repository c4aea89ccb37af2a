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
    ("export", ["export", "notamodel", "--recipe", "q4_k_m", "--gguf", "m.gguf"]),
    ("export", ["export", "llama-xs", "--recipe", "mxint4-rtn", "--gguf", "m.gguf"]),
    ("export", ["export", "llama-xs", "--recipe-file", "recipes.json", "--gguf", "m.gguf"]),
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
    ("backfill", ["backfill", "--store", "missing.sqlite", "--groups", "fisher", "--attributes", "--recompute", "all"]),
    ("fit", ["fit", "--runs", "missing.parquet", "--out", "p"]),
    ("fit", ["fit", "--store", "corrupt.sqlite", "--out", "p"]),
    ("predict", ["predict", "notamodel", "--format", "mxint4", "--predictor", "otherpred"]),
    ("predict", ["predict", "notamodel", "--format", "zzz9"]),
    ("profile", ["profile", "notamodel"]),
    ("profile", ["profile", "llama-xs", "--threads", "0"]),
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


# ---- faults on the user's side, by class: each is exit 2, one line naming the file or value, nothing written, and
# ---- found before any weight loads (models.load and from_pretrained raise if called)

class _Loaded(BaseException):
    """Raised by the patched loaders: a BaseException, so the CLI's error handling cannot turn it into an exit code."""


@pytest.fixture
def no_weights_load(monkeypatch):
    """Any weight load fails the test: the checks must come first."""
    import transformers

    from quantpredict import models

    def refuse(*a, **k):
        raise _Loaded("a model was loaded before the inputs and outputs were checked")

    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _model_copy(root: Path, name: str) -> Path:
    """A copy of the zoo's llama-xs directory (config, safetensors, tokenizer) under ``root/name``."""
    import shutil

    from quantpredict.models import zoo_root

    return Path(shutil.copytree(zoo_root() / "llama-xs", root / name, symlinks=False))


def _bad_models(root: Path) -> None:
    """One model directory per way a model can be broken on the user's side."""
    st = _model_copy(root, "truncated") / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    (_model_copy(root, "randombytes") / "model.safetensors").write_bytes(os.urandom(4096))
    (_model_copy(root, "foreign") / "model.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 200)  # a zip file
    (_model_copy(root, "badconfig") / "config.json").write_text('{"model_type": "llama",')
    (_model_copy(root, "noconfig") / "config.json").unlink()
    d = _model_copy(root, "notokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    d = _model_copy(root, "missingshard")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


#: (broken model directory, what the one line must name)
BAD_MODELS = [("truncated", "truncated/model.safetensors"), ("randombytes", "randombytes/model.safetensors"),
              ("foreign", "foreign/model.safetensors"), ("badconfig", "badconfig/config.json"),
              ("noconfig", "config.json"), ("notokenizer", "tokenizer"),
              ("missingshard", "model-00002-of-00002.safetensors")]

#: Every command that takes a model, with M standing for the model.
MODEL_COMMANDS = [["demo", "--model", "M"], ["eval", "M"], ["eval", "llama-xs", "--against", "M"],
                  ["quantize", "M", "--format", "int4", "--out", "out"], ["features", "M", "--format", "int4"],
                  ["export", "M", "--recipe", "q4_k_m", "--gguf", "m.gguf"], ["imatrix", "M", "--out", "im.gguf"],
                  ["predict", "M", "--format", "int4"], ["rank", "M"], ["allocate", "M", "--target-bits", "4"],
                  ["qat", "M", "--format", "int4", "--out", "o"],
                  ["collect", "--models", "M", "--formats", "int4", "--methods", "rtn", "--store", "s.sqlite"],
                  ["study", "ptq-vs-qat", "--models", "M", "--out", "o"],
                  ["study", "smoothquant", "--models", "M", "--formats", "int4", "--out", "o"]]


def _one_line_exit_2(argv, root: Path, capsys, must_name: str) -> str:
    before = _tree(root)
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    assert must_name in lines[0], (must_name, err)
    assert _tree(root) == before, "the command created or changed files"
    return lines[0]


@pytest.mark.parametrize("bad,must_name", BAD_MODELS, ids=[b for b, _ in BAD_MODELS])
@pytest.mark.parametrize("argv", MODEL_COMMANDS, ids=[" ".join(a[:2]) for a in MODEL_COMMANDS])
def test_broken_model_is_named_before_any_weight_loads(argv, bad, must_name, tmp_path, monkeypatch, capsys,
                                                       no_weights_load):
    _bad_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTPREDICT_HOME", str(tmp_path / "home-never-created"))
    _one_line_exit_2([bad if a == "M" else a for a in argv], tmp_path, capsys, must_name)


def test_check_model_dir_reads_headers_only(tmp_path):
    """The header check itself: the zoo's models pass, and each broken copy raises a ModelError naming its file."""
    from quantpredict.errors import ModelError
    from quantpredict.models import check_model_dir, tensor_shapes

    assert check_model_dir("llama-xs").name == "llama-xs"
    assert tensor_shapes("gpt2-xs")  # every tensor's shape, from the header
    _bad_models(tmp_path)
    for bad, must_name in BAD_MODELS:
        with pytest.raises(ModelError, match=must_name.split("/")[-1].replace(".", r"\.")):
            check_model_dir(tmp_path / bad)


def _unwritable(root: Path, how: str, monkeypatch) -> str:
    """A path this process cannot create: under a regular file (fails for root too), or in a read-only folder
    (chmod 0o500; root writes there anyway, so for root os.access is told the truth a user would get)."""
    if how == "under-a-file":
        (root / "afile").write_text("a file, not a folder\n")
        return "afile/out"
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:
        access = os.access

        def as_a_user(path, mode, *a, **k):
            return not (mode & os.W_OK and Path(path).resolve() == ro.resolve()) and access(path, mode, *a, **k)

        monkeypatch.setattr(os, "access", as_a_user)
    return "ro/out"


#: Every command that takes an output path, with O standing for it.
OUTPUT_COMMANDS = [["quantize", "llama-xs", "--format", "int4", "--out", "O"],
                   ["qat", "llama-xs", "--format", "int4", "--out", "O"],
                   ["export", "llama-xs", "--recipe", "q4_k_m", "--gguf", "O"],
                   ["imatrix", "llama-xs", "--out", "O"],
                   ["allocate", "llama-xs", "--target-bits", "4", "--out", "O"],
                   ["rank", "llama-xs", "--plot", "O.png"],
                   ["collect", "--models", "llama-xs", "--formats", "int4", "--methods", "rtn", "--store", "O"],
                   ["fit", "--runs", "missing.parquet", "--out", "O"],
                   ["fit", "--runs", "missing.parquet", "--out", "p", "--validate", "--report", "O"],
                   ["report", "--runs", "missing.parquet", "--out", "O"],
                   ["runs", "export", "--store", "missing.sqlite", "--out", "O"],
                   ["study", "ptq-vs-qat", "--models", "llama-xs", "--out", "O"],
                   ["study", "smoothquant", "--models", "llama-xs", "--formats", "int4", "--out", "O"],
                   ["study", "smoothquant", "--models", "llama-xs", "--formats", "int4", "--fp-cache-dir", "O"],
                   ["attention", "bench", "--out", "O"],
                   ["attention", "train-arith", "--out", "O"],
                   ["attention", "eval-arith", "--out", "O"]]


@pytest.mark.parametrize("how", ["under-a-file", "read-only-folder"])
@pytest.mark.parametrize("argv", OUTPUT_COMMANDS, ids=[" ".join(a[:2] + a[-2:-1]) for a in OUTPUT_COMMANDS])
def test_unwritable_output_fails_before_any_work(argv, how, tmp_path, monkeypatch, capsys, no_weights_load):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTPREDICT_HOME", str(tmp_path / "home-never-created"))
    path = _unwritable(tmp_path, how, monkeypatch)
    argv = [a.replace("O", path) if a.startswith("O") else a for a in argv]
    _one_line_exit_2(argv, tmp_path, capsys, path.split("/")[0])


@pytest.mark.parametrize("argv,must_name", [
    (["allocate", "llama-xs", "--target-bits", "1"], "bits per weight"),
    (["allocate", "gpt2-xs", "--target-bits", "3.5", "--candidates", "mxint4,mxint8"], "4.250 bits per weight"),
    (["allocate", "llama-xs", "--target-bits", "2", "--candidates", "int4,int8", "--out", "r.json"], "int4"),
])
def test_infeasible_budget_says_the_least_one(argv, must_name, tmp_path, monkeypatch, capsys, no_weights_load):
    monkeypatch.chdir(tmp_path)
    line = _one_line_exit_2(argv, tmp_path, capsys, must_name)
    assert "least feasible" in line and "per layer" not in line


@pytest.mark.parametrize("argv,must_name", [
    (["eval", "llama-xs", "--max-windows", "0"], "--max-windows"),
    (["eval", "llama-xs", "--seq-len", "1"], "--seq-len"),
    (["eval", "llama-xs", "--threads", "0"], "--threads"),
    (["quantize", "llama-xs", "--format", "int4", "--calib-samples", "0", "--out", "o"], "--calib-samples"),
    (["collect", "--models", "llama-xs", "--formats", "int4", "--methods", "rtn", "--eval-max-windows", "0"],
     "--eval-max-windows"),
])
def test_flag_values_in_the_flags_words(argv, must_name, tmp_path, monkeypatch, capsys, no_weights_load):
    """Out-of-range numbers are named by their flag, without Python's words (None, got 0)."""
    monkeypatch.chdir(tmp_path)
    line = _one_line_exit_2(argv, tmp_path, capsys, must_name)
    assert "None" not in line and "_" not in line.split("error:")[1].split("(see")[0].replace("--", ""), line


THREADED = ("demo", "eval", "export", "features", "predict", "rank", "allocate")  # quantize: the test below


@pytest.mark.parametrize("command", THREADED)
def test_threads_flag_sets_torchs_count_before_the_command_runs(command, monkeypatch):
    """Every command that runs torch takes --threads N (on 2 cores an oversubscribed torch slows badly), and main()
    sets torch's count before the command's own code runs; without the flag the count is left alone."""
    import importlib

    import torch

    seen = []
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    # main() builds its parser anew, and each register() binds its module's run: replace that run with a probe
    module = importlib.import_module(f"quantpredict.cli.{'eval_' if command == 'eval' else command}")
    monkeypatch.setattr(module, "run", lambda args: seen.append("ran") or 0)
    argv = [command] + {"quantize": ["llama-xs", "--format", "int4", "--out", "o"],
                        "export": ["llama-xs", "--recipe", "q8_0", "--gguf", "o.gguf"],
                        "features": ["llama-xs", "--format", "int4"], "predict": ["llama-xs", "--format", "int4"],
                        "demo": []}.get(command, ["llama-xs"])
    assert main(argv + ["--threads", str(target)]) == 0
    assert seen == [target, "ran"]
    seen.clear()
    assert main(argv) == 0
    assert seen == ["ran"]


def test_quantize_applies_threads_itself_where_it_needs_torch(tmp_path, monkeypatch):
    """``quantize`` sets torch's count itself, before the model loads, not in main(): its direct path of the one-pass
    types never imports torch, and there ``--threads`` goes to the C kernel's thread pool instead."""
    import torch

    import quantpredict.models
    from quantpredict import checkpoint_rtn

    seen = []
    target = 1 if torch.get_num_threads() != 1 else 2
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))

    def stop_at_load(*args, **kwargs):
        seen.append("load")
        raise KeyboardInterrupt

    monkeypatch.setattr(quantpredict.models, "load", stop_at_load)
    argv = ["quantize", "llama-xs", "--format", "int4", "--out", str(tmp_path / "o"), "--threads", str(target)]
    assert main(argv) == 130  # the model path (GPTQ): the count is set, then the model loads
    assert seen == [target, "load"]
    seen.clear()
    monkeypatch.setattr(checkpoint_rtn, "quantize_checkpoint", lambda *a, **k: seen.append(k["threads"]) or 0)
    main(["quantize", "llama-xs", "--format", "q4_0", "--method", "rtn", "--out", str(tmp_path / "o"), "--threads",
          str(target)])
    assert seen[0] == target  # the direct path: handed to the kernels, torch's count untouched


def test_rank_table_survives_a_failing_plot(tmp_path, monkeypatch, capsys):
    """The table is printed before the figure is drawn; a figure that cannot be written is one line naming it."""
    from quantpredict.report import frontier

    def fail(frame, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(frontier, "frontier_figure", fail)
    rc = main(["rank", "llama-xs", "--formats", "int4", "--methods", "rtn", "--plot", "f.png"])
    out, err = capsys.readouterr()
    assert rc == 2 and "int4" in out and "recipe" in out, (out, err)
    lines = [line for line in err.splitlines() if line.strip() and "%" not in line and "it/s" not in line]
    assert len(lines) == 1 and "f.png" in lines[0] and "Traceback" not in err, err


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's folder moved under tmp_path, so every temporary file a command makes can be seen."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def test_interrupted_quantize_leaves_no_files(tmp_path, monkeypatch, capsys, private_tmp):
    """Ctrl-C mid-calibration (activations spilled to disk) and mid-save: no temporary file, no half --out."""
    from quantpredict.quantize import model as qmodel
    from quantpredict.quantize import offload

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(offload, "spill_to_disk", lambda *a, **k: True)
    seen = []

    def interrupt(*a, **k):
        seen.append(sorted(p.name for p in private_tmp.iterdir()))
        raise KeyboardInterrupt

    argv = ["quantize", "llama-xs", "--format", "int4", "--method", "rtn", "--output-errors",  # a calibration pass
            "--calib-samples", "2", "--calib-seq-len", "16", "--out", "out"]
    monkeypatch.setattr(qmodel, "_quantize_layer", interrupt)
    assert main(argv) == 130
    assert seen and seen[0], "the activations were not spilled to disk: the test does not test the cleanup"
    assert list(private_tmp.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    from transformers import PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupt)
    assert main(argv) == 130  # interrupted while writing --out: the half-written folder is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    capsys.readouterr()


def test_quantized_weights_get_the_umask_mode(tmp_path, monkeypatch, capsys):
    """model.safetensors gets the same mode as every other file quantize writes (safetensors alone writes 0600)."""
    from quantpredict.files import umask

    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "llama-xs", "--format", "int4", "--method", "rtn", "--calib-samples", "2",
                 "--calib-seq-len", "16", "--out", "out"]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask()}, modes
    capsys.readouterr()


def test_fp_logits_cache_leaves_no_folder(tmp_path, monkeypatch):
    """The FP logits cache removes its files and the folder it made, after an interrupted write too."""
    import numpy as np
    import torch

    from quantpredict.evaluate import FPLogitsCache
    from quantpredict.evaluate.windows import Windows

    ids = torch.arange(12).view(2, 6)
    windows = Windows(ids, torch.ones(2, dtype=torch.long))
    cache = FPLogitsCache(max_bytes=0, directory=tmp_path / "fp-logits")
    assert cache.lookup("m", windows, 2, 5)
    cache.put(0, torch.zeros(2, 5, 5))
    assert len(list((tmp_path / "fp-logits").iterdir())) == 1

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", interrupt)
    with pytest.raises(KeyboardInterrupt):
        cache.put(1, torch.zeros(2, 5, 5))
    cache.close()
    assert list(tmp_path.iterdir()) == []
