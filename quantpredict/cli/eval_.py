"""``quantpredict eval MODEL [--against FP_MODEL]``: perplexity with its standard error, or the quantized-vs-FP
comparison (delta NLL / perplexity, KL divergence, top-1 agreement)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from quantpredict.cli import options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="WikiText-2 perplexity of a model, or its comparison against an FP model",
        description="Perplexity of MODEL on a bundled text split (non-overlapping windows of --seq-len tokens), with "
                    "the standard error of its NLL over windows. With --against FP_MODEL, MODEL is compared with its "
                    "FP original on the same windows: delta perplexity and NLL with paired standard errors, mean "
                    "KL(P_fp || P_model) and top-1 agreement.")
    p.add_argument("model", metavar="MODEL",
                   help="zoo name (see `quantpredict zoo list`) or a local HF model directory")
    p.add_argument("--against", metavar="FP_MODEL", default=None,
                   help="the FP original to compare MODEL against (zoo name or directory); its tokenizer is used")
    p.add_argument("--dataset", default="wikitext2", help="bundled data set (default: wikitext2)")
    p.add_argument("--split", default="test", help="split of the data set (default: test)")
    p.add_argument("--seq-len", type=options.positive(int, minimum=2), default=256,
                   help="window length in tokens (default: 256)")
    p.add_argument("--stride", type=options.positive(int), default=None,
                   help="sliding windows every N tokens (each token scored once); default: non-overlapping windows")
    p.add_argument("--max-windows", type=options.positive(int), default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=options.positive(int), default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    options.add_text(p, eval_text=True)
    options.add_device(p)
    options.add_dtype(p, "evaluation's forward passes (the models are loaded in it)")
    options.add_threads(p)
    p.set_defaults(func=run)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    # strict JSON has no NaN (standard errors of a single window)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _data_line(dataset: str, split: str, windows: int, seq_len: int, stride: int | None, tokens: int) -> str:
    how = f"windows of {seq_len} tokens" + (f", stride {stride}" if stride else "")
    return f"{dataset} {split}".rstrip() + f": {windows:,} {how}, {tokens:,} predicted tokens"


def _what(args: argparse.Namespace, dataset: str, split: str) -> tuple[str, str]:
    """What was evaluated, for the table: the user's text file, or the bundled split."""
    return (f"text file {args.eval_text}", "") if args.eval_text else (dataset, split)


def run(args: argparse.Namespace) -> int:
    from quantpredict.evaluate import compare, perplexity
    from quantpredict.models import load

    device, dtype = options.device(args), options.dtype(args)
    opts = dict(dataset=args.dataset, split=args.split, seq_len=args.seq_len, stride=args.stride,
                max_windows=args.max_windows, batch_size=args.batch_size, text=args.eval_text)
    options.check_texts(args)  # a missing or non-UTF-8 file fails before any model loads
    for name in (args.model, args.against):  # so does a corrupt or incomplete model
        if name is not None:
            options.check_model(name)
    if args.against is None:
        model, tokenizer = load(args.model, dtype=dtype, device=device)
        res = perplexity(model, tokenizer, **opts)
        if args.json:
            print(json.dumps(_jsonable({"model": str(args.model), **res.to_dict()})))
            return 0
        rows = [
            ("model", str(args.model)),
            ("data", _data_line(*_what(args, res.dataset, res.split), res.windows, res.seq_len, res.stride,
                                res.tokens)),
            ("perplexity", f"{res.ppl:.4f} ± {res.ppl_se:.4f}"),
            ("NLL", f"{res.nll:.5f} ± {res.nll_se:.5f} nats/token"),
            ("time", f"{res.seconds:.1f} s ({res.tokens_per_second:,.0f} tokens/s"
                     + (f"; {res.tokenize_seconds:.1f} s of it tokenizing)" if res.tokenize_seconds >= 0.05 else ")")),
        ]
    else:
        model_fp, tokenizer = load(args.against, dtype=dtype, device=device)
        model_q, _ = load(args.model, dtype=dtype, device=device)
        c = compare(model_fp, model_q, tokenizer, **opts)
        if args.json:
            print(json.dumps(_jsonable({"model": str(args.model), "against": str(args.against), **c.to_dict()})))
            return 0
        rows = [
            ("model", str(args.model)),
            ("against (FP)", str(args.against)),
            ("data", _data_line(*_what(args, c.dataset, c.split), c.windows, c.seq_len, c.stride, c.eval_tokens)),
            ("perplexity", f"{c.ppl_quant:.4f} vs FP {c.ppl_fp:.4f}: {c.delta_ppl:+.4f} ± {c.delta_ppl_se:.4f} "
                           f"({c.delta_ppl_pct:+.2f}%)"),
            ("NLL", f"{c.nll_quant:.5f} vs FP {c.nll_fp:.5f}: {c.delta_nll:+.5f} ± {c.delta_nll_se:.5f} nats/token"),
            ("KL(FP || model)", f"{c.kld:.5f} ± {c.kld_se:.5f} nats/token"),
            ("top-1 agreement", f"{c.top1_agreement_pct:.2f} ± {c.top1_agreement_pct_se:.2f} %"),
            ("time", f"{c.seconds:.1f} s" + (f" ({c.tokenize_seconds:.1f} s of it tokenizing)"
                                              if c.tokenize_seconds >= 0.05 else "")),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
