"""Evaluation cost: WikiText-2 test tokens per second for each zoo model, and the seconds a full test-split
evaluation takes at seq_len 256 (the cost that quantpredict's predictions are measured against).

For each zoo model (``quantpredict.models.list_zoo()``): perplexity on a fixed prefix of ``--windows`` windows at
batch size 1 (the baseline: one window per forward pass) and at ``--batch-size``, and ``compare`` of the model against
itself (two forward passes plus the KL and top-1 statistics). Full-split seconds are tokenization plus the full
window count at the measured batched rate; ``--full`` also runs the full split and checks it against the zoo card's
test perplexity. Writes the ``eval`` section of reports/benchmarks.md.

    .venv/bin/python benchmarks/bench_eval.py [--windows 32] [--batch-size 8] [--full] [--models a,b] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import stamp, write_section  # noqa: E402

SEQ_LEN = 256


def bench_model(name: str, *, windows: int, batch_size: int, full: bool) -> dict:
    from quantpredict import evaluate
    from quantpredict.data import token_ids
    from quantpredict.models import load, zoo_card

    model, tok = load(name)
    t0 = time.perf_counter()
    ids = token_ids(tok, "wikitext2", "test")
    tokenize_s = time.perf_counter() - t0
    full_windows = len(ids) // SEQ_LEN
    evaluate.perplexity(model, tok, max_windows=2, batch_size=2, progress=False)  # warm-up
    base = evaluate.perplexity(model, tok, max_windows=windows, batch_size=1, progress=False)
    batched = evaluate.perplexity(model, tok, max_windows=windows, batch_size=batch_size, progress=False)
    cmp_ = evaluate.compare(model, model, tok, max_windows=windows, batch_size=batch_size, progress=False)
    row = {
        "name": name,
        "params": zoo_card(name).get("n_params_nonembed", 0),
        "tps_b1": base.tokens_per_second,
        "tps": batched.tokens_per_second,
        "tps_compare": cmp_.eval_tokens / (cmp_.seconds - cmp_.tokenize_seconds),
        "tokenize_s": tokenize_s,
        "full_windows": full_windows,
        "full_tokens": full_windows * (SEQ_LEN - 1),
    }
    row["full_s_est"] = tokenize_s + row["full_tokens"] / row["tps"]
    row["compare_full_s_est"] = tokenize_s + row["full_tokens"] / row["tps_compare"]
    if full:
        res = evaluate.perplexity(model, tok, seq_len=SEQ_LEN, batch_size=batch_size, progress=None)
        row["full_s"] = res.seconds
        row["ppl"] = float(res)
        row["ppl_se"] = res.ppl_se
        row["card_ppl"] = zoo_card(name).get("test_ppl")
    return row


def render(rows: list[dict], args: argparse.Namespace) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"{stamp()} Load average at the end: {load} (other jobs share the cores: absolute rates are pessimistic, "
        "ratios within a row are measured back to back).",
        "",
        f"`benchmarks/bench_eval.py --windows {args.windows} --batch-size {args.batch_size}"
        + (" --full" if args.full else "") + "`: WikiText-2 test, non-overlapping windows of 256 tokens. Rates are "
        f"predicted tokens per second of model time on the first {args.windows} windows; *b1* is the baseline of one "
        f"window per forward pass, *batched* uses {args.batch_size}; *compare* is `evaluate.compare` of the model "
        "against itself (two forward passes plus the KL and top-1 statistics). Full-split seconds = tokenization + "
        "the split's windows at the batched rate" + ("; *measured* ran the full split." if args.full else "."),
        "",
    ]
    head = ("| model | non-emb. params | b1 tok/s | batched tok/s | batched / b1 | compare tok/s | tokenize s "
            "| full split s")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:"
    if args.full:
        head += " | measured s | test ppl | card ppl"
        sep += "|---:|---:|---:"
    lines += [head + " |", sep + "|"]
    for r in rows:
        line = (f"| {r['name']} | {r['params']:,} | {r['tps_b1']:,.0f} | {r['tps']:,.0f} "
                f"| {r['tps'] / r['tps_b1']:.2f}x | {r['tps_compare']:,.0f} | {r['tokenize_s']:.1f} "
                f"| {r['full_s_est']:.0f}")
        if args.full:
            card = f"{r['card_ppl']:.2f}" if r.get("card_ppl") else "-"
            line += f" | {r['full_s']:.0f} | {r['ppl']:.2f} ± {r['ppl_se']:.2f} | {card}"
        lines.append(line + " |")
    if rows:
        r = rows[0]
        lines += ["", f"The test split is {r['full_windows']:,} windows ({r['full_tokens']:,} predicted tokens) with "
                      "the zoo tokenizer. A comparison against the FP model costs about "
                      f"{sum(x['compare_full_s_est'] for x in rows) / sum(x['full_s_est'] for x in rows):.1f}x a "
                      "single evaluation (all models pooled)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=32, help="windows of 256 tokens timed per model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="also evaluate the full test split per model")
    parser.add_argument("--models", default=None, help="comma-separated zoo names (default: the whole zoo)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave reports/benchmarks.md alone")
    args = parser.parse_args(argv)

    from quantpredict.models import list_zoo

    names = args.models.split(",") if args.models else list_zoo()
    if not names:
        print("bench_eval: the zoo is empty (no trained models under data/zoo/); build it with `quantpredict zoo "
              "build`, then rerun. Nothing measured, reports/benchmarks.md left as it was.")
        return 0
    rows = []
    for name in names:
        row = bench_model(name, windows=args.windows, batch_size=args.batch_size, full=args.full)
        rows.append(row)
        print(f"{name}: b1 {row['tps_b1']:,.0f} tok/s, batched {row['tps']:,.0f} tok/s "
              f"({row['tps'] / row['tps_b1']:.2f}x), compare {row['tps_compare']:,.0f} tok/s, "
              f"full split ~{row['full_s_est']:.0f} s" + (f" (measured {row['full_s']:.0f} s)" if args.full else ""),
              flush=True)
    md = render(rows, args)
    print(md)
    if not args.no_write:
        write_section("eval", "## Evaluation (WikiText-2 perplexity)\n\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
