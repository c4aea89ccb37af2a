"""Where the data is found: the checkout's data/, or $QUANTPREDICT_DATA for an installed package (the wheel holds
code only); a missing folder is one clear error naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quantpredict import data
from quantpredict.cli import main
from quantpredict.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_the_variable_wins_over_the_checkout(tmp_path):
    assert data.locate_data_dir({}, checkout=tmp_path / "c") == tmp_path / "c"
    assert data.locate_data_dir({"QUANTPREDICT_DATA": str(tmp_path / "d")}, checkout=tmp_path / "c") == tmp_path / "d"
    assert data.locate_data_dir({"QUANTPREDICT_DATA": "  "}, checkout=tmp_path / "c") == tmp_path / "c"  # unset
    assert data.locate_data_dir({"QUANTPREDICT_DATA": "~/x"}, checkout=tmp_path) == Path("~/x").expanduser()


def test_the_checkout_data_is_the_default():
    if os.environ.get("QUANTPREDICT_DATA"):
        pytest.skip("QUANTPREDICT_DATA is set in this environment")
    assert data.data_dir() == ROOT / "data"
    from quantpredict.predict.quality import DEFAULT_PREDICTOR_DIR
    from quantpredict.predict.rank import PROFILE_PREDICTOR_DIR

    assert DEFAULT_PREDICTOR_DIR == ROOT / "data" / "predictors" / "default"
    assert PROFILE_PREDICTOR_DIR == ROOT / "data" / "predictors" / "profile"


def test_missing_data_is_one_error_naming_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "DATA_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("QUANTPREDICT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="QUANTPREDICT_DATA"):
        data.data_dir()
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "QUANTPREDICT_DATA" in err[0] and "nowhere" in err[0]
    assert sorted(os.listdir(tmp_path)) == []


NO_DATA_COMMANDS = [
    ["zoo", "list"], ["zoo", "list", "--json"], ["zoo", "build", "--only", "llama-xs"], ["demo"],
    ["eval", "llama-xs"], ["predict", "llama-xs", "--format", "mxint4"], ["rank", "llama-xs"],
    ["allocate", "llama-xs", "--target-bits", "4.5"], ["collect", "--models", "zoo", "--recipes", "mxint4-rtn"],
    ["study", "ptq-vs-qat"], ["fit", "--store", "data/runs/runs.sqlite", "--kind", "ols", "--out", "fitted"],
]


@pytest.mark.parametrize("argv", NO_DATA_COMMANDS, ids=" ".join)
def test_without_the_data_every_command_names_the_variable(argv, tmp_path, monkeypatch, capsys):
    """An installed package without its data: each command that needs the folder fails with one line naming
    QUANTPREDICT_DATA and what it must point to, never with advice (`zoo build`, `git checkout -- data/`) that leads
    into the same error; and it writes nothing where it runs."""
    from quantpredict.predict import quality, rank, shipped

    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv("QUANTPREDICT_DATA", str(nowhere))
    monkeypatch.setenv("QUANTPREDICT_HOME", str(tmp_path / "home"))  # no imported models either
    monkeypatch.setattr(data, "DATA_DIR", nowhere)  # the module-level copies taken at import
    monkeypatch.setattr(quality, "DEFAULT_PREDICTOR_DIR", nowhere / "predictors" / "default")
    monkeypatch.setattr(quality, "PROFILE_PREDICTOR_DIR", nowhere / "predictors" / "profile")
    monkeypatch.setattr(rank, "PROFILE_PREDICTOR_DIR", nowhere / "predictors" / "profile")
    monkeypatch.setattr(shipped, "DATA_DIR", nowhere)
    for name, folder in (("DEFAULT_PREDICTOR_DIR", "default"), ("PHYSICS_PREDICTOR_DIR", "default"),
                         ("PROFILE_PREDICTOR_DIR", "profile")):
        monkeypatch.setattr(shipped, name, nowhere / "predictors" / folder)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "QUANTPREDICT_DATA" in err[0] and "data/ folder" in err[0], captured.err
    assert "zoo build" not in captured.out + captured.err and "git checkout" not in err[0], err[0]
    assert os.listdir(cwd) == []


def test_the_variable_is_read_at_import(tmp_path):
    code = "from quantpredict import data; from quantpredict.predict.quality import DEFAULT_PREDICTOR_DIR as d; " \
           "print(data.DATA_DIR); print(d)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "QUANTPREDICT_DATA": str(tmp_path), "PYTHONPATH": str(ROOT)}).stdout
    assert out.split() == [str(tmp_path), str(tmp_path / "predictors" / "default")]


def _installed_wheel(tmp_path: Path) -> tuple[Path, dict]:
    """The "Installed without the checkout" commands (docs/installed.md): build the wheel of a copy of the package
    sources (so that no stale build/ of the checkout gets into it, and nothing is written there), make a venv with
    --system-site-packages and ``pip install --no-deps`` the wheel into it. Returns the venv and the environment
    to run it in (no PYTHONPATH, no QUANTPREDICT_DATA, an empty QUANTPREDICT_HOME)."""
    import shutil
    import sysconfig

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "quantpredict", src / "quantpredict", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QUANTPREDICT_DATA", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", QUANTPREDICT_HOME=str(tmp_path / "home"), PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    wheels = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, timeout=300, env=env, cwd=tmp_path)
    (wheel,) = wheels.glob("quantpredict-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300,
                   env=env)
    py = venv / "bin" / "python"
    subprocess.run([str(venv / "bin" / "pip"), "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300,
                   env=env, cwd=tmp_path)
    if sys.prefix != sys.base_prefix:
        # This interpreter is itself a venv (CI's .venv), and --system-site-packages reaches its base interpreter's
        # packages, not the venv's: add the venv's site-packages as plain path entries, after the new venv's own
        # (their .pth files, such as an editable quantpredict's, are not processed from there). After the install,
        # so that pip does not take the outer quantpredict for this one. A user's torch in the system Python needs
        # none of this.
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True, env=env).stdout.strip()
        outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        Path(site, "zz_outer_packages.pth").write_text("".join(f"{p}\n" for p in outer))
    return venv, env


@pytest.mark.e2e  # in CI: about a minute (on two loaded cores), most of it the demo's one prediction
def test_an_installed_wheel_runs_zoo_list_and_demo_from_elsewhere(tmp_path):
    """The installed user's story (docs/installed.md): the wheel in a venv that shares the torch already installed,
    run from a directory outside the checkout. Without QUANTPREDICT_DATA, `zoo list` and
    `demo` stop with one line naming the variable (no advice to run `zoo build`, which would need it too); with it
    pointing at the checkout's data/, both work and write nothing where they run."""
    venv, env = _installed_wheel(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    exe = venv / "bin" / "quantpredict"

    def run(*args, **extra):
        return subprocess.run([str(exe), *args], cwd=elsewhere, env={**env, **extra}, capture_output=True, text=True,
                              timeout=600)

    code = "import quantpredict, torch; print(quantpredict.__file__); print(torch.__file__)"
    where = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=elsewhere, env=env, capture_output=True,
                           text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    qp_file, torch_file = map(Path, where.stdout.split())
    assert qp_file.is_relative_to(venv) and not qp_file.is_relative_to(ROOT), qp_file  # the wheel, not the checkout
    assert not torch_file.is_relative_to(venv), torch_file  # --no-deps: the torch already installed, not a second
    for args in (["zoo", "list"], ["demo"]):
        bad = run(*args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1, bad.stderr
        assert "QUANTPREDICT_DATA" in lines[0] and "data/ folder" in lines[0], lines[0]
        assert "zoo build" not in bad.stderr + bad.stdout, bad.stderr
    data_env = {"QUANTPREDICT_DATA": str(ROOT / "data")}
    listed = run("zoo", "list", **data_env)
    assert listed.returncode == 0 and "llama-xs" in listed.stdout, listed.stderr
    # the demo's cheapest setting that still predicts: the smallest Llama, one recipe (the default is ~2x longer)
    demo = run("demo", "--model", "llama-xs", "--recipes", "mxint4:rtn", **data_env)
    assert demo.returncode == 0, textwrap.shorten(demo.stderr, 2000)
    assert "predicted" in demo.stdout and "mxint4-rtn" in demo.stdout, demo.stdout
    assert os.listdir(elsewhere) == []
