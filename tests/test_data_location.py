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


def test_the_variable_is_read_at_import(tmp_path):
    code = "from quantpredict import data; from quantpredict.predict.quality import DEFAULT_PREDICTOR_DIR as d; " \
           "print(data.DATA_DIR); print(d)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "QUANTPREDICT_DATA": str(tmp_path), "PYTHONPATH": str(ROOT)}).stdout
    assert out.split() == [str(tmp_path), str(tmp_path / "predictors" / "default")]


@pytest.mark.slow
def test_an_installed_wheel_runs_demo_from_elsewhere(tmp_path):
    """``pip wheel`` the checkout (no build isolation: nothing downloaded), install it with --no-deps into a fresh
    venv that sees this interpreter's packages (torch & co.) but not the checkout, and run ``quantpredict demo``
    from another directory with QUANTPREDICT_DATA pointing at the checkout's data/; without it, one clear error."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, timeout=600)
    (wheel,) = wheels.glob("quantpredict-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QUANTPREDICT_DATA")}
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   timeout=600, env=env, cwd=tmp_path)
    # the running interpreter may itself be a venv (whose packages --system-site-packages does not reach): add its
    # site-packages as a plain path entry, after the new venv's own (its .pth files, such as an editable
    # quantpredict, are not processed from there). After the install, so that pip does not take the outer
    # quantpredict for this one.
    import sysconfig

    Path(site, "zz_outer_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    exe = venv / "bin" / "quantpredict"
    where = subprocess.run([str(py), "-c", "import quantpredict; print(quantpredict.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)
    assert where.returncode == 0 and where.stdout.startswith(str(venv)), where  # the installed copy, not the checkout
    bad = subprocess.run([str(exe), "demo"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "QUANTPREDICT_DATA" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    ok = subprocess.run([str(exe), "demo"], cwd=elsewhere, env={**env, "QUANTPREDICT_DATA": str(ROOT / "data"),
                                                                "OMP_NUM_THREADS": "1"},
                        capture_output=True, text=True, timeout=900)
    assert ok.returncode == 0, textwrap.shorten(ok.stderr, 2000)
    assert "predicted" in ok.stdout and os.listdir(elsewhere) == []
