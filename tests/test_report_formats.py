"""reports/formats.md renders from whatever runs exist: counts, the setting filter, mixes, AWQ and missing stores."""

from __future__ import annotations

from quantpredict.runs import collect
from quantpredict.studies.formats_report import Sources, render

FAKE = "quantpredict.runs.fake:fake_run"


def _store(path, recipes, windows=256, models=("llama-m",)):
    collect(list(models), recipes=recipes, store=path, run_fn=FAKE, identify=None, progress=False,
            eval_max_windows=windows)
    return path


def test_page_from_partial_stores(tmp_path):
    new = _store(tmp_path / "formats.sqlite", ["uint4-rtn", "uint4-rtn-awq", "nf4-gptq", "q8_0-rtn", "q4_k_m",
                                               "q4_k_m-gptq"])
    base = _store(tmp_path / "runs.sqlite", ["mxint4-rtn", "int4-gptq", "uint4-rtn"])
    _store(base, ["mxint8-rtn"], windows=64)  # another setting: left out, and counted
    text = render(Sources((new, tmp_path / "smollm2_formats.sqlite"), (base,)), tmp_path / "page" / "formats.md")
    assert "Based on **6 runs** of the new layouts" in text
    assert "2 MX/INT runs of the same models" in text  # uint4 of the shipped store is not an MX/INT run
    assert "1 runs at another evaluation setting are left out" in text
    assert "smollm2_formats.sqlite" in text.split("stores not found (yet):")[1].splitlines()[0]
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "llama.cpp mixes | GPTQ" in rows["q4_k_m-gptq"] and rows["q4_k_m-gptq"].rstrip().endswith("| 0% |")
    assert "| llama-m | uint4 |" in text and "AWQ+RTN" in rows["uint4-rtn-awq"]
    assert "q6_K | 6.14 | 6.57 | 0.0057" in text
    for name in ("formats_kld.png", "formats_ppl.png"):
        assert (tmp_path / "page" / name).stat().st_size > 1000


def test_page_without_any_runs(tmp_path):
    text = render(Sources((tmp_path / "none.sqlite",), (tmp_path / "base.sqlite",)), tmp_path / "formats.md")
    assert "Based on **0 runs**" in text and "No finished runs of the new layouts yet." in text
    assert (tmp_path / "formats_kld.png").exists()
