"""What the weights-only predictions cost against the evaluation they replace, measured in one run on one model.

    .venv/bin/python benchmarks/bench_rank.py --model smollm2-135m [--threads 1] [--compare-windows 64]

Times, in one process and one after the other (issue #28's cost targets):

* the profile, cold: ``profile_model`` with an empty profile cache (a temporary ``$QUANTPREDICT_PROFILES``): load the
  model, hash its weights, measure the lean profile and write it. The FP perplexity ``predict`` quotes is measured
  and cached on its own (``predict.fp_reference``) and is not part of it;
* the profile, warm: ``profile_model`` again, read from that cache (load and hash included);
* GPTQ's input moments on the recipe's calibration windows (128 x 256), measured block by block the first time a
  GPTQ or AWQ recipe is priced (once per model, cached);
* each recipe priced from the weights (``recipe_row``, what ``predict``, ``rank`` and ``allocate`` run per recipe):
  the shipped default grid (RTN and GPTQ), two AWQ recipes and two named llama.cpp mixes;
* ``rank`` of the default grid with a warm profile: the warm profile plus the grid's prices;
* a 64-window comparison of one RTN recipe (FP + quantized), the evaluation a practitioner would run instead.

Peak RSS is this process's maximum resident set size over all of it (``resource.getrusage``). Writes the section
``rank`` of reports/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stamp, write_section  # noqa: E402

EXTRA = {"AWQ": ("int4-rtn-awq", "mxint4-rtn-awq"), "named mix": ("q4_k_m", "q5_k_m")}
TARGETS = {"profile": 0.50, "RTN": 0.01, "AWQ": 0.01, "named mix": 0.01, "GPTQ": 0.10, "grid": 2.0}
RSS_TARGET_GIB = 4.0


def _load_avg() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare-windows", type=int, default=64)
    ap.add_argument("--load-note", default="other jobs not stated", help="what else ran on the machine")
    args = ap.parse_args(argv)
    import torch

    from quantpredict import data, evaluate, models, quantize
    from quantpredict.mixes import resolve_recipe
    from quantpredict.predict.rank import default_recipes, profile_model, recipe_row
    from quantpredict.recipe import Recipe

    torch.set_num_threads(args.threads)
    load_start = _load_avg()
    with tempfile.TemporaryDirectory(prefix="bench-rank-profiles-") as tmp:
        os.environ["QUANTPREDICT_PROFILES"] = tmp  # an empty cache: the first call measures, the second reads
        t = time.perf_counter()
        profile_model(args.model)
        cold_s = time.perf_counter() - t
        t = time.perf_counter()
        mp = profile_model(args.model)
        warm_s = time.perf_counter() - t
        assert mp.cached, "the second profile_model call should read the cache"
        moments_s = 0.0
        # GPTQ's and AWQ's Hessians, on the default calibration's 128 x 256 windows
        load = getattr(mp.calibration_hessians(Recipe("int4", method="gptq")).moments, "load", None)
        if load is not None:  # measured lazily, block by block: time it apart from the first GPTQ recipe
            t = time.perf_counter()
            load()
            moments_s = time.perf_counter() - t
        per: dict[str, list[float]] = {"RTN": [], "GPTQ": [], "AWQ": [], "named mix": []}
        for r in default_recipes():
            t = time.perf_counter()
            recipe_row(mp, r)
            per["GPTQ" if r.method == "gptq" else "RTN"].append(time.perf_counter() - t)
        grid_prices = sum(per["RTN"]) + sum(per["GPTQ"])
        n_grid = len(per["RTN"]) + len(per["GPTQ"])
        for cls, labels in EXTRA.items():
            for label in labels:
                recipe = resolve_recipe(label, mp.model)
                t = time.perf_counter()
                recipe_row(mp, recipe)
                per[cls].append(time.perf_counter() - t)
        del mp
    os.environ.pop("QUANTPREDICT_PROFILES", None)
    # the evaluation a practitioner would run instead: a 64-window comparison of one RTN recipe
    fp, tok = models.load(args.model)
    q = copy.deepcopy(fp)
    quantize.quantize_model(q, Recipe("mxint4"), data.token_stream(tok, "wikitext2", "train"), progress=False)
    t = time.perf_counter()
    cmp = evaluate.compare(fp, q, tok, max_windows=args.compare_windows, progress=False)
    compare_s = time.perf_counter() - t
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    warm_rank_s = warm_s + grid_prices

    def row(what: str, seconds: float, target: float | None) -> str:
        ratio = seconds / compare_s
        if target is None:
            verdict = ""
        else:
            shown = f"{target:g}x" if target >= 1 else f"{100 * target:g}%"
            verdict = f"target <= {shown}: **{'met' if ratio <= target else 'missed'}**"
        shown_ratio = f"{ratio:.2f}x" if ratio >= 1 else f"{100 * ratio:.1f}%"
        return f"| {what} | {seconds:.1f} | {shown_ratio} | {verdict} |"

    med = {k: statistics.median(v) for k, v in per.items() if v}
    from quantpredict.models.imported import imported_path

    real_note = (" (a real model from a GGUF package: **4-bit on the way in**)" if imported_path(args.model) is not None
                 else "")
    lines = [
        f"{stamp()} {args.threads} thread(s); load average {load_start} at the start and {_load_avg()} at the end "
        f"({args.load_note}; ratios within this run are the meaningful numbers).", "",
        f"Model `{args.model}`{real_note}. Each recipe is "
        "priced from the weights (`recipe_row`, the path `predict`, `rank` and `allocate` share); the medians are "
        "over the recipes of each class.", "",
        f"| what | seconds | vs a {args.compare_windows}-window comparison | #28 target |", "|---|---|---|---|",
        f"| {args.compare_windows}-window comparison (FP + quantized, one RTN recipe) | {compare_s:.1f} | 1 | |",
        row("the profile, cold (load, hash, measure, write)", cold_s, TARGETS["profile"]),
        row("the profile, warm (load, hash, read)", warm_s, None),
        row("GPTQ's input moments, 128 x 256 windows (once per model, at the first GPTQ or AWQ recipe)", moments_s,
            None),
        row(f"each RTN recipe (median of {len(per['RTN'])})", med["RTN"], TARGETS["RTN"]),
        row(f"each AWQ recipe (median of {', '.join(EXTRA['AWQ'])})", med["AWQ"], TARGETS["AWQ"]),
        row(f"each named mix (median of {', '.join(EXTRA['named mix'])})", med["named mix"], TARGETS["named mix"]),
        row(f"each GPTQ recipe (median of {len(per['GPTQ'])})", med["GPTQ"], TARGETS["GPTQ"]),
        row(f"`rank` of the default grid ({n_grid} recipes), warm profile", warm_rank_s, TARGETS["grid"]), "",
        f"Peak RSS of the whole run: {peak_gib:.2f} GiB (target <= {RSS_TARGET_GIB:g} GiB: "
        f"**{'met' if peak_gib <= RSS_TARGET_GIB else 'missed'}**). The comparison measured KLD {cmp.kld:.4f} ± "
        f"{cmp.kld_se:.4f}.",
    ]
    write_section("rank", "## rank: one profile, every recipe priced from weights\n\n" + "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
