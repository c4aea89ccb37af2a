"""The figure a person reads to choose a recipe: predicted KLD (and perplexity) against bits per element, with
90% intervals, the Pareto frontier and the recommendation marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from quantpredict.report.style import PANEL, pyplot, style


def frontier_figure(frame: pd.DataFrame, out: str | Path, *, title: str | None = None,
                    measured: pd.DataFrame | None = None) -> Path:
    """Two panels (KLD on a log axis, perplexity) of ``rank_recipes``' frame, saved to ``out`` (PNG).

    ``measured`` (optional, columns ``recipe``, ``kld``, ``ppl_quant``) overlays measured values of the same recipes.
    """
    plt = pyplot()
    out = Path(out)
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(2 * PANEL[0] + 1.2, PANEL[1] + 0.4))
        gptq = frame["method"].astype(str).str.contains("gptq").to_numpy()
        for ax, col in zip(axes, ("kld", "ppl")):
            lo, hi = frame[f"{col}_low"].to_numpy(float), frame[f"{col}_high"].to_numpy(float)
            mid, bits = frame[col].to_numpy(float), frame["bits_per_element"].to_numpy(float)
            for sel, marker, label in ((~gptq, "o", "RTN"), (gptq, "s", "GPTQ")):
                ax.errorbar(bits[sel], mid[sel], yerr=[mid[sel] - lo[sel], hi[sel] - mid[sel]], fmt=marker,
                            ms=3.5, lw=0.7, capsize=1.5, alpha=0.8, label=f"{label} (predicted, 90%)")
            front = frame[frame["pareto"]].sort_values("bits_per_element")
            ax.plot(front["bits_per_element"], front[col], "-", color="k", lw=1, alpha=0.6, label="Pareto frontier")
            rec = frame[frame["recommended"]]
            if not rec.empty:
                ax.plot(rec["bits_per_element"], rec[col], "*", ms=12, color="tab:red", label="recommended")
            if measured is not None and not measured.empty:
                m = frame[["recipe", "bits_per_element"]].merge(measured, on="recipe")
                mcol = "kld" if col == "kld" else "ppl_quant"
                if mcol in m:
                    ax.plot(m["bits_per_element"], m[mcol], "x", color="tab:gray", ms=4, label="measured")
            ax.set_xlabel("bits per element (quantized linears, scales included)")
            if col == "kld":
                ax.set_yscale("log")
                ax.set_ylabel("KL(P_fp || P_q), nats/token")
            else:
                fp = float(np.nanmedian(frame["ppl_fp"]))
                ax.axhline(fp, color="k", lw=0.6, ls=":", label=f"FP {fp:.2f}")
                ax.set_yscale("log")
                ax.set_ylabel("WikiText-2 perplexity")
            for _, r in front.iterrows():
                ax.annotate(r["recipe"], (r["bits_per_element"], r[col]), fontsize=5.5, alpha=0.7,
                            xytext=(3, 3), textcoords="offset points")
        axes[0].legend(loc="upper right", fontsize=6)
        fig.suptitle(title or f"{frame.attrs.get('model', '')}: predicted quality against bits", fontsize=9)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
        plt.close(fig)
    return out
