"""How the weights-only GPTQ price moves with the calibration windows its Hessians come from (issue #28).

The ``profile`` kind prices a GPTQ recipe by running GPTQ on each layer against an FP-input Hessian ``2A``
(:func:`quantpredict.features.fisher.iter_profile_deltas`), then the token-wise quadratic of the change on the
profile's first two windows. Until 2026-12-07 ``A`` came from the profile's 8 calibration windows (2,048 tokens),
which are also the windows the price reads; GPTQ itself (``quantize_model``) uses 128 windows (32,768 tokens), and
the price now reads those (:meth:`quantpredict.predict.rank.ModelProfile.calibration_hessians`). This study prices
each GPTQ recipe with the profile's 8 windows' moments and with moments measured again on ``n`` other windows
(WikiText-2 train, seed 1, disjoint in sampling from the profile's seed 0), beside the model's stored measured KLD:

    .venv/bin/python benchmarks/gptq_hessian_study.py --model smollm2-135m [--windows 32 128] [--out PAGE]

Prints one row per (windows, recipe): the measured KLD, the price with the profile's own Hessians, with the new ones,
and the two ratios KLD / price (a well-calibrated price keeps the ratio alike across recipes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STORES = {"smollm2-135m": ROOT / "data" / "runs" / "smollm2.sqlite",
          "qwen2.5-coder-1.5b": ROOT / "data" / "runs" / "qwen2.5-coder-1.5b.sqlite"}
ZOO_STORE = ROOT / "data" / "runs" / "runs.sqlite"  # any other name: a zoo model of the shipped sweep


def store_of(model: str) -> Path:
    return STORES.get(model, ZOO_STORE)


def measured_gptq(model: str) -> dict[str, float]:
    """The store's measured KLD of each plain GPTQ recipe of ``model`` (no activation quantization, AWQ or mix)."""
    from quantpredict.predict.classes import method_class
    from quantpredict.runs.table import read_runs, sweep_setting_runs

    runs = read_runs([store_of(model)])
    runs = sweep_setting_runs(runs[(runs["status"] == "done") & (runs["model"] == model)])[0]
    gptq = runs[runs.apply(method_class, axis=1) == "GPTQ"]
    return {str(r["recipe"]): float(r["kld"]) for _, r in gptq.iterrows()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="a real model of STORES or a zoo model of data/runs/runs.sqlite (e.g. llama-m)")
    ap.add_argument("--windows", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "gptq_hessian_study.md",
                    help="the page whose block <!-- gptq_hessian:MODEL --> gets the table (the text around it is kept)")
    args = ap.parse_args(argv)
    import torch

    from quantpredict import data
    from quantpredict.features.extract import feature_windows
    from quantpredict.features.moments import measure_input_moments
    from quantpredict.predict.rank import profile_model, recipe_row
    from quantpredict.recipe import Recipe

    measured = measured_gptq(args.model)  # checked before any model is loaded or file written
    if not measured:
        ap.error(f"{store_of(args.model)} has no done GPTQ run of {args.model!r}: name a real model of "
                 f"{', '.join(sorted(STORES))} or a zoo model of the shipped sweep (e.g. llama-m)")
    torch.set_num_threads(1)
    mp = profile_model(args.model)

    def priced_with(moments) -> dict[str, float]:
        """Each GPTQ recipe's price with its Hessians taken from ``moments`` (in place of its calibration's)."""
        out = {}
        for label in measured:
            recipe = Recipe.from_label(label)
            mp.calibration_moments[mp.calibration_key(recipe)] = moments
            mp.gptq_factors.clear()  # the factors belong to the Hessians they were computed from
            out[label] = recipe_row(mp, recipe)["token_gn_quad"]
        return out

    own = priced_with(mp.profile.input_moment)  # the profile's own 8 windows (the price before 2026-12-07)
    from quantpredict import models

    tok = models.load(args.model)[1]
    stream = data.token_stream(tok, "wikitext2", "train")
    import math
    import statistics

    def spread(prices: dict[str, float]) -> str:
        logs = [math.log(measured[k] / v) for k, v in prices.items()]
        return f"mean {statistics.fmean(logs):+.3f}, SD {statistics.pstdev(logs):.3f}"

    summary = [f"log(KLD / price) over the {len(measured)} GPTQ runs, profile's 8 windows: {spread(own)}"]
    lines = ["| Hessian windows | recipe | KLD measured | price, profile's 8 windows | KLD / price | price, new "
             "windows | KLD / price |", "|---|---|---|---|---|---|---|"]
    for n in args.windows:
        windows = feature_windows(mp.model, stream, n, 256, 1)  # seed 1: not the profile's windows (seed 0)
        t = time.perf_counter()
        moments = measure_input_moments(mp.model, windows)
        seconds = time.perf_counter() - t
        new = priced_with(moments)
        for label, kld in measured.items():
            price = new[label]
            row = (f"| {n} ({n * windows.shape[1]:,} tokens, {seconds:.0f} s) | {label} | {kld:.4f} | "
                   f"{own[label]:.4f} | {kld / own[label]:.2f} | {price:.4f} | {kld / price:.2f} |")
            lines.append(row)
            print(row, flush=True)
        summary.append(f"{n} windows: {spread(new)}")
        del moments
    from _common import stamp, write_between

    real = " (4-bit on the way in: its GGUF package)" if args.model in STORES else " (zoo)"
    write_between(args.out, f"gptq_hessian:{args.model}", f"**{args.model}**{real}. "
                  f"{stamp()} Load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}.\n\n"
                  + "\n".join(lines) + "\n\n" + "; ".join(summary) + ".")
    print("\n".join(summary))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
