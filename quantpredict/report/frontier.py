"""The figure a person reads to choose a recipe: predicted KLD (and perplexity) against bits per element, with
90% intervals, the Pareto frontier and the recommendation marked.

It is drawn over the region a user would ship: recipes whose predicted perplexity more than doubles or whose
predicted KLD exceeds 1 nat/token (:data:`quantpredict.style.SHIP_MAX_KLD`) are left out of the frontier and of both
axes (a 2-bit recipe's perplexity of 1e4, with an interval to 1e18, would otherwise flatten every shippable one onto
the axis), and a note on the axes names them. Frontier labels are placed by :func:`quantpredict.style.place_labels`,
which checks their rendered extents, so that neighbours such as int8/mxint8 cannot collide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from quantpredict.report.style import (
    PANEL,
    SHIP_MAX_KLD,
    SHIP_MAX_PPL_INCREASE,
    freeze_layout,
    intervals,
    place_labels,
    pyplot,
    ship_note,
    shippable,
    style,
)

METHOD_STYLE = {"RTN": ("o", "tab:orange"), "GPTQ": ("s", "tab:blue")}  # as in the PTQ-vs-QAT figures


def ship_mask(frame: pd.DataFrame) -> np.ndarray:
    """The rows of ``rank_recipes``' frame inside the shipping bound (predicted perplexity at most doubled, predicted
    KLD at most 1 nat/token)."""
    ratio = frame["ppl"].to_numpy(float) / frame["ppl_fp"].to_numpy(float) if "ppl_fp" in frame else None
    return shippable(ratio, frame["kld"].to_numpy(float))


def bound_text() -> str:
    return (f"predicted perplexity increase > {SHIP_MAX_PPL_INCREASE:.0%} or KLD > {SHIP_MAX_KLD:g} nat/token")


def _names(recipes, limit: int = 8) -> str:
    recipes = list(recipes)
    return ", ".join(recipes[:limit]) + (f" and {len(recipes) - limit} more" if len(recipes) > limit else "")


def draw_frontier(frame: pd.DataFrame, *, title: str | None = None, measured: pd.DataFrame | None = None):
    """The figure of :func:`frontier_figure`, not saved (returns the matplotlib figure)."""
    plt = pyplot()
    ship = ship_mask(frame)
    shown, left = frame[ship], frame[~ship]
    gptq = shown["method"].astype(str).str.contains("gptq").to_numpy()
    front = shown[shown["pareto"].astype(bool)].sort_values("bits_per_element")
    fp = float(np.nanmedian(frame["ppl_fp"])) if "ppl_fp" in frame else float("nan")
    fig, axes = plt.subplots(1, 2, figsize=(2 * PANEL[0] + 1.6, PANEL[1] + 0.8), layout="constrained")
    for ax, col in zip(axes, ("kld", "ppl")):
        mid, bits = shown[col].to_numpy(float), shown["bits_per_element"].to_numpy(float)
        lo, hi = shown[f"{col}_low"].to_numpy(float), shown[f"{col}_high"].to_numpy(float)
        for sel, label in ((~gptq, "RTN"), (gptq, "GPTQ")):
            marker, color = METHOD_STYLE[label]
            if sel.any():
                intervals(ax, bits[sel], mid[sel], lo[sel], hi[sel], color=color, marker=marker,
                          label=f"{label} (predicted, 90%)")
        ax.plot(front["bits_per_element"], front[col], "-", color="k", lw=1, alpha=0.6, zorder=2,
                label="Pareto frontier")
        rec = shown[shown["recommended"].astype(bool)]
        if not rec.empty:
            ax.plot(rec["bits_per_element"], rec[col], "*", ms=12, color="tab:red", zorder=4, label="recommended")
        if measured is not None and not measured.empty:
            m = shown[["recipe", "bits_per_element"]].merge(measured, on="recipe")
            mcol = "kld" if col == "kld" else "ppl_quant"
            if mcol in m:
                ax.plot(m["bits_per_element"], m[mcol], "x", color="tab:gray", ms=4, zorder=4, label="measured")
        ax.set_xlabel("bits per element (quantized linears, scales included)")
        # the axis covers the shown points and their intervals, up to just past the bound (intervals reaching
        # beyond it are cut at the frame)
        if col == "kld":
            top = SHIP_MAX_KLD
            ax.set_yscale("log")
            ax.set_ylabel("KL(P_fp || P_q), nats/token")
        else:
            top = fp * (1 + SHIP_MAX_PPL_INCREASE)
            if np.isfinite(fp):
                ax.axhline(fp, color="k", lw=0.6, ls=":")
                ax.annotate(f"FP {fp:.2f}", (0.01, fp), xycoords=("axes fraction", "data"), xytext=(0, -2),
                            textcoords="offset points", va="top", fontsize=6, color="0.3")
            ax.set_ylabel("WikiText-2 perplexity")
        vals = np.concatenate([mid, lo]) if len(mid) else np.array([])
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if len(vals) and np.isfinite(top):
            ceiling = max(min(float(np.nanmax(hi)) if np.isfinite(hi).any() else top, top), float(mid.max()))
            if col == "kld":
                ax.set_ylim(float(vals.min()) / 1.6, ceiling * 1.6)
            else:
                floor = min(float(vals.min()), fp)
                pad = 0.06 * (ceiling - floor)
                ax.set_ylim(floor - pad, ceiling + pad)
        if len(bits):
            ax.set_xlim(float(np.nanmin(bits)) - 0.6, float(np.nanmax(bits)) + 0.6)
    axes[0].legend(loc="upper right", fontsize=6)
    fig.suptitle(title or f"{frame.attrs.get('model', '')}: predicted quality against bits", fontsize=9)
    note = f"Left out of the frontier and the axes ({bound_text()}): "
    ship_note(axes[1], note + (f"{_names(left['recipe'])}." if len(left) else "none."), loc="upper right")
    freeze_layout(fig)
    unplaced = set()
    for ax, col in zip(axes, ("kld", "ppl")):
        missed = place_labels(ax, front[["bits_per_element", col]].to_numpy(float), list(front["recipe"]),
                              alpha=0.8)
        unplaced |= {t for _, t in missed}
    if unplaced:
        fig.text(0.01, 0.0, f"Also on the frontier (no room for a label): {_names(sorted(unplaced))}.", fontsize=6,
                 va="top", color="0.25")
    return fig


def frontier_figure(frame: pd.DataFrame, out: str | Path, *, title: str | None = None,
                    measured: pd.DataFrame | None = None) -> Path:
    """Two panels (KLD on a log axis, perplexity) of ``rank_recipes``' frame, saved to ``out`` (PNG).

    ``measured`` (optional, columns ``recipe``, ``kld``, ``ppl_quant``) overlays measured values of the same recipes.
    Only the recipes inside the shipping bound are drawn (see the module docstring); a note on the axes names the
    others.
    """
    plt = pyplot()
    out = Path(out)
    with style():
        fig = draw_frontier(frame, title=title, measured=measured)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
        plt.close(fig)
    return out
