"""Time a fake_quantize round trip of a 4096x4096 float32 tensor per format against clone() in the same run.

clone() reads and writes the tensor once: the memory floor of any round trip. Each format is timed over ``--repeats``
runs interleaved with clone() runs, so both see the same machine load (2 shared cores here: noisy); the table gives
the ratio of the medians and of the minima (the least disturbed runs). The fused kernel and the plain-torch
reference are both reported; the table goes to reports/benchmarks.md.

    .venv/bin/python benchmarks/bench_formats.py [--size 4096] [--repeats 15] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stamp, write_section  # noqa: E402

from quantpredict.formats import fake_quantize, fake_quantize_reference, get_format, list_formats, native  # noqa: E402

TARGET = 4.0  # every MX format within 4x of clone()
REFERENCE_POINTS = "torchao 0.18: MXFP4 24x, MXFP8-E4M3 4.2x; dmx-compressor MXFP4 13x (issue 2, same machine type)"


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fn, x: torch.Tensor, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each fn(x) and each x.clone(), run alternately."""
    fn(x)  # warm-up (first-touch allocations, kernel load)
    fs, cs = [], []
    for _ in range(repeats):
        cs.append(_time(lambda: x.clone()))
        fs.append(_time(lambda: fn(x)))
    return fs, cs


def compile_seconds() -> float | None:
    """Seconds to compile the fused kernel from scratch (it is cached per machine afterwards)."""
    cc = native._compiler()
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        native._compile(cc, Path(tmp) / "k.so")
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--ref-repeats", type=int, default=1, help="repeats for the (slow) torch reference; 0 skips it")
    ap.add_argument("--formats", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave reports/benchmarks.md alone")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    fused = native.available()
    names = args.formats.split(",") if args.formats else list_formats()
    rows = []
    for name in names:
        f = get_format(name)
        fq, clone_f = interleaved(lambda t, n=name: fake_quantize(t, n), x, args.repeats)
        med = statistics.median
        if args.ref_repeats > 0:
            ref, clone_r = interleaved(lambda t, n=name: fake_quantize_reference(t, n), x, args.ref_repeats)
        else:
            ref, clone_r = [float("nan")], [1.0]
        row = dict(format=name, family=f.family, fused_ms=med(fq) * 1e3, clone_ms=med(clone_f) * 1e3,
                   ratio=med(fq) / med(clone_f), best_ratio=min(fq) / min(clone_f),
                   ref_ratio=med(ref) / med(clone_r))
        rows.append(row)
        print(f"{name:12s} {row['fused_ms']:8.1f} ms  clone {row['clone_ms']:7.1f} ms  {row['ratio']:5.2f}x "
              f"(minima {row['best_ratio']:4.2f}x)  (torch reference {row['ref_ratio']:5.1f}x)", flush=True)

    mx = [r for r in rows if r["family"] == "mx"]
    worst = max((r["ratio"] for r in mx), default=float("nan"))
    worst_best = max((r["best_ratio"] for r in mx), default=float("nan"))
    met = bool(mx) and worst <= TARGET and fused
    comp = compile_seconds() if fused else None
    lines = [
        f"### formats: fake_quantize round trip, {args.size}x{args.size} float32, vs clone()",
        "",
        stamp(),
        f"Median of {args.repeats} runs (torch reference: {args.ref_repeats}), each interleaved with a clone() of the "
        "same tensor; ratio = round trip / clone. Path: "
        + ("fused one-pass C kernel (`quantpredict/formats/native.py`)" if fused else "torch reference (no compiler)")
        + (f", compiled once per machine in {comp:.2f} s." if comp is not None else ".")
        + f" Load average at the end of the run: {os.getloadavg()[0]:.1f} (the machine is shared).",
        "",
        "| format | family | round trip ms (median) | clone ms (median) | ratio of medians | ratio of minima | "
        "torch reference ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
        *[f"| {r['format']} | {r['family']} | {r['fused_ms']:.1f} | {r['clone_ms']:.1f} | {r['ratio']:.2f}x | "
          f"{r['best_ratio']:.2f}x | {r['ref_ratio']:.1f}x |" for r in rows],
        "",
        f"Target: every MX format within {TARGET:g}x of clone: **{'met' if met else 'NOT met'}** "
        f"(worst MX ratio of medians {worst:.2f}x, of minima {worst_best:.2f}x). For reference, {REFERENCE_POINTS}.",
    ]
    md = "\n".join(lines)
    print("\n" + md)
    if not args.no_write:
        write_section("formats", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
