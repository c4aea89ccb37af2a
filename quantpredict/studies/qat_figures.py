"""The PTQ-vs-QAT study's figures, shared by :mod:`.report` (the zoo study) and :mod:`.hurts` (where
quantization hurts): kept apart so that neither of those two imports the other back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from quantpredict.studies.study import STUDY_FORMATS

LABELS = {"fp": "FP", "rtn": "RTN", "gptq": "GPTQ", "qat_rtn": "QAT<-RTN", "qat_gptq": "QAT<-GPTQ"}
COLORS = {"rtn": "tab:orange", "gptq": "tab:blue", "qat_rtn": "tab:red", "qat_gptq": "tab:green"}


def _fmt_order(records: Sequence[dict]) -> list[str]:
    seen = [r["format"] for r in records]
    return [f for f in STUDY_FORMATS if f in seen] + sorted({f for f in seen if f not in STUDY_FORMATS})


def render_figures(records: Sequence[dict], out_dir: str | Path, prefix: str = "qat") -> list[Path]:
    """Write the four figures (``{prefix}_ppl.png``, ``_misalignment``, ``_basin``, ``_loss``); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fmts = _fmt_order(records)
    models = sorted({r["model"] for r in records})
    written = []

    # 1. NLL increase over FP per format and method (averaged over models, bars = models' spread)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.2
    for j, meth in enumerate(("rtn", "gptq", "qat_rtn", "qat_gptq")):
        ys, es = [], []
        for fmt in fmts:
            rs = [r for r in records if r["format"] == fmt]
            ys.append(sum(r["methods"][meth]["delta_nll"] for r in rs) / len(rs))
            es.append(max(r["methods"][meth]["delta_nll_se"] for r in rs))
        xs = [i + (j - 1.5) * width for i in range(len(fmts))]
        ax.bar(xs, ys, width, yerr=es, label=LABELS[meth], color=COLORS[meth], capsize=2)
    ax.set_xticks(range(len(fmts)), fmts)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylabel("test NLL - FP NLL (nats/token)")
    ax.set_title("Same calibration data: PTQ vs QAT (" + (models[0] if len(models) == 1 else
                 f"mean over {len(models)} models; bars: largest paired se") + ")")
    # outside the axes: inside, any corner covers some format's bars
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    written.append(out / f"{prefix}_ppl.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # 2./3. local objective (resp. distance) vs global NLL along the paths, one panel per format (first model)
    # with several models, relative x (over the FP model's own scale) and NLL above FP put every model on one scale,
    # and the legend names methods only
    many = len(models) > 1
    for fname, xkey, xlabel in ((f"{prefix}_misalignment.png", "local", "summed layer-output error  sum tr(dW H dW^T)"),
                                (f"{prefix}_basin.png", "distance", "||W - W_fp||_F (all quantized weights)")):
        if many:
            xkey, xlabel = xkey + "_rel", {"local": "sum tr(dW H dW^T) / sum tr(W H W^T)",
                                           "distance": "||W - W_fp|| / ||W_fp||"}[xkey]
        n = len(fmts)
        cols = min(3, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
        for ax, fmt in zip(axes.flat, fmts):
            for r in (r for r in records if r["format"] == fmt):
                marker = "o" if r["model"] == models[0] else "s"
                y0 = r["fp_point"]["nll"] if many else 0.0
                for meth, path in r["paths"].items():
                    xs = [p[xkey] for p in path]
                    ys = [p["nll"] - y0 for p in path]
                    style = "-" if meth.startswith("qat") else "--"
                    ax.plot(xs, ys, style, marker=marker, ms=2 if many else 2.5, color=COLORS[meth],
                            lw=0.6 if many else 1, alpha=0.5 if many else 1.0, label=LABELS[meth])
                    ax.plot(xs[-1:], ys[-1:], marker="*", ms=6 if many else 9, color=COLORS[meth])
            ax.set_title(fmt)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("NLL above FP on fixed test prefix" if many else "NLL on fixed test prefix", fontsize=8)
            if many:  # local errors span decades across formats; relative distances do not
                if xkey == "local_rel":
                    ax.set_xscale("symlog", linthresh=1e-3)
                ax.set_yscale("symlog", linthresh=1e-2)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=min(4, len(uniq)), fontsize=8)
        fig.suptitle("PTQ (dashed: layer by layer) and QAT (solid: steps); * = end"
                     + (f"; {len(models)} models" if many else ""), fontsize=9)
        fig.tight_layout(rect=(0, 0.06, 1, 0.96))
        written.append(out / fname)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    # 4. loss curves
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in records:
        if r["model"] != models[0]:
            continue
        for init in ("rtn", "gptq"):
            losses = r["qat"][init]["losses"]
            ax.plot(range(1, len(losses) + 1), losses, lw=0.8,
                    label=f"{r['format']} from {init.upper()}", ls="-" if init == "rtn" else ":")
    ax.set_xlabel("step")
    ax.set_ylabel("minibatch NLL (nats/token)")
    ax.set_title(f"QAT training loss ({models[0]})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(out / f"{prefix}_loss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
