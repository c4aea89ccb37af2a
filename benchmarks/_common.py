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


def run_measured(argv: list[str], *, threads: int = 1, timeout: float | None = None) -> dict:
    """Run ``argv`` (a Python child that prints one JSON object as its last stdout line) under ``/usr/bin/time -v``
    with ``threads`` OpenMP/MKL threads; returns that object plus ``wall_s`` and ``peak_rss_bytes`` of the child
    process (its maximum resident set size, which includes the interpreter, torch and the data)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)
    fields = {}
    for line in proc.stderr.splitlines():
        key, _, value = line.strip().partition(": ")
        fields[key] = value
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-25:])
        raise RuntimeError(f"{' '.join(argv)} failed with status {proc.returncode}:\n{tail}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    wall = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    out["wall_s"] = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
    out["peak_rss_bytes"] = int(fields["Maximum resident set size (kbytes)"]) * 1024
    return out


def load_average() -> str:
    try:
        return ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"
