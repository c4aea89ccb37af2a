"""``reports/rank.md``: how well ``rank`` recommends and ``allocate`` allocates, judged on measured runs.

Rank: for each model and bit budget, the recipe the ``profile`` predictor (fitted without that model) ranks best
among the shipped grid's recipes within the budget, against the measured best of the same grid; a recommendation
counts as right when its measured KLD is within 2 standard errors (of the difference) of the measured best.

Allocate: each allocated recipe's measured KLD against the best uniform recipe of no more bits with the same
method, and its predicted KLD against the measured one.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from quantpredict.predict.rank import DEFAULT_FORMATS

GRID_LABELS = tuple(f"{f}-{m}" for f in DEFAULT_FORMATS for m in ("rtn", "gptq"))


def lomo_predictions(runs: pd.DataFrame, models: Sequence[str], kind: str = "profile",
                     test_runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each model's runs (of ``test_runs``, default ``runs``) predicted by a ``kind`` predictor fitted on every
    other model's runs of ``runs``."""
    from quantpredict.predict.physics import PhysicsPredictor

    out = []
    usable = PhysicsPredictor(kind).usable(runs)
    targets = usable if test_runs is None else PhysicsPredictor(kind).usable(test_runs)
    for m in models:
        test = targets[targets["model"] == m]
        if test.empty:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = PhysicsPredictor(kind).fit(usable[usable["model"] != m]).predict(test)
        out.append(p.assign(model=m, recipe=test["recipe"].to_numpy()))
    return pd.concat(out) if out else pd.DataFrame()


def rank_checks(runs: pd.DataFrame, preds: pd.DataFrame, budgets: Sequence[float] = (4.5, 6.5, 8.5)) -> pd.DataFrame:
    """One row per (model, budget): the recommendation, the measured best and whether they agree within 2 SE."""
    rows = []
    for m in preds["model"].unique():
        r = runs[(runs["model"] == m) & runs["recipe"].isin(GRID_LABELS)]
        p = preds.loc[preds.index.intersection(r.index)]
        if p.empty:
            continue
        r = r.loc[p.index]
        for b in budgets:
            ok = r["bits_per_element"] <= b + 1e-9
            if not ok.any():
                continue
            rec = p.loc[ok[ok].index, "kld"].idxmin()
            best = r.loc[ok, "kld"].idxmin()
            diff_se = math.sqrt(r.loc[rec, "kld_se"] ** 2 + r.loc[best, "kld_se"] ** 2)
            gap = float(r.loc[rec, "kld"] - r.loc[best, "kld"])
            rows.append({"model": m, "max_bits": b, "recommended": r.loc[rec, "recipe"],
                         "recommended_kld": float(r.loc[rec, "kld"]), "best": r.loc[best, "recipe"],
                         "best_kld": float(r.loc[best, "kld"]), "gap": gap, "gap_se": diff_se,
                         "within_2se": bool(gap <= 2 * diff_se), "n_candidates": int(ok.sum())})
    return pd.DataFrame(rows)


