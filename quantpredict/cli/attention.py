"""`quantpredict attention ...`: the sparse-attention benchmark and the self-selected-spans arithmetic study."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantpredict.cli import options
from quantpredict.errors import DataError


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DataError(f"expected comma-separated integers, got {text!r} (e.g. 512,1024,2048)") from None
    if not vals or min(vals) < 1:
        raise DataError(f"expected positive integers, got {text!r}")
    return vals


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DataError(f"expected comma-separated densities, got {text!r} (e.g. 0.05,0.25,1.0)") from None
    if not vals or min(vals) <= 0 or max(vals) > 1:
        raise DataError(f"densities must lie in (0, 1], got {text!r}")
    return vals


CLOCK_TEXT = {"thread": "the calling thread's CPU time (on a shared machine wall time would mostly measure the "
                        "wait for a core)", "wall": "wall time"}


def register(subparsers) -> None:
    p = subparsers.add_parser("attention", help="sparse attention: benchmark and self-selected spans")
    sub = p.add_subparsers(dest="attention_command", metavar="ACTION", required=True)

    b = sub.add_parser("bench", help="decode-step latency and tokens/s, dense vs block-sparse, on this machine")
    b.add_argument("--contexts", type=_ints, default=_ints("512,1024,2048,4096,8192"))
    b.add_argument("--densities", type=_floats, default=_floats("0.05,0.1,0.25,0.5,1.0"))
    b.add_argument("--out", type=Path, default=Path("reports"), help="folder of attention.md and the figure")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--heads", type=int, default=16)
    b.add_argument("--head-dim", type=int, default=64)
    b.add_argument("--block-size", type=int, default=64)
    b.add_argument("--repeats", type=int, default=15, help="timed repeats per cell (the median is reported)")
    b.add_argument("--threads", type=int, default=1, help="torch threads")
    b.add_argument("--clock", choices=("thread", "wall"), default="thread",
                   help="thread: CPU time of the calling thread (needs --threads 1; robust on a shared machine); "
                        "wall: elapsed time")
    b.set_defaults(func=run_bench)

    t = sub.add_parser("train-arith", help="train the small Llama on the arithmetic task (CPU, resumable)")
    t.add_argument("--out", type=Path, default=Path("data/attention"))
    t.add_argument("--minutes", type=options.positive(float), default=25.0,
                   help="wall-time budget, resumed runs included")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval-arith", help="dense vs on-the-fly sparse generation on held-out expressions")
    e.add_argument("--model", type=Path, default=Path("data/attention"))
    e.add_argument("--operands", type=_ints, default=_ints("22,32"),
                   help="expression sizes; a trace of n operands is n*96+1 tokens (22 -> 2113, 32 -> 3073)")
    e.add_argument("--examples", type=int, default=16)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--seed", type=int, default=12345, help="held-out seed (training draws from seed 0's stream)")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--out", type=Path, default=Path("reports"))
    e.set_defaults(func=run_eval)


def run_bench(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from quantpredict.attention.bench import (
        REPORT_NAME,
        bench_decode,
        bench_markdown,
        machine,
        plot_bench,
        write_section,
    )

    if args.clock == "thread" and args.threads != 1:
        raise DataError("--clock thread times only the calling thread: use it with --threads 1, or --clock wall")
    options.check_out(args.out, "--out", kind="dir")
    torch.set_num_threads(args.threads)
    bar = tqdm(total=len(args.contexts) * len(args.densities), desc="attention bench")

    def progress(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update()

    df = bench_decode(args.contexts, args.densities, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                      block_size=args.block_size, repeats=args.repeats, clock=args.clock,
                      progress=progress)
    bar.close()
    fig = plot_bench(df, args.out / "attention_bench.png")
    settings = (f"Measured {machine()}. One attention layer, one decode step: batch {args.batch}, {args.heads} heads "
                f"x {args.head_dim} dims, float32 KV cache, blocks of {args.block_size} keys, a seeded random "
                f"`density` fraction of the blocks read (the query's own block always). Dense = "
                "`scaled_dot_product_attention` over the whole cache, measured in the same run, alternating with the "
                f"sparse call; medians of {args.repeats} repeats of "
                f"{CLOCK_TEXT[args.clock]}. "
                "tok/s = batch / latency. The Triton kernel "
                "(`quantpredict/attention/triton_kernel.py`) was NOT run: no GPU was available.")
    path = write_section(args.out / REPORT_NAME, "bench", bench_markdown(df, fig.name, settings))
    df.to_csv(args.out / "attention_bench.csv", index=False)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(f"wrote {path} and {fig}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from quantpredict.attention.arith_model import TrainConfig, train_arith

    options.check_out(args.out, "--out", kind="dir")
    train_arith(args.out, TrainConfig(minutes=args.minutes, seed=args.seed, threads=args.threads),
                log=lambda s: print(s, flush=True))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from quantpredict.attention.arith_eval import eval_arith

    options.check_out(args.out, "--out", kind="dir")
    torch.set_num_threads(args.threads)
    eval_arith(args.model, args.operands, n_examples=args.examples, batch_size=args.batch_size, seed=args.seed,
               out=args.out)
    return 0
