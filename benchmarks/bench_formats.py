"""Time a fake_quantize round trip of a 4096x4096 float32 tensor per format against clone() in the same run.

clone() reads and writes the tensor once: the memory floor of any round trip. Each format is timed over ``--repeats``
runs interleaved with clone() runs, so both see the same machine load (2 shared cores here: noisy); the table gives
the ratio of the medians and of the minima (the least disturbed runs). The fused kernel and the plain-torch
reference are both reported; the table goes to reports/benchmarks.md.

``--shipped`` times the layouts checkpoints ship (uintK, nf4, q8_0, k-quants) instead, into their own section: the
round trip, the k-quant scale search alone (C kernel and torch), and optionally llama.cpp's own reference quantizer
(``--llama-ref LIB``: a shared library exporting ``quantize_row_q4_K_ref`` etc., e.g. libggml-base).

    .venv/bin/python benchmarks/bench_formats.py [--size 4096] [--repeats 15] [--no-write]
    .venv/bin/python benchmarks/bench_formats.py --shipped [--repeats 5] [--llama-ref path/to/libggml-base.so]
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
from quantpredict.formats.params import is_shipped  # noqa: E402

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
    ap.add_argument("--shipped", action="store_true", help="time the shipped layouts into their own section")
    ap.add_argument("--llama-ref", default=None, help="with --shipped: also time llama.cpp's _ref quantizers in LIB")
    args = ap.parse_args(argv)
    if args.shipped:
        return shipped(args)

    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    fused = native.available()
    names = args.formats.split(",") if args.formats else [n for n in list_formats() if not is_shipped(get_format(n))]
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


SHIPPED = ["uint8", "uint4", "uint3", "uint2", "uint4_pc", "nf4", "nf4_dq", "q8_0", "q6_k", "q5_k", "q4_k"]
LLAMA_REF = {"q8_0": ("q8_0", 32, 34), "q4_k": ("q4_K", 256, 144), "q5_k": ("q5_K", 256, 176),
             "q6_k": ("q6_K", 256, 210)}


def _search_seconds(x: torch.Tensor, name: str, use_native: bool) -> float:
    """Seconds of the k-quant scale search alone (make_qkx2_quants / make_qx_quants over every sub-block)."""
    from quantpredict.formats import ggml

    if name == "q6_k":
        sub = x.reshape(-1, 16)
        if use_native:
            return _time(lambda: native.qx_search(sub))
        return _time(lambda: [ggml._qx_chunk(sub[a : a + ggml.CHUNK].t().contiguous())
                              for a in range(0, sub.shape[0], ggml.CHUNK)])
    nmax, rmin, rdelta, nstep = ggml.KX2[name]
    sub = x.reshape(-1, 32)
    if use_native:
        return _time(lambda: native.kx2_search(sub, nmax, rmin, rdelta, nstep))
    return _time(lambda: [ggml._qkx2_chunk(sub[a : a + ggml.CHUNK].t().contiguous(), nmax, rmin, rdelta, nstep)
                          for a in range(0, sub.shape[0], ggml.CHUNK)])


def _llama_seconds(lib_path: str, x: torch.Tensor, name: str) -> float:
    import ctypes

    import numpy as np

    fn, block, size = LLAMA_REF[name]
    lib = ctypes.CDLL(lib_path)
    a = np.ascontiguousarray(x.numpy())
    out = np.zeros(a.size // block * size, dtype=np.uint8)
    q = getattr(lib, f"quantize_row_{fn}_ref")
    return _time(lambda: q(ctypes.c_void_p(a.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(a.size)))


def shipped(args) -> int:
    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    fused = native.available()
    names = args.formats.split(",") if args.formats else SHIPPED
    med = statistics.median
    rows = []
    for name in names:
        fq, cl = interleaved(lambda t, n=name: fake_quantize(t, n), x, args.repeats)
        ref = _time(lambda n=name: fake_quantize_reference(x, n)) if args.ref_repeats > 0 else float("nan")
        row = dict(format=name, ms=med(fq) * 1e3, best_ms=min(fq) * 1e3, clone_ms=med(cl) * 1e3,
                   ratio=med(fq) / med(cl), torch_ms=ref * 1e3, search_c=float("nan"), search_t=float("nan"),
                   llama=float("nan"))
        if name in ("q4_k", "q5_k", "q6_k"):
            if fused:
                row["search_c"] = 1e3 * min(_search_seconds(x, name, True) for _ in range(3))
            row["search_t"] = 1e3 * _search_seconds(x, name, False)
        if args.llama_ref and name in LLAMA_REF:
            row["llama"] = 1e3 * min(_llama_seconds(args.llama_ref, x, name) for _ in range(2))
        rows.append(row)
        print(f"{name:9s} {row['ms']:8.1f} ms (min {row['best_ms']:.1f})  clone {row['clone_ms']:6.1f} ms  "
              f"{row['ratio']:5.1f}x  torch path {row['torch_ms']:8.1f} ms  search C {row['search_c']:7.1f} ms  "
              f"search torch {row['search_t']:7.1f} ms  llama.cpp ref {row['llama']:7.1f} ms", flush=True)

    def cell(v: float) -> str:
        return "-" if v != v else f"{v:.0f}"

    worst = max(r["ms"] for r in rows)
    lines = [
        f"### formats: shipped layouts, fake_quantize of a {args.size}x{args.size} float32 weight",
        "",
        stamp(),
        f"Round trip: median (and minimum) of {args.repeats} runs of `fake_quantize`, each interleaved with a clone() "
        "of the same tensor; *torch path*: one run of `fake_quantize_reference` (no C kernel). *Search*: llama.cpp's "
        "per-sub-block scale search alone (`make_qkx2_quants` for q4_k/q5_k, `make_qx_quants` for q6_k), in the C "
        "kernel of `quantpredict/formats/native.py` (64 sub-blocks per vectorised pass; best of 3) and in torch"
        + (f"; *llama.cpp ref*: its own `quantize_row_*_ref` (scalar C, from `{Path(args.llama_ref).name}`) on the "
           "same tensor, best of 2" if args.llama_ref else "") + ". Path: "
        + ("C kernel for the searches, torch for the rest" if fused else "torch only (no compiler)")
        + f". Load average at the end of the run: {os.getloadavg()[0]:.1f} (the machine is shared: other jobs ran).",
        "",
        "| format | round trip ms (median) | min ms | clone ms | ratio | torch path ms | search C ms | search torch ms"
        + (" | llama.cpp ref ms |" if args.llama_ref else " |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.llama_ref else ""),
        *[f"| {r['format']} | {r['ms']:.0f} | {r['best_ms']:.0f} | {r['clone_ms']:.0f} | {r['ratio']:.1f}x | "
          f"{cell(r['torch_ms'])} | {cell(r['search_c'])} | {cell(r['search_t'])} |"
          + (f" {cell(r['llama'])} |" if args.llama_ref else "") for r in rows],
        "",
        f"Target: each shipped format well under a second on one thread: slowest median {worst:.0f} ms "
        f"(**{'met' if worst < 1000 else 'NOT met'}**).",
    ]
    md = "\n".join(lines)
    print("\n" + md)
    if not args.no_write:
        write_section("formats-shipped", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
