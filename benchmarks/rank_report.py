"""reports/rank.md: how well ``rank`` recommends and ``allocate`` allocates, judged on measured runs.

    .venv/bin/python benchmarks/rank_report.py [--out reports/rank.md]

Rank is judged on every zoo l model, every long-trained checkpoint and SmolLM2 at --max-bits 4.5, 6.5 and 8.5, each
model ranked by a ``profile`` predictor fitted without it; allocate on the allocated runs of data/runs/alloc.sqlite
(labels in data/runs/allocations*.json, written by benchmarks/allocation_runs.py) against the uniform runs of the
sweeps. Rendered by :func:`quantpredict.studies.rank_report.render`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS = ROOT / "data" / "runs"
SWEEPS = ("runs.sqlite", "long.sqlite", "smollm2.sqlite")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "rank.md")
    ap.add_argument("--budgets", nargs="+", type=float, default=[4.5, 6.5, 8.5])
    args = ap.parse_args(argv)
    import pandas as pd

    from quantpredict.runs.table import read_runs, sweep_setting_runs
    from quantpredict.studies.rank_report import (
        allocation_checks,
        load_allocations,
        lomo_predictions,
        rank_checks,
        render,
    )

    runs = read_runs([RUNS / s for s in SWEEPS if (RUNS / s).exists()])
    runs = runs[runs["status"] == "done"]
    runs = sweep_setting_runs(runs)[0]  # SmolLM2's 64-window rehearsal run is not a second candidate
    models = sorted(m for m in runs["model"].unique()
                    if m.endswith("-l") or re.search(r"-d\d+$", m) or m == "smollm2-135m")
    preds = lomo_predictions(runs, models, kind="profile")
    rank = rank_checks(runs, preds, budgets=args.budgets)
    alloc_store = RUNS / "alloc.sqlite"
    allocations = load_allocations(RUNS / "allocations.json") | load_allocations(RUNS / "allocations_smollm2.json")
    alloc = pd.DataFrame()
    if alloc_store.exists() and allocations:
        alloc_runs = read_runs(alloc_store)
        alloc_runs = alloc_runs[alloc_runs["status"] == "done"]
        # each model's allocated runs predicted by a profile predictor fitted on every other model's runs
        preds_alloc = lomo_predictions(pd.concat([runs, alloc_runs]), alloc_runs["model"].unique(),
                                       test_runs=alloc_runs)
        alloc = allocation_checks(alloc_runs, runs, allocations, preds_alloc if len(preds_alloc) else None)
    figure = "frontier_smollm2.png" if (args.out.parent / "frontier_smollm2.png").exists() else None
    costs = ["What rank costs against the evaluations it replaces (SmolLM2, measured in one run) is in "
             "[benchmarks.md](benchmarks.md#rank-one-profile-every-recipe-priced-from-weights)."]
    if "smollm2-135m" in set(rank.get("model", [])):
        costs.append("SmolLM2's candidates are the recipes of its sweep that carry the profile features (its RTN "
                     "runs: a GPTQ run would pay its GPTQ pass again to be backfilled).")
    commands = ["python benchmarks/allocation_runs.py --models llama-m opt-m gpt2-m gpt_neox-m llama-l opt-l gpt2-l "
                "gpt_neox-l --methods rtn gptq --out data/runs/allocations.json",
                "python benchmarks/allocation_runs.py --models smollm2-135m --methods rtn "
                "--out data/runs/allocations_smollm2.json",
                "quantpredict collect --models MODEL --recipes-file <its labels, one per line> "
                "--store data/runs/alloc.sqlite --eval-max-windows 256",
                "python benchmarks/bench_rank.py --model smollm2-135m --threads 1",
                "quantpredict rank smollm2-135m --max-bits 4.5 --plot reports/frontier_smollm2.png",
                "python benchmarks/rank_report.py"]
    path = render(args.out, rank, alloc, figure=figure, costs=costs, commands=commands)
    n_ok = int(rank["within_2se"].sum()) if len(rank) else 0
    print(f"wrote {path}: rank {n_ok}/{len(rank)} pairs within 2 SE; {len(alloc)} allocated runs judged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
