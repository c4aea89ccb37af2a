"""notebooks/quickstart.ipynb runs top to bottom on the smallest zoo model (so it cannot rot).

The kernel is this test's own interpreter: a temporary kernel spec (``sys.executable -m ipykernel_launcher``) is
written and found through JUPYTER_PATH, so no ``ipykernel install`` step is needed on a fresh clone.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
KERNEL = "quantpredict-test"


def _kernel_spec(tmp_path: Path) -> Path:
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "quantpredict test kernel", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return spec_dir.parents[1]


def test_notebook_is_clean_json():
    """Committed without outputs or execution counts (diffs stay readable; the test produces the outputs)."""
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from quantpredict.models import list_zoo

    if not list_zoo():
        pytest.skip("no zoo model on disk (data/zoo): the notebook needs one; `quantpredict zoo build` makes them")
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec(tmp_path)))
    # one thread per library: on a busy machine torch's OpenMP threads spin against each other (a 16-window
    # evaluation of the smallest model took 4.7 s on one thread and 59 s on two, under load)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(ROOT)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    seconds = time.perf_counter() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "predictor:" in text and "predicted perplexity" in text and "FP perplexity" in text
    tables = [o for o in outputs if o.get("output_type") == "execute_result" and "text/html" in o.get("data", {})]
    assert tables and "measured ppl" in tables[0]["data"]["text/html"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the comparison plot was not drawn"
    print(f"notebook executed in {seconds:.1f} s")
