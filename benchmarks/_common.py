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


def write_between(path: Path, tag: str, markdown: str, new_page: str = "") -> None:
    """Replace the block of ``path`` between ``<!-- tag -->`` and ``<!-- /tag -->`` with ``markdown`` (the text
    around it is kept), or append the block (to ``new_page`` when the file does not exist yet)."""
    text = path.read_text() if path.exists() else new_page
    begin, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section ``name`` of reports/benchmarks.md, delimited by HTML comments."""
    write_between(BENCH_MD, f"bench:{name}", markdown, "# Benchmarks\n\nEach section is written by its script in "
                  "`benchmarks/`; rerun the script to refresh it.\n")


def _rss_of_tree(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def run_measured(argv: list[str], *, threads: int = 1, timeout: float | None = None,
                 max_rss_bytes: int | None = None, min_available_bytes: int = 3 * 2**30) -> dict:
    """Run ``argv`` (a Python child that prints one JSON object as its last stdout line) under ``/usr/bin/time -v``
    with ``threads`` OpenMP/MKL threads; returns that object plus ``wall_s`` and ``peak_rss_bytes`` of the child
    process (its maximum resident set size, which includes the interpreter, torch and the data).

    A watchdog stops the child (and raises) if its resident size passes ``max_rss_bytes`` or the machine's available
    memory falls below ``min_available_bytes``: a shared machine's other jobs must not meet the OOM killer."""
    import json
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(["/usr/bin/time", "-v", sys.executable, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    start, stopped = time.monotonic(), None
    while proc.poll() is None:
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            rss = _rss_of_tree(proc.pid)
            if max_rss_bytes is not None and rss > max_rss_bytes:
                stopped = f"its resident size reached {rss / 2**30:.1f} GiB (limit {max_rss_bytes / 2**30:.1f})"
            elif _mem_available() < min_available_bytes:
                stopped = f"the machine's available memory fell below {min_available_bytes / 2**30:.1f} GiB"
            elif timeout is not None and time.monotonic() - start > timeout:
                stopped = f"it ran past {timeout:.0f} s"
            if stopped:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    stdout, stderr = proc.communicate()
    if stopped:
        raise RuntimeError(f"{' '.join(argv)} was stopped: {stopped}")
    fields = {}
    for line in stderr.splitlines():
        key, _, value = line.strip().partition(": ")
        fields[key] = value
    if proc.returncode != 0:
        own = re.split(r"Command exited with non-zero status|\tCommand being timed:", stderr)[0]  # not time's report
        tail = "\n".join(own.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(argv)} failed with status {proc.returncode}:\n{tail}")
    out = json.loads(stdout.strip().splitlines()[-1])
    wall = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    out["wall_s"] = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
    out["peak_rss_bytes"] = int(fields["Maximum resident set size (kbytes)"]) * 1024
    return out


def load_average() -> str:
    try:
        return ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def timed_compare(model, tok, windows: int) -> dict:
    """The comparison stage of the memory benchmarks: an RTN mxint4 copy of ``model`` (quantized on one dummy
    window: RTN needs no data) against ``model`` on the first ``windows`` test windows, timed."""
    import copy
    import time

    import torch

    from quantpredict import evaluate
    from quantpredict.quantize import Recipe, quantize_model

    q = copy.deepcopy(model)
    quantize_model(q, Recipe("mxint4"), torch.zeros(1, 8, dtype=torch.long), progress=False)
    t0 = time.perf_counter()
    c = evaluate.compare(model, q, tok, max_windows=windows, progress=False)
    return {"seconds": time.perf_counter() - t0, "tokenize_seconds": c.tokenize_seconds, "delta_nll": c.delta_nll}


def truncate_blocks(model, n_blocks: int) -> int:
    """Keep the first ``n_blocks`` transformer blocks of ``model`` (the rest are dropped); returns the original
    count."""
    from torch import nn

    from quantpredict import arch

    blocks = arch.blocks(model)
    parent = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    parent.layers = nn.ModuleList(blocks[:n_blocks])
    model.config.num_hidden_layers = n_blocks
    return len(blocks)


def quantize_stages(name: str, stage: str, gptq_blocks: int | None) -> tuple[dict | None, object, object, dict]:
    """The stages every memory benchmark shares, in a child process: load ``name`` (float32, eager attention) and
    read every weight once; then ``load`` (nothing more), ``rtn`` (MXINT4, in place, data-free) or ``gptq`` (MXINT4,
    128 x 256 calibration tokens; with ``gptq_blocks`` the first N blocks timed and scaled to the whole model).
    Returns ``(result or None for another stage, model, tokenizer, {"load_seconds": ...})``."""
    import time

    import torch

    from quantpredict import arch, models
    from quantpredict.quantize import Recipe, quantize_model, sample_calibration

    t0 = time.perf_counter()
    model, tok = models.load(name, attn_implementation="eager")
    arch.check_finite(model)  # reads every weight
    out = {"load_seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    result = None
    if stage == "load":
        result = {"seconds": out["load_seconds"], **out}
    elif stage == "rtn":
        quantize_model(model, Recipe("mxint4"), torch.zeros(1, 8, dtype=torch.long), progress=False)
        result = {"seconds": time.perf_counter() - t0, **out}
    elif stage == "gptq":
        calib = sample_calibration(tok, 128, 256)
        out["calib_seconds"] = time.perf_counter() - t0
        total = len(arch.blocks(model))
        done = total if gptq_blocks is None else min(gptq_blocks, total)
        if done < total:
            truncate_blocks(model, done)
        t0 = time.perf_counter()
        quantize_model(model, Recipe("mxint4", method="gptq"), calib, progress=False)
        seconds = time.perf_counter() - t0
        result = {"seconds": seconds * total / done, "measured_seconds": seconds, "blocks_timed": done,
                  "blocks": total, **out}
    return result, model, tok, out


def measure_stage(argv: list[str], *, label: str, target_gib: float, results: dict, where: dict, key: str,
                  results_path: Path) -> dict:
    """Run one benchmark stage as its own measured process (:func:`run_measured`, stopped past ``target_gib``), file
    its result under ``where[key]``, print one line, and rewrite ``results_path`` with ``results`` and the machine,
    so an interrupted benchmark keeps every stage it finished."""
    import json
    import time

    r = run_measured(argv, max_rss_bytes=int(target_gib * 2**30))
    where[key] = r
    print(f"{label} {r['seconds']:8.1f} s  peak {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    results["_meta"] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "load": load_average()}
    results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return r
