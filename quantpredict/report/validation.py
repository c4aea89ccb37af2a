"""The delta-only kinds' validation page and its figures (matplotlib, Agg backend): ``reports/validation/predictors.md``
as ``quantpredict report`` writes it, or the ``--report`` page of ``quantpredict fit --kind ols|rf|gbm|bits|paper
--validate``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from quantpredict.predict.validate import Validation, crossover, delta_metrics

BASELINES = ("bits", "paper")
# The targets for the best kind under leave-one-family-out.
TARGETS = {"r2": 0.9, "median_rel_error": 0.20, "spearman_within_model": 0.95, "coverage": (0.85, 0.95)}
METRIC_COLUMNS = {
    "kind": "kind", "n_runs": "runs", "r2": "R² (delta)", "median_rel_error": "median rel. err (delta)",
    "median_rel_error_resolved": "… resolved runs", "spearman_within_model": "Spearman within model",
    "coverage": "90% coverage", "median_rel_ppl_error": "median rel. err (ppl)",
    "median_rel_ppl_error_fp_predicted": "… with predicted FP ppl", "feature_seconds": "feature s / run",
}


def best_kind(metrics: pd.DataFrame, groups: str = "family") -> str | None:
    """The non-baseline kind with the lowest median relative delta error under ``groups`` (None if none)."""
    m = metrics[(metrics["groups"] == groups) & ~metrics["kind"].isin(BASELINES)].dropna(subset=["median_rel_error"])
    return None if m.empty else str(m.sort_values("median_rel_error").iloc[0]["kind"])


def target_rows(metrics: pd.DataFrame, groups: str = "family") -> list[tuple[str, str, str, bool]]:
    """(criterion, target, measured, met) for the best kind under ``groups``, including the beat-the-paper check."""
    kind = best_kind(metrics, groups)
    if kind is None:
        return []
    row = metrics[(metrics["groups"] == groups) & (metrics["kind"] == kind)].iloc[0]
    out = [
        ("R² on delta", f">= {TARGETS['r2']}", f"{row['r2']:.3f}", bool(row["r2"] >= TARGETS["r2"])),
        ("median relative delta error", f"<= {TARGETS['median_rel_error']:.0%}", f"{row['median_rel_error']:.1%}",
         bool(row["median_rel_error"] <= TARGETS["median_rel_error"])),
        ("within-model Spearman", f">= {TARGETS['spearman_within_model']}", f"{row['spearman_within_model']:.3f}",
         bool(row["spearman_within_model"] >= TARGETS["spearman_within_model"])),
        ("90% interval coverage", "85%-95%", f"{row['coverage']:.1%}",
         bool(TARGETS["coverage"][0] <= row["coverage"] <= TARGETS["coverage"][1])),
    ]
    paper = metrics[(metrics["groups"] == groups) & (metrics["kind"] == "paper")]
    if not paper.empty:
        pe = float(paper.iloc[0]["median_rel_error"])
        # "clearly lower": at most 80% of the paper baseline's error
        out.append(("median rel. delta error vs `paper`", f"<= 0.8 x {pe:.1%}", f"{row['median_rel_error']:.1%}",
                    bool(row["median_rel_error"] <= 0.8 * pe)))
    return out


def _table(df: pd.DataFrame, columns: dict[str, str]) -> str:
    cols = [c for c in columns if c in df]
    head = "| " + " | ".join(columns[c] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    lines = [head, sep]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, (float, np.floating)):
                if not np.isfinite(v):
                    cells.append("n/a")
                elif "rel" in c or c == "coverage":
                    cells.append(f"{v:.1%}" if abs(v) >= 0.01 else f"{v:.3%}")
                else:
                    cells.append(f"{v:.3g}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_predictions(validation: Validation, path: str | Path, groups: str = "family",
                     kinds: Sequence[str] | None = None) -> Path:
    """Predicted vs measured delta (symlog axes) with the 90% intervals, one panel per kind, one colour per family
    (:func:`quantpredict.style.family_colors`, as in every other figure)."""
    from quantpredict.report.figures import symlog_axis
    from quantpredict.style import family_colors, intervals, pyplot, style

    plt = pyplot()
    p = validation.predictions
    p = p[(p["groups"] == groups) & np.isfinite(p["delta_nll"].to_numpy(float))]
    kinds = list(kinds or dict.fromkeys(p["kind"]))
    colors = family_colors(p["family"].astype(str)) if len(p) else {}
    lim_lo = float(np.nanmin(p[["delta", "delta_low"]].to_numpy(float))) if len(p) else -1e-3
    lim_hi = float(np.nanmax(p[["delta", "delta_high"]].to_numpy(float))) if len(p) else 1.0
    thresh = max(float(np.nanmedian(np.abs(p["delta"]))) / 10, 1e-5) if len(p) else 1e-4
    with style():
        fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.6), squeeze=False, sharey=True)
        for ax, kind in zip(axes[0], kinds):
            s = p[p["kind"] == kind]
            for fam, g in s.groupby(s["family"].astype(str)):
                intervals(ax, g["delta"], g["delta_nll"], g["delta_low"], g["delta_high"], color=colors[fam],
                          label=fam, s=8)
            ax.plot([lim_lo, lim_hi], [lim_lo, lim_hi], "k--", lw=0.8, zorder=2)
            symlog_axis(ax, "x", thresh, s["delta"])
            # the y axis is shared: its ticks span every panel
            symlog_axis(ax, "y", thresh, p[["delta_nll", "delta_low", "delta_high"]].to_numpy(float).ravel())
            ax.set_title(f"{kind} (leave-one-{groups}-out)", fontsize=9)
            ax.set_xlabel("measured delta NLL (nats)")
        axes[0][0].set_ylabel("predicted delta NLL, 90% interval")
        axes[0][0].legend(fontsize=7, loc="upper left")
        return _save(fig, path)


def plot_subsample(curve: pd.DataFrame, points: pd.DataFrame, path: str | Path) -> Path:
    """Median relative delta error against seconds: the subsample curve, and each predictor kind as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(curve["seconds"], curve["median_rel_error"], "o-", label="evaluate a prefix of k test windows")
    for _, r in points.iterrows():
        ax.plot([r["feature_seconds"]], [r["median_rel_error"]], "s", label=f"predictor {r['kind']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("seconds per run")
    ax.set_ylabel("median relative delta error")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_report(validation: Validation, md_path: str | Path, *, source: str = "", fitted: str | None = None,
                 subsample: pd.DataFrame | None = None) -> list[Path]:
    """Write the markdown report and its figures next to it; returns the written paths.

    ``source``: where the runs came from (printed); ``fitted``: the kind saved by ``quantpredict fit``;
    ``subsample``: a :func:`~quantpredict.predict.validate.subsample_curve` table, if per-window deltas exist.
    """
    md_path = Path(md_path)
    m = validation.metrics
    groupings = list(dict.fromkeys(m["groups"]))
    fig_group = "family" if "family" in groupings else groupings[0]
    fig = plot_predictions(validation, md_path.with_name(f"predictors_{fig_group}.png"), fig_group)
    written = [md_path, fig]
    p = validation.predictions
    n_runs = p.index.nunique()
    lines = [
        "# Predictors: validation", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `quantpredict fit --validate`"
        + (f" from {source}" if source else "") + f": {n_runs} runs, {p['model'].nunique()} models, "
        f"{p['family'].nunique()} families." + (f" Saved predictor: `{fitted}`." if fitted else ""), "",
        "Judged on the degradation delta = NLL_quant - NLL_fp (WikiText-2 test), not on perplexity. Relative errors "
        "are |predicted - measured| / |measured|; *resolved runs* are those whose measured delta exceeds twice its "
        "standard error (below that the measurement is mostly noise). Spearman is the rank correlation of the "
        "recipes within each held-out model, averaged over models. Perplexity errors use the measured FP "
        "perplexity, and again the one predicted from the calibration NLL. *feature s / run* is the median time "
        "of the feature groups the kind needs.", "",
    ]
    for gr in groupings:
        lines += [f"## Leave-one-{gr}-out", "", _table(m[m["groups"] == gr], METRIC_COLUMNS), ""]
    tr = target_rows(m, "family" if "family" in groupings else groupings[0])
    if tr:
        kind = best_kind(m, "family" if "family" in groupings else groupings[0])
        lines += [f"## Targets (best kind `{kind}`, leave-one-{fig_group}-out)", "",
                  "| criterion | target | measured | met |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {'yes' if ok else '**no**'} |" for a, b, c, ok in tr]
        missed = [a for a, _, _, ok in tr if not ok]
        lines += ["", ("All targets met." if not missed else "Missed: " + ", ".join(missed) + "."), ""]
        if missed:
            lines += limits_section(validation.predictions[validation.predictions["groups"] == fig_group], kind)
    lines += [f"![predicted vs measured delta]({fig.name})", "", "## Subsample baseline", ""]
    if subsample is not None and len(subsample):
        same = _same_runs_points(validation.predictions, m[m["groups"] == fig_group], fig_group,
                                 subsample.attrs.get("runs"))
        sub_fig = plot_subsample(subsample, same, md_path.with_name("predictors_subsample.png"))
        written.append(sub_fig)
        lines += ["Estimating delta from the first k test windows (FP and quantized), against the seconds it costs "
                  "(quantizing the model, then k windows). The reference is each run's own measured delta, of whose "
                  "windows the prefix is a part, so the subsample's errors at large k are optimistic.", "",
                  _table(subsample, {"k": "windows", "seconds": "seconds", "median_rel_error":
                                         "median rel. err (delta)", "median_abs_error": "median abs. err (nats)"}),
                  ""]
        if subsample.attrs.get("runs"):
            lines += [f"The curve covers the {len(subsample.attrs['runs'])} runs that stored per-window deltas; each "
                      "predictor's error below is its leave-one-{fig}-out error on those same runs, at the median "
                      "feature time of the groups it needs.".replace("{fig}", fig_group), ""]
        for _, r in same.iterrows():
            if np.isfinite(r["feature_seconds"]) and np.isfinite(r["median_rel_error"]):
                c = crossover(subsample, r["median_rel_error"], r["feature_seconds"])
                verdict = "beats" if c["predictor_better_at_equal_cost"] else "does NOT beat"
                cross = (f"the subsample matches it from {c['crossover_seconds']:.3g} s" if
                         np.isfinite(c["crossover_seconds"]) else "the subsample never matches it within the curve")
                lines.append(f"- `{r['kind']}` ({r['median_rel_error']:.1%} at {r['feature_seconds']:.3g} s) {verdict} "
                             f"the subsample at equal cost ({c['subsample_error_at_equal_cost']:.1%}); {cross}.")
        lines += ["", f"![error against seconds]({sub_fig.name})", ""]
    else:
        lines += ["Not computed: the runs carry no per-window deltas. `quantpredict.predict.subsample_curve` takes "
                  "them (per run, the delta NLL of each test window, and the seconds per window) and the report "
                  "then compares each predictor with evaluating a prefix of the windows at equal cost.", ""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines))
    return written


