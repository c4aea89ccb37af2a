"""The report's figures, each a plain function: a table in, one PNG out (returns its path).

Every function draws with :func:`quantpredict.report.style.style`, labels its axes with units and writes a PNG even
when it has no data (a panel says why), so the report page never has a hole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from quantpredict.report.style import (
    PANEL,
    SHIP_MAX_KLD,
    SHIP_MAX_PPL_INCREASE,
    SHIP_MIN_BITS,
    empty_panel,
    family_colors,
    freeze_layout,
    intervals,
    place_labels,
    save,
    ship_note,
    shippable,
    style,
)
from quantpredict.report.tables import best_per_bits, pareto_frontier

# The strongest single predictors of delta NLL in the design (schema names), with axis labels and scales.
FEATURE_AXES: dict[str, tuple[str, str]] = {
    "rtn_sqnr_db": ("RTN weight SQNR (dB)", "linear"),
    "quad_delta_h_delta": ("0.5 δᵀHδ along the quantization direction (nats)", "log"),
    "n_params_nonembed": ("non-embedding parameters", "log"),
}
DELTA_LABEL = "Δ NLL = NLL_quant − NLL_fp (nats)"


def _grid(n: int, ncols: int = 3, layout: str | None = None):
    """A figure with ``n`` panels on rows of at most ``ncols``; returns (fig, flat axes)."""
    from quantpredict.report.style import pyplot

    plt = pyplot()
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL[0] * ncols, PANEL[1] * nrows), squeeze=False,
                             layout=layout)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _number(v: float) -> str:
    """A short tick label: 0.02, 150, 3k, 20M."""
    a = abs(v)
    if a == 0:
        return "0"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div * 10 or (a >= div and suffix != "k"):
            return f"{v / div:g}{suffix}"
    return f"{v:g}" if a >= 1e-3 else f"{v:.0e}"


def log_axis(ax, which: str, values) -> None:
    """Log scale on ``which`` ("x"/"y") with readable ticks (see :func:`log_ticks`)."""
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    log_ticks(ax.xaxis if which == "x" else ax.yaxis, values)


def log_ticks(axis, values) -> None:
    """Readable ticks on a log-scaled ``axis`` spanning ``values``: decades over more than three decades, 1-2-5 per
    decade over one to three, about five evenly spaced ticks within a decade; short numbers (no colliding
    1.2x10^2 labels)."""
    from matplotlib import ticker

    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return
    span = np.log10(v.max() / v.min())
    if span > 3:
        axis.set_major_locator(ticker.LogLocator(base=10, numticks=8))
    elif span >= 1:
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        axis.set_major_locator(ticker.MaxNLocator(nbins=5, min_n_ticks=3))
    axis.set_major_formatter(ticker.FuncFormatter(lambda x, _: _number(x)))
    axis.set_minor_formatter(ticker.NullFormatter())


def symlog_axis(ax, which: str, linthresh: float, values) -> None:
    """Symmetric-log scale on ``which`` ("x"/"y") with ticks that cannot collide: 0, and ±10^k only from a decade
    past ``linthresh`` (the linear range around 0 is too narrow for ±linthresh's own labels), every decade over at
    most four decades per side, every other one beyond."""
    from matplotlib import ticker

    (ax.set_xscale if which == "x" else ax.set_yscale)("symlog", linthresh=linthresh)
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    ticks = [0.0]
    first = math.floor(math.log10(linthresh)) + 1
    for sign in (-1, 1):
        side = v[v * sign > 10 ** first] * sign
        if side.size:
            last = math.ceil(math.log10(side.max()))
            step = 1 if last - first <= 4 else 2
            ticks += [sign * 10.0 ** k for k in range(last, first - 1, -step)]
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(ticker.FixedLocator(sorted(ticks)))
    axis.set_minor_locator(ticker.NullLocator())

    def label(x, _):
        if x == 0:
            return "0"
        k = int(round(math.log10(abs(x))))
        return f"$-10^{{{k}}}$" if x < 0 else f"$10^{{{k}}}$"

    axis.set_major_formatter(ticker.FuncFormatter(label))


def _noise_floor(runs: pd.DataFrame) -> float:
    """The symlog linear range for delta: the median measured standard error of delta (1e-4 nats if none)."""
    from quantpredict.predict.design import delta_scale_from

    return delta_scale_from(runs, default=1e-4)


def plot_ppl_predictions(predictions: pd.DataFrame, path: str | Path, kinds: Sequence[str],
                         groups: str = "family") -> Path:
    """Predicted vs measured quantized perplexity with the predictor's interval, one panel per kind.

    ``predictions``: :class:`quantpredict.predict.Validation` ``.predictions`` (columns ``groups``, ``kind``,
    ``family``, ``ppl_quant``, ``ppl``, ``ppl_low``, ``ppl_high``); only rows of the ``groups`` grouping are drawn.
    Log-log axes, the identity dashed, one colour per family.
    """
    p = predictions[predictions["groups"] == groups] if len(predictions) else predictions
    colors = family_colors(p["family"].astype(str)) if len(p) else {}
    with style():
        fig, axes = _grid(max(1, len(kinds)), ncols=len(kinds) or 1)
        for ax, kind in zip(axes, kinds or [""]):
            s = p[(p["kind"] == kind) & np.isfinite(p["ppl"].to_numpy(float))
                  & np.isfinite(p["ppl_quant"].to_numpy(float))] if len(p) else p
            if s.empty:
                empty_panel(ax, f"no leave-one-{groups}-out predictions for {kind or 'any kind'}")
                continue
            for fam, g in s.groupby(s["family"].astype(str)):
                intervals(ax, g["ppl_quant"], g["ppl"], g["ppl_low"], g["ppl_high"], color=colors[fam], label=fam)
            vals = s[["ppl_quant", "ppl"]].to_numpy(float)
            lim = (np.nanmin(vals) / 1.1, np.nanmax(vals) * 1.1)
            ax.plot(lim, lim, "k--", lw=0.8, label="predicted = measured")
            log_axis(ax, "x", vals)
            log_axis(ax, "y", np.concatenate([vals.ravel(), s[["ppl_low", "ppl_high"]].to_numpy(float).ravel()]))
            rel = np.abs(s["ppl"] - s["ppl_quant"]) / s["ppl_quant"]
            inside = ((s["ppl_low"] <= s["ppl_quant"]) & (s["ppl_quant"] <= s["ppl_high"])).mean()
            med = float(np.median(rel))
            med_text = f"{med:.1%}" if med >= 0.01 else f"{med:.2%}"
            ax.set_title(f"{kind}: median |error| {med_text}, {inside:.0%} inside interval")
            ax.set_xlabel("measured perplexity (WikiText-2 test)")
            ax.set_ylabel("predicted perplexity (90% interval)")
            ax.legend(loc="upper left")
        fig.suptitle(f"Leave-one-{groups}-out: each {groups} predicted by a predictor that never saw it", fontsize=9)
        fig.tight_layout()
        return save(fig, path)


KIND_ORDER = ("MXINT", "MXFP", "INT (per channel)", "FP8 (per channel)")
KIND_MARKERS = {"MXINT": "o", "MXFP": "s", "INT (per channel)": "^", "FP8 (per channel)": "D"}


def frontier_bound(best: pd.DataFrame, y: str = "ppl_quant") -> np.ndarray:
    """The rows of :func:`best_per_bits` inside the region a user would ship (:func:`quantpredict.style.shippable`):
    at least :data:`SHIP_MIN_BITS` bits per element, measured perplexity at most doubled, measured KLD at most
    1 nat/token (a missing value excludes nothing)."""
    ratio = (pd.to_numeric(best["ppl_quant"], errors="coerce") / pd.to_numeric(best["ppl_fp"], errors="coerce")
             if {"ppl_quant", "ppl_fp"} <= set(best) else None)
    kld = pd.to_numeric(best["kld"], errors="coerce") if "kld" in best else None
    return shippable(ratio, kld, best["bits"].to_numpy(float), min_bits=SHIP_MIN_BITS)


def frontier_note(best: pd.DataFrame, ship: np.ndarray) -> str:
    """The note on the frontier panel: which runs the bound leaves out, and why."""
    out = best[~ship]
    low = out[out["bits"] < SHIP_MIN_BITS]
    parts = []
    if len(low):
        fmts = sorted({str(f).split("_")[0] for f in low["weight_format"]}) if "weight_format" in low else []
        inc = (low["ppl_quant"] / low["ppl_fp"] - 1) if {"ppl_quant", "ppl_fp"} <= set(low) else pd.Series(dtype=float)
        rng = (f": the zoo loses only {inc.min():+.0%} to {inc.max():+.0%} perplexity there, but no real model "
               "survives them (SmolLM2-135M mxint2-gptq measures KLD 6.0, perplexity 1.3e4)") if len(inc.dropna()) \
            else ""
        parts.append(f"{len(low)} runs below {SHIP_MIN_BITS:g} bits per element, shaded above "
                     f"({', '.join(fmts)}){rng}")
    rest = len(out) - len(low)
    parts.append(f"{rest} run{'s' if rest != 1 else ''} with perplexity increase > {SHIP_MAX_PPL_INCREASE:.0%} or "
                 f"KLD > {SHIP_MAX_KLD:g} nat")
    return "Left out of the frontier and this axis: " + "; ".join(parts) + "."


def plot_frontier(runs: pd.DataFrame, path: str | Path, y: str = "ppl_quant") -> Path:
    """Quality against bits per element per format kind (one line per model), then against bytes (Pareto frontier).

    ``runs``: :func:`quantpredict.report.tables.finished` output. Weight-only runs; at each (model, bits) the best
    method is drawn. Colour is model size throughout. The top row has one panel per format kind (the region below
    :data:`SHIP_MIN_BITS` shaded); the bottom panel, as wide as the row, puts every run inside the shipping bound
    (:func:`frontier_bound`) at its quantized weights' size in MB (marker: format kind) and draws the Pareto
    frontier: the runs that no smaller run beats. A note on that panel says what the bound left out.
    """
    best = best_per_bits(runs, y)
    kinds = [k for k in KIND_ORDER if len(best) and (best["format_kind"] == k).any()]
    ylabel = "perplexity (WikiText-2 test)" if y == "ppl_quant" else DELTA_LABEL
    with style() as plt:
        ncols = max(1, len(kinds))
        fig = plt.figure(figsize=(PANEL[0] * ncols + 1.0, PANEL[1] * 2 + 0.6), layout="constrained")
        grid = fig.add_gridspec(2, ncols, height_ratios=(1, 1.25))
        axes = [fig.add_subplot(grid[0, i]) for i in range(len(kinds))] + [fig.add_subplot(grid[1, :])]
        if best.empty:
            for ax in axes:
                empty_panel(ax, "no finished weight-only runs with a perplexity")
            return save(fig, path)
        best = best[best["format_kind"].isin(kinds)]
        from matplotlib import colors

        params = best["params"].clip(lower=1).to_numpy(float)
        lo, hi = float(np.nanmin(params)), float(np.nanmax(params))
        norm = colors.LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 1.01)
        cmap = plt.get_cmap("viridis")

        def colour(n: float):
            return cmap(norm(max(float(n), 1.0)))

        for ax, kind in zip(axes, kinds):
            s = best[best["format_kind"] == kind]
            for _, g in s.groupby("model", sort=False):
                g = g.sort_values("bits")
                ax.plot(g["bits"], g[y], marker=KIND_MARKERS[kind], ms=3, color=colour(g["params"].iloc[0]))
            log_axis(ax, "y", s[y])
            if float(s["bits"].min()) < SHIP_MIN_BITS:
                ax.axvspan(float(s["bits"].min()) - 0.3, SHIP_MIN_BITS, color="0.5", alpha=0.12, lw=0, zorder=0)
            ax.set_title(kind)
            ax.set_xlabel("weight bits per element (scales included)")
            ax.set_ylabel(ylabel)
        ax = axes[-1]
        ship = frontier_bound(best, y)
        inside = best[ship]
        for kind, g in inside.groupby("format_kind"):
            ax.scatter(g["weight_mb"], g[y], s=12, alpha=0.75, marker=KIND_MARKERS[kind],
                       c=[colour(v) for v in g["params"]])
            ax.scatter([], [], s=12, marker=KIND_MARKERS[kind], color="0.4", label=kind)
        front = pareto_frontier(inside, "weight_mb", y)
        ax.step(front["weight_mb"], front[y], "k-", where="post", lw=0.9, label="Pareto frontier")
        if len(inside):
            log_axis(ax, "x", inside["weight_mb"])
            log_axis(ax, "y", inside[y])
        ax.set_title(f"quality per byte: every format, at least {SHIP_MIN_BITS:g} bits per element")
        ax.set_xlabel("quantized weights (MB = non-embedding params × bits / 8)")
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper right")
        ship_note(ax, frontier_note(best, ship), loc="lower left", width=70)
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="non-embedding parameters",
                           shrink=0.6)
        log_ticks(bar.ax.yaxis, [norm.vmin, norm.vmax])
        # one label per model where the frontier reaches it, placed where it overlaps nothing
        first = front[front["model"] != front["model"].shift()]
        freeze_layout(fig)
        missed = place_labels(ax, first[["weight_mb", y]].to_numpy(float),
                              [f"{r['model']} {r['weight_format']}" for _, r in first.iterrows()])
        if missed:
            fig.text(0.01, 0.0, "Also on the frontier: " + ", ".join(t for _, t in missed) + ".", fontsize=6,
                     va="top", color="0.25")
        return save(fig, path)


def plot_feature_scatter(runs: pd.DataFrame, path: str | Path,
                         features: Sequence[str] = tuple(FEATURE_AXES)) -> Path:
    """Measured delta NLL against each of ``features``, one colour per family, Spearman's rho in the title.

    ``runs``: :func:`quantpredict.report.tables.finished` output. The delta axis is symmetric-log with a linear range
    of the median measured standard error (small deltas are noise and may be negative); feature axes are
    logarithmic where the values are positive (symmetric-log otherwise), linear for dB.
    """
    from scipy.stats import spearmanr

    floor = _noise_floor(runs)
    colors = family_colors(runs["family"]) if len(runs) else {}
    with style():
        fig, axes = _grid(len(features), ncols=3)
        for ax, feat in zip(axes, features):
            label, scale = FEATURE_AXES.get(feat, (feat, "linear"))
            x = pd.to_numeric(runs[feat], errors="coerce") if feat in runs else pd.Series(dtype=float)
            ok = np.isfinite(x.to_numpy(float)) if len(x) else np.array([], bool)
            if not ok.any():
                empty_panel(ax, f"{feat}: not in the store")
                continue
            s = runs[ok]
            xs = x[ok]
            for fam, g in s.groupby("family"):
                ax.scatter(xs.loc[g.index], g["delta"], s=7, alpha=0.6, color=colors[fam], label=fam)
            if scale == "log":
                pos = xs[xs > 0]
                if len(pos) == len(xs):
                    log_axis(ax, "x", xs)
                elif len(pos):
                    ax.set_xscale("symlog", linthresh=float(pos.quantile(0.05)))
            ax.set_yscale("symlog", linthresh=floor)
            ax.axhline(0, color="k", lw=0.5)
            rho = spearmanr(xs, s["delta"]).statistic if len(s) > 2 else float("nan")
            ax.set_title(f"Spearman ρ = {rho:+.2f} ({len(s)} runs)")
            ax.set_xlabel(label)
            ax.set_ylabel(DELTA_LABEL)
        axes[0].legend(loc="best")
        fig.tight_layout()
        return save(fig, path)


def plot_importance(importance: pd.DataFrame | None, path: str | Path, title: str, top: int = 15) -> Path:
    """Horizontal bars of the ``top`` features' importance (mean and std over folds and repeats)."""
    with style():
        n = 0 if importance is None else min(top, len(importance))
        fig, axes = _grid(1)
        ax = axes[0]
        fig.set_size_inches(PANEL[0] * 1.6, max(PANEL[1], 0.25 * n + 1.2))
        if not n:
            empty_panel(ax, title)
        else:
            imp = importance.head(n).iloc[::-1]
            ax.barh(imp["feature"], imp["importance"], xerr=imp["std"], color="tab:blue", alpha=0.8,
                    error_kw={"lw": 0.7})
            ax.axvline(0, color="k", lw=0.5)
            ax.set_xlabel("increase of held-out error when shuffled (mean |Δ asinh(Δ NLL / s)|)")
            ax.set_title(title)
        fig.tight_layout()
        return save(fig, path)
