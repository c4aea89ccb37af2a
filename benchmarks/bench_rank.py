"""What rank costs against the evaluations it replaces, measured in one run on one model.

    .venv/bin/python benchmarks/bench_rank.py --model smollm2-135m [--threads 1] [--full-windows N]

Times, in the same process and one after the other: the profile (measured once), every recipe of the shipped grid
priced from weights (RTN and GPTQ separately), a 64-window comparison of one RTN recipe, and one full-split
evaluation estimated from the timed forward passes (FP + quantized per window, times the split's windows; a
full-split evaluation takes tens of minutes here). Writes the section ``rank`` of reports/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stamp, write_section  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare-windows", type=int, default=64)
    args = ap.parse_args(argv)
    import torch

    from quantpredict import data, evaluate, models, quantize
    from quantpredict.predict.rank import default_recipes, profile_model, recipe_row
    from quantpredict.recipe import Recipe

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    mp = profile_model(args.model)
    profile_s = time.perf_counter() - t
    per = {"rtn": [], "gptq": []}
    for r in default_recipes():
        t = time.perf_counter()
        recipe_row(mp, r)
        per[r.method].append(time.perf_counter() - t)
    # the evaluation a practitioner would run instead: a 64-window comparison of one RTN recipe
    fp, tok = models.load(args.model)
    q = copy.deepcopy(fp)
    quantize.quantize_model(q, Recipe("mxint4"), data.token_stream(tok, "wikitext2", "train"), progress=False)
    t = time.perf_counter()
    cmp = evaluate.compare(fp, q, tok, max_windows=args.compare_windows, progress=False)
    compare_s = time.perf_counter() - t
    split_windows = mp.full_split_windows
    full_s = compare_s / args.compare_windows * split_windows
    rtn, gptq = statistics.median(per["rtn"]), statistics.median(per["gptq"])
    grid_s = profile_s + sum(per["rtn"]) + sum(per["gptq"])
    lines = [
        f"{stamp()} {args.threads} thread(s); the machine was loaded by background jobs "
        "(sweeps and training), so ratios within this run are the meaningful numbers.", "",
        f"Model `{args.model}`: the profile (once) {profile_s:.1f} s; per recipe priced from weights: RTN median "
        f"{rtn:.2f} s, GPTQ median {gptq:.2f} s (GPTQ pays its per-layer GPTQ against the profile's Hessian, no "
        "forward pass).", "",
        "| what | seconds | vs a 64-window comparison |", "|---|---|---|",
        f"| {args.compare_windows}-window comparison (FP + quantized, one RTN recipe) | {compare_s:.1f} | 1 |",
        f"| marginal RTN recipe in rank | {rtn:.2f} | {100 * rtn / compare_s:.1f}% (target <= 5%) |",
        f"| marginal GPTQ recipe in rank | {gptq:.2f} | {100 * gptq / compare_s:.1f}% |",
        f"| the whole default grid ({len(per['rtn']) + len(per['gptq'])} recipes, profile included) | {grid_s:.1f} | "
        f"{grid_s / compare_s:.2f}x |",
        f"| one full-split evaluation ({split_windows} windows, scaled from the comparison) | {full_s:.0f} | "
        f"{full_s / compare_s:.1f}x |", "",
        f"The whole grid costs {grid_s / full_s:.2f} full-split evaluations (target <= 1). The comparison measured "
        f"KLD {cmp.kld:.4f} ± {cmp.kld_se:.4f}.",
    ]
    write_section("rank", "## rank: one profile, every recipe priced from weights\n\n" + "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