def limits_section(predictions: pd.DataFrame, kind: str) -> list[str]:
    """Markdown lines on what bounds the predictor's accuracy, computed from the held-out predictions of ``kind``:
    the measurement noise of delta itself, and the error on runs whose delta is resolved vs not."""
    p = predictions[predictions["kind"] == kind]
    d, dh = p["delta"].to_numpy(float), p["delta_nll"].to_numpy(float)
    se = p["delta_nll_se"].to_numpy(float) if "delta_nll_se" in p else np.full_like(d, np.nan)
    ok = np.isfinite(d) & np.isfinite(dh) & np.isfinite(se) & (d != 0)
    if not ok.any():
        return []
    d, dh, se = d[ok], dh[ok], se[ok]
    noise = se / np.abs(d)
    resolved = np.abs(d) > 2 * se
    rel = np.abs(dh - d) / np.abs(d)
    big = np.abs(d) > 0.01  # runs losing more than 0.01 nats (~1% perplexity)
    over = f", and on the runs that lose more than 0.01 nats it is {np.median(rel[big]):.1%}" if big.any() else ""
    lines = [
        "### What limits it", "",
        "- **The measurement itself.** The measured delta's own standard error is a median "
        f"{np.median(noise):.0%} of delta; {np.mean(~resolved):.0%} of the runs have |delta| < 2 SE (8-bit and "
        "other near-lossless recipes), where no predictor can be judged to better than the noise. On the resolved "
        f"runs the median relative error is {np.median(rel[resolved]) if resolved.any() else np.nan:.1%}{over}.",
        "- **Few, small, similar models.** Leave-one-family-out trains on three families and predicts the fourth; "
        f"the runs cover {p['model'].nunique()} models, so scale and architecture effects are learned from a "
        "handful of points.",
        "- **Features measured on 2k calibration tokens.** The landscape features (the radial NLL profile, "
        "0.5 dT H d) are noisy estimates of a loss difference that the test windows measure on far more tokens.",
        ""]
    return lines


def _same_runs_points(predictions: pd.DataFrame, metrics: pd.DataFrame, groups: str, runs) -> pd.DataFrame:
    """``metrics`` rows (kind, feature_seconds, median_rel_error) with the error recomputed on ``runs`` only
    ((model, recipe) pairs; all runs when None), so a predictor and the subsample curve are judged on the same runs."""
    if not runs:
        return metrics
    keys = set(map(tuple, runs))
    out = metrics.copy()
    for i, r in out.iterrows():
        p = predictions[(predictions["groups"] == groups) & (predictions["kind"] == r["kind"])]
        p = p[[(str(a), str(b)) in keys for a, b in zip(p["model"], p["recipe"])]]
        out.loc[i, "median_rel_error"] = delta_metrics(p)["median_rel_error"]
    return out


def _save(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
