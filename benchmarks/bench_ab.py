"""One fake-quantization timed in two checkouts of the project, in turns, in one run: a speed change measured against
the code before it, not against a number from another day.

    git worktree add --detach /tmp/before COMMIT
    .venv/bin/python benchmarks/bench_ab.py --before /tmp/before --formats iq4_nl,iq4_xs [--write]
    .venv/bin/python benchmarks/bench_ab.py --before /tmp/before --kind awq_search --formats mxint4 --size 8960 \
        --name awq --write
    .venv/bin/python benchmarks/bench_ab.py --before /tmp/before --kind gptq_stacked --formats int4,mxint4 --size 576 \
        --repeats 3 --name gptq --write
    .venv/bin/python benchmarks/bench_ab.py --before /tmp/before --kind calib_hessians --formats - --size 8960 \
        --repeats 3 --name calib --write

Each timing is its own process (``python -c``, one torch thread) running ``formats.fake_quantize`` of a seeded
``--size`` x ``--size`` float32 weight after a small warm-up, before and after alternating ``--repeats`` times, so
that the machine's load falls on both alike; the ratio is taken pair by pair and its median reported. Writes the
section ``ab-<name>`` of reports/benchmarks.md with ``--write``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_average, stamp, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: what is timed, by ``--kind``: ``fake_quantize`` of a seeded n x n weight; ``awq_search``, AWQ's grid search
#: (``quantize.awq.search_scales``, 4 grid points) on one down projection of a 1.5B Qwen2's shape: a [1536, n]
#: weight against an [n, n] Hessian of random inputs (n = 8960 there); ``gptq_stacked``, GPTQ's stacked column loop
#: (``quantize.gptq.gptq_quantize_stacked``, as the GPTQ price runs it) on 30 layers of [1536, n] (SmolLM2's gate and
#: up projections stacked over its 30 blocks at n = 576), each with its own Hessian factor of random inputs;
#: ``calib_hessians``, ``quantize.calib.collect_hessians`` (GPTQ's calibration statistics) over 8 windows of 256 tokens,
#: one at a time, on one random-weight Qwen2 block of Qwen2.5-1.5B's widths (hidden 1536, FFN n = 8960)
SNIPPETS = {
    "fake_quantize": (
        "import sys, time, torch; torch.set_num_threads(1); from quantpredict import formats; "
        "x = torch.randn({n}, {n}, generator=torch.Generator().manual_seed(0)); "
        "formats.fake_quantize(x[:64], '{fmt}'); t = time.perf_counter(); formats.fake_quantize(x, '{fmt}'); "
        "print(time.perf_counter() - t)"),
    "awq_search": (
        "import sys, time, torch; torch.set_num_threads(1); from quantpredict.quantize.awq import search_scales; "
        "g = torch.Generator().manual_seed(0); w = torch.randn(1536, {n}, generator=g); "
        "x = torch.randn(2 * {n}, {n}, generator=g, dtype=torch.float64); h = 2 * x.T @ x / x.shape[0]; "
        "m = x.abs().mean(0); t = time.perf_counter(); search_scales([w], [('{fmt}', None)], h, m, n_grid=4); "
        "print(time.perf_counter() - t)"),
    "gptq_stacked": (
        "import sys, time, torch; torch.set_num_threads(1); "
        "from quantpredict.quantize.gptq import gptq_quantize_stacked, hessian_inverse_factor; "
        "g = torch.Generator().manual_seed(0); w = torch.randn(30, 1536, {n}, generator=g); "
        "x = torch.randn(30, 2 * {n}, {n}, generator=g, dtype=torch.float64); "
        "h = 2 * x.transpose(1, 2) @ x / x.shape[1]; "
        "d = torch.diagonal(h, dim1=1, dim2=2).clone(); u = torch.stack([hessian_inverse_factor(m) for m in h]); "
        "t = time.perf_counter(); gptq_quantize_stacked(w, d, u, '{fmt}'); print(time.perf_counter() - t)"),
    "calib_hessians": (
        "import sys, time, torch; torch.set_num_threads(1); torch.manual_seed(0); "
        "from transformers import Qwen2Config, Qwen2ForCausalLM; "
        "from quantpredict.quantize.calib import collect_hessians; "
        "cfg = Qwen2Config(hidden_size=1536, intermediate_size={n}, num_hidden_layers=1, num_attention_heads=12, "
        "num_key_value_heads=2, vocab_size=1024); m = Qwen2ForCausalLM(cfg).eval(); "
        "ids = torch.randint(0, 1024, (8, 256), generator=torch.Generator().manual_seed(0)); "
        "t = time.perf_counter(); collect_hessians(m, ids, batch_size=1); print(time.perf_counter() - t)"),
}


def timed(tree: Path, fmt: str, n: int, kind: str = "fake_quantize") -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", SNIPPETS[kind].format(n=n, fmt=fmt)], cwd=tree, env=env, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def commit_of(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the code before the change")
    ap.add_argument("--after", type=Path, default=ROOT, help="the checkout with the change (default: this one)")
    ap.add_argument("--formats", default="iq4_nl,iq4_xs")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="iq4", help="the section is ab-NAME")
    ap.add_argument("--kind", choices=sorted(SNIPPETS), default="fake_quantize", help="what is timed (see SNIPPETS)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    for tree in (args.before, args.after):
        if not (tree / "quantpredict" / "__init__.py").is_file():
            print(f"bench_ab: error: {tree} is not a checkout of the project (no quantpredict/__init__.py)",
                  file=sys.stderr)
            return 2
    rows = ["| format | before s (median) | after s (median) | speed-up (median of pairs) |", "|---|---:|---:|---:|"]
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        pairs = [(timed(args.before, fmt, args.size, args.kind), timed(args.after, fmt, args.size, args.kind))
                 for _ in range(args.repeats)]
        b, a = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        ratio = statistics.median(p[0] / p[1] for p in pairs)
        rows.append(f"| {fmt} | {b:.2f} | {a:.2f} | {ratio:.1f}x |")
        print(rows[-1], flush=True)
    what = {"fake_quantize": f"One {args.size}x{args.size} float32 weight",
            "awq_search": f"AWQ's grid search (4 grid points) on a [1536, {args.size}] float32 weight against an "
                          f"[{args.size}, {args.size}] Hessian",
            "gptq_stacked": f"GPTQ's stacked column loop on 30 float32 layers of [1536, {args.size}], each against "
                            "its own Hessian factor",
            "calib_hessians": "GPTQ's calibration statistics (`collect_hessians`, every linear's x^T x) over 8 "
                              f"windows of 256 tokens on one random-weight Qwen2 block, hidden 1536, FFN {args.size}"
            }[args.kind]
    text = "\n".join([
        f"## A/B: `{args.kind}` before and after ({args.name}; `benchmarks/bench_ab.py --kind {args.kind}`)", "",
        f"{stamp()} Load average {load_average()} at the end (other jobs on both cores: the ratios, taken "
        f"pair by pair, are the numbers to read). Before: commit {commit_of(args.before)}; after: commit "
        f"{commit_of(args.after)}. {what}, one torch thread, each timing its own process, {args.repeats} pairs in "
        f"turns.", "", *rows])
    if args.write:
        write_section(f"ab-{args.name}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