def allocation_checks(alloc_runs: pd.DataFrame, uniform_runs: pd.DataFrame, allocations: dict,
                      preds: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per allocated run: its measured KLD against the best uniform run of the same method whose bits are
    no more than the allocation's budget (``budget`` of its entry, else its own ``bits_per_element``), and its
    predicted KLD where ``preds`` has it."""
    rows = []
    for model, entries in allocations.items():
        for key, e in entries.items():
            method = key.split("@")[0]
            a = alloc_runs[(alloc_runs["model"] == model) & (alloc_runs["recipe"] == e["recipe"])]
            if a.empty:
                continue
            a = a.iloc[0]
            # the budget the allocation was given (the bits of a uniform recipe): an allocation that lands a little
            # under it still competes with that uniform recipe, not with the next one down
            limit = max(float(a["bits_per_element"]), float(e.get("budget", a["bits_per_element"])))
            u = uniform_runs[(uniform_runs["model"] == model) & (uniform_runs["method"] == method)
                             & uniform_runs["recipe"].isin(GRID_LABELS)
                             & (uniform_runs["bits_per_element"] <= limit + 1e-6)]
            if u.empty:
                continue
            best = u.loc[u["kld"].idxmin()]
            se = math.sqrt(a["kld_se"] ** 2 + best["kld_se"] ** 2)
            row = {"model": model, "method": method, "budget_of": key.split("@")[1],
                   "bits": float(a["bits_per_element"]), "allocated_kld": float(a["kld"]),
                   "allocated_kld_se": float(a["kld_se"]), "best_uniform": best["recipe"],
                   "best_uniform_bits": float(best["bits_per_element"]), "best_uniform_kld": float(best["kld"]),
                   "below": bool(a["kld"] < best["kld"]), "below_2se": bool(best["kld"] - a["kld"] > 2 * se)}
            if preds is not None and a.name in preds.index:
                pr = preds.loc[a.name]
                row |= {"predicted_kld": float(pr["kld"]), "predicted_low": float(pr["kld_low"]),
                        "predicted_high": float(pr["kld_high"])}
            rows.append(row)
    return pd.DataFrame(rows)


def render(path: str | Path, rank: pd.DataFrame, alloc: pd.DataFrame, *, figure: str | None = None,
           costs: Sequence[str] = (), commands: Sequence[str] = ()) -> Path:
    path = Path(path)
    parts = ["# Rank and allocate", ""]
    if figure:
        from quantpredict.report.frontier import bound_text

        parts += [f"![predicted KLD and perplexity against bits]({figure})", "",
                  "*Every candidate recipe priced by `rank` from the weights: predicted KLD and perplexity against "
                  "bits per element with 90% intervals, the Pareto frontier and the recommendation. Recipes with a "
                  f"{bound_text()} are left out of the frontier and the axes (the region a user would ship); the note "
                  "on the perplexity panel names them.*", ""]
    parts += list(costs) + [""] if costs else []
    if not rank.empty:
        n, ok = len(rank), int(rank["within_2se"].sum())
        parts += ["## Does rank recommend the best recipe of the grid?", "",
                  f"{ok} of {n} (model, budget) pairs ({100 * ok / n:.0f}%; target 80%) recommend a recipe whose "
                  "measured KLD is within 2 standard errors of the grid's measured best under the same budget. The "
                  "predictor that ranks each model was fitted without it (`profile` kind, weights-only pricing).", "",
                  "| model | max bits | recommended | its KLD | measured best | best KLD | gap ± SE | ok |",
                  "|---|---|---|---|---|---|---|---|"]
        for _, r in rank.iterrows():
            parts.append(f"| {r['model']} | {r['max_bits']:g} | {r['recommended']} | {r['recommended_kld']:.3g} | "
                         f"{r['best']} | {r['best_kld']:.3g} | {r['gap']:+.2g} ± {r['gap_se']:.2g} | "
                         f"{'yes' if r['within_2se'] else 'no'} |")
    if not alloc.empty:
        n, below = len(alloc), int(alloc["below"].sum())
        parts += ["", "## Do allocated recipes beat uniform ones of no more bits?", "",
                  f"{below} of {n} allocated runs ({100 * below / n:.0f}%; target 75%) have a lower measured KLD than "
                  f"the best uniform recipe of no more bits with the same method ({int(alloc['below_2se'].sum())} by "
                  "more than 2 SE). The allocation minimises the summed per-layer second-order KL priced from the "
                  "weights; cross-layer terms are not modelled.", "",
                  "| model | method | budget of | bits | allocated KLD | best uniform | its bits | its KLD | "
                  "predicted KLD [90%] |", "|---|---|---|---|---|---|---|---|---|"]
        for _, r in alloc.iterrows():
            pred = (f"{r['predicted_kld']:.3g} [{r['predicted_low']:.3g}, {r['predicted_high']:.3g}]"
                    if "predicted_kld" in r and pd.notna(r.get("predicted_kld")) else "")
            parts.append(f"| {r['model']} | {r['method']} | {r['budget_of']} | {r['bits']:.3f} | "
                         f"{r['allocated_kld']:.3g} ± {r['allocated_kld_se']:.2g} | {r['best_uniform']} | "
                         f"{r['best_uniform_bits']:.3f} | {r['best_uniform_kld']:.3g} | {pred} |")
        if "predicted_kld" in alloc:
            a = alloc.dropna(subset=["predicted_kld"])
            if not a.empty:
                rel = np.abs(a["predicted_kld"] / a["allocated_kld"] - 1)
                inside = (a["predicted_low"] <= a["allocated_kld"]) & (a["allocated_kld"] <= a["predicted_high"])
                parts += ["", f"Predicted KLD of the allocated recipes: median relative error "
                              f"{100 * np.median(rel):.1f}%, 90% interval coverage {100 * np.mean(inside):.0f}% "
                              f"({len(a)} runs)."]
    if commands:
        parts += ["", "## Reproduce", "", "```bash", *commands, "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts).rstrip() + "\n")
    return path


def load_allocations(path: str | Path) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}
