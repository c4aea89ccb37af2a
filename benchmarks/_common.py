"""Helpers shared by the benchmark scripts: machine facts and writing one section of reports/benchmarks.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

REPORTS = Path(__file__).resolve().parent.parent / "reports"
BENCH_MD = REPORTS / "benchmarks.md"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def stamp() -> str:
    return f"Measured {_dt.date.today().isoformat()} on {machine()}."


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section ``name`` of reports/benchmarks.md, delimited by HTML comments."""
    REPORTS.mkdir(exist_ok=True)
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n\nEach section is written by its script in "\
        "`benchmarks/`; rerun the script to refresh it.\n"
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCH_MD.write_text(text)
