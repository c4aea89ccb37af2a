"""``reports/predictors.md`` for the KLD-first predictors (written by ``quantpredict fit --kind physics|profile
--validate``): every target on every split, the targets met and missed, the baselines, the real models, the figure
of predicted against measured KLD, and the comparison with the equal-cost subsample (:func:`subsample_sections`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from quantpredict.predict.classes import METHOD_CLASSES, method_classes
from quantpredict.predict.subsample import subsample_path
from quantpredict.predict.targets import class_metrics, subsample_comparison

# (metric column, header, target, better) -- better: "low" or "high"; target None = no target set
COLUMNS = (
    ("kld_median_rel_err", "KLD med. rel. err", 0.05, "low"),
    ("kld_spearman_within", "KLD Spearman (within model)", 0.99, "high"),
    ("kld_r2_log", "R² log KLD", 0.98, "high"),
    ("kld_coverage", "KLD 90% cover", None, None),
    ("delta_median_rel_err", "ΔNLL med. rel. err (resolved)", 0.20, "low"),
    ("delta_median_rel_err_precise", "ΔNLL med. rel. err (> 10 SE)", None, None),
    ("delta_noise_floor", "ΔNLL noise floor", None, None),
    ("delta_r2", "R² ΔNLL", 0.90, "high"),
    ("delta_coverage", "ΔNLL 90% cover", None, None),
    ("delta_coverage_noise", "ΔNLL 90% cover (±2 SE)", None, None),
    ("top1_median_abs_err_pp", "top-1 med. abs. err (pp)", 0.5, "low"),
    ("top1_coverage", "top-1 90% cover", None, None),
)
SPLIT_TITLES = {"family": "leave one family out", "model": "leave one model out",
                "largest_size": "leave the largest size out (fit xs/s/m, predict l)",
                "real": "real models, predicted from the zoo alone"}


def _fmt(v, col: str) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if "coverage" in col:
        return f"{100 * v:.0f}%"
    if "rel_err" in col or col == "delta_noise_floor":
        return f"{100 * v:.1f}%"
    if col.endswith("_pp"):
        return f"{v:.2f}"
    return f"{v:.3f}"


def metrics_table(metrics: pd.DataFrame, split: str) -> str:
    rows = metrics[metrics["split"] == split]
    head = "| kind | runs | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for _, r in rows.iterrows():
        cells = [_fmt(r.get(c), c) for c, _, _, _ in COLUMNS]
        lines.append(f"| {r['kind']} | {int(r['n_runs'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_verdicts(metrics: pd.DataFrame, kind: str) -> list[str]:
    """One line per target: met or missed, by how much, on leave-one-family-out (largest-size-out for its own)."""
    out = []
    fam = metrics[(metrics["kind"] == kind) & (metrics["split"] == "family")]
    lss = metrics[(metrics["kind"] == kind) & (metrics["split"] == "largest_size")]
    checks = [(c, h, t, b, fam) for c, h, t, b in COLUMNS if t is not None]
    checks.append(("kld_median_rel_err", "leave-largest-size-out KLD med. rel. err", 0.08, "low", lss))
    for col, head, target, better, rows in checks:
        if rows.empty or col not in rows:
            out.append(f"- {head}: not measured")
            continue
        v = float(rows.iloc[0][col])
        ok = v <= target if better == "low" else v >= target
        out.append(f"- {head}: {_fmt(v, col)} against a target of {'≤' if better == 'low' else '≥'} "
                   f"{_fmt(target, col)}: **{'met' if ok else 'missed'}**")
    for split in ("family", "model"):
        r = metrics[(metrics["kind"] == kind) & (metrics["split"] == split)]
        if r.empty:
            continue
        cov = [f"{t} {_fmt(float(r.iloc[0][c]), c)}" for t, c in (("KLD", "kld_coverage"),
                                                                   ("ΔNLL", "delta_coverage"),
                                                                   ("top-1", "top1_coverage")) if c in r]
        inside = all(0.85 <= float(r.iloc[0][c]) <= 0.95 for c in ("kld_coverage", "delta_coverage",
                                                                   "top1_coverage") if c in r)
        out.append(f"- 90% coverage, {SPLIT_TITLES[split]}: {', '.join(cov)} (target 85-95%: "
                   f"**{'met' if inside else 'missed'}**)")
    return out


def limits(metrics: pd.DataFrame, kind: str) -> list[str]:
    """What limits the delta NLL target, in the runs' own numbers (when it is missed)."""
    r = metrics[(metrics["kind"] == kind) & (metrics["split"] == "family")]
    if r.empty or "delta_median_rel_err" not in r or float(r.iloc[0]["delta_median_rel_err"]) <= 0.20:
        return []
    r = r.iloc[0]
    return ["", f"**What limits delta NLL.** A measured delta NLL is itself noisy: on the resolved runs its standard "
                f"error alone would give a median relative error of {_fmt(r['delta_noise_floor'], 'rel_err')} against "
                f"a perfect predictor, and 'resolved' (> 2 SE) keeps many runs whose delta is barely above its noise. "
                f"On the {int(r['delta_n_precise'])} runs resolved to more than 10 SE the error is "
                f"{_fmt(r['delta_median_rel_err_precise'], 'rel_err')}. The rest is the model-specific ratio of delta "
                "NLL to KL (1.1-1.5 on the zoo), which the physics kind reads off the calibration batch's own NLL "
                "change where that is resolved, and which no scale-free input predicts where it is not."]


def kld_figure(predictions: pd.DataFrame, runs: pd.DataFrame, out: Path, kind: str, split: str = "family") -> Path:
    """Predicted against measured KLD with 90% intervals: the zoo's runs under ``split`` (one colour per family),
    and the real models' runs predicted from the zoo alone (split "real"), each real model its own series."""
    from quantpredict.style import PANEL, family_colors, intervals, pyplot, style

    plt = pyplot()
    p = predictions[(predictions["kind"] == kind) & (predictions["split"] == split)]
    truth = runs.loc[p.index]
    real = predictions[(predictions["kind"] == kind) & (predictions["split"] == "real")]
    real_truth = runs.loc[real.index]
    with style():
        fig, ax = plt.subplots(figsize=(PANEL[0] + 0.8, PANEL[1] + 0.6))
        families = sorted(truth["family"].astype(str).unique())
        models = sorted(real_truth["model"].astype(str).unique())
        colors = family_colors(families + models)
        for fam in families:
            sel = (truth["family"].astype(str) == fam).to_numpy()
            g = p[sel]
            intervals(ax, truth["kld"].to_numpy(float)[sel], g["kld"], g["kld_low"], g["kld_high"],
                      color=colors[fam], label=f"{fam} (zoo)", s=10)
        for model in models:
            sel = (real_truth["model"].astype(str) == model).to_numpy()
            g = real[sel]
            intervals(ax, real_truth["kld"].to_numpy(float)[sel], g["kld"], g["kld_low"], g["kld_high"],
                      color=colors[model], label=f"{model} (real, fitted on the zoo alone)", marker="D", s=22,
                      edgecolors="k", linewidths=0.5, zorder=4)
        measured = pd.concat([truth["kld"], real_truth["kld"]]).astype(float)
        lim = [float(np.nanmin(measured)) / 2, float(np.nanmax(measured)) * 2]
        ax.plot(lim, lim, "k--", lw=0.7, zorder=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured KLD on WikiText-2 test (nats/token)")
        ax.set_ylabel(f"predicted KLD ({kind}, 90% interval)")
        ax.set_title(f"{SPLIT_TITLES[split]}" + (f"; {', '.join(models)} from the zoo alone" if models else ""))
        ax.legend(fontsize=6, loc="upper left")
        fig.savefig(out)
        plt.close(fig)
    return out


def kld_caption(predictions: pd.DataFrame, runs: pd.DataFrame, kind: str, split: str = "family") -> str:
    """The sentence under :func:`kld_figure`: what its series are and how wide its bars are."""
    p = predictions[(predictions["kind"] == kind) & (predictions["split"] == split)]
    real = predictions[(predictions["kind"] == kind) & (predictions["split"] == "real")]
    width = (p["kld_high"] / p["kld_low"]).astype(float)
    width = width[np.isfinite(width) & (width > 0)]
    text = (f"*Each point is one zoo (model, recipe) predicted by `{kind}` fitted without the model's family, "
            "coloured by family")
    if len(real):
        models = ", ".join(sorted(runs.loc[real.index, "model"].astype(str).unique()))
        text += (f"; the diamonds are the {len(real)} runs of the real model{'s' if ',' in models else ''} "
                 f"{models}, predicted by `{kind}` fitted on the zoo alone")
    if len(width):
        text += (f". Bars are the 90% intervals (capped; the median spans a factor {float(width.median()):.2f} "
                 "from low to high, short on an axis of seven decades)")
    return text + ".*"


def real_model_table(predictions: pd.DataFrame, runs: pd.DataFrame, kind: str) -> str:
    p = predictions[(predictions["kind"] == kind) & (predictions["split"] == "real")]
    if p.empty:
        return ""
    truth = runs.loc[p.index]
    lines = ["| model | recipe | KLD measured | KLD predicted [90%] | ΔNLL measured | ΔNLL predicted | top-1 measured |"
             " top-1 predicted |", "|---|---|---|---|---|---|---|---|"]
    for i in p.index:
        t, r = truth.loc[i], p.loc[i]
        delta = float(t["nll_quant"] - t["nll_fp"])
        lines.append(f"| {t['model']} | {t['recipe']} | {t['kld']:.4f} ± {t.get('kld_se', float('nan')):.4f} | "
                     f"{r['kld']:.4f} [{r['kld_low']:.4f}, {r['kld_high']:.4f}] | {delta:.4f} ± "
                     f"{t['delta_nll_se']:.4f} | {r['delta_nll']:.4f} | {100 * t['top1_agree']:.2f}% | "
                     f"{100 * r['top1']:.2f}% |")
    return "\n".join(lines)


def write_targets_report(metrics: pd.DataFrame, predictions: pd.DataFrame, runs: pd.DataFrame, path: str | Path, *,
                         sources: Sequence[str], fitted: str, extra_sections: Sequence[str] = ()) -> Path:
    """Write the report and its figure next to it; returns the report's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = kld_figure(predictions, runs, path.parent / "kld_predicted_vs_measured.png", fitted)
    n_models = runs["model"].nunique()
    parts = [
        "# Predictors: KLD, delta NLL and top-1 agreement",
        "",
        f"Generated by `quantpredict fit --kind {fitted} --validate` from {', '.join(map(str, sources))} "
        f"({len(runs)} runs of {n_models} models). Every number is out of sample: each fold is fitted without the "
        "held-out runs. KLD is the mean KL(P_fp || P_q) per predicted WikiText-2 test token; delta NLL is judged on "
        "the runs it resolves (> 2 standard errors); coverage counts a delta as covered when its ±2 SE band meets the "
        "interval, since the measured delta itself is noisy.",
        "",
        "Kinds: `physics` (the exact second-order KL 0.5 δᵀFδ by a JVP on the calibration batch, plus the measured "
        "calibration KL), `profile` (the same quadratic priced from weights alone against a profile measured once "
        "per model, token-wise from every calibration token's layer inputs and sampled output gradients: what `rank` "
        "and `allocate` use), and the baselines `const_law` (KLD = c · 0.5 δᵀHδ with c the "
        "training runs' median ratio), `paper` (the seed study's random forest, fitted to log KLD)"
        + (" and `gbm` (the former default, delta NLL only)." if "gbm" in set(metrics["kind"]) else "."),
        "",
        f"![predicted vs measured KLD]({fig.name})",
        "",
        kld_caption(predictions, runs, fitted),
        "",
        f"## Targets ({fitted}, leave one family out unless stated)",
        "",
        *target_verdicts(metrics, fitted),
        *limits(metrics, fitted),
    ]
    for split in ("family", "model", "largest_size", "real"):
        if (metrics["split"] == split).any():
            parts += ["", f"## {SPLIT_TITLES[split][0].upper() + SPLIT_TITLES[split][1:]}", "",
                      metrics_table(metrics, split)]
    parts += ["", *class_sections(runs, predictions)]
    real = real_model_table(predictions, runs, fitted)
    if real:
        parts += ["", f"## Each real-model run, predicted by `{fitted}` fitted on the zoo alone", "", real]
    parts += ["", *extra_sections]
    path.write_text("\n".join(parts).rstrip() + "\n")
    return path


#: the kinds whose per-class rows the report shows, and the one-constant law beside them
CLASS_KINDS = ("profile", "physics", "const_law")


def class_sections(runs: pd.DataFrame, predictions: pd.DataFrame) -> list[str]:
    """Per method class, for each split: runs, models, and each kind's KLD median relative error, within-model
    Spearman and 90% coverage (the one-constant law has no interval). The targets (issue #28) are per class."""
    cm = class_metrics(runs, predictions)
    if cm.empty:
        return []
    kinds = [k for k in CLASS_KINDS if k in set(cm["kind"])]
    lines = ["## Per method class", "",
             "The same held-out predictions, split by method class (`quantpredict.predict.classes`: a per-layer "
             "recipe all in llama.cpp's types is a named mix, any other an allocated mix). Each cell reads KLD "
             "median relative error / within-model Spearman (models with 3 runs or more) / 90% coverage. A kind "
             "predicts only the runs that carry its features, so its run count can be lower than the class's. "
             "Targets: weights-only (`profile`) error ≤ 5%, Spearman ≥ 0.99, coverage 85-95% per class leave one "
             "family out; ≤ 10%, ≥ 0.98, 80-95% on each real model fitted without it."]
    for split in ("family", "largest_size", "real"):
        sub = cm[cm["split"] == split]
        if sub.empty:
            continue
        lines += ["", f"**{SPLIT_TITLES[split][0].upper() + SPLIT_TITLES[split][1:]}**", "",
                  "| method class | " + " | ".join(f"{k}: runs (models)" + " | " + f"{k}: err / ρ / cover"
                                                   for k in kinds) + " |",
                  "|---|" + "---|---|" * len(kinds)]
        for c in METHOD_CLASSES:
            cells = []
            for k in kinds:
                r = sub[(sub["method_class"] == c) & (sub["kind"] == k)]
                if r.empty:
                    cells += ["0", "–"]
                    continue
                r = r.iloc[0]
                cells += [f"{int(r['n_runs'])} ({int(r['n_models'])})",
                          f"{_fmt(r.get('kld_median_rel_err'), 'kld_median_rel_err')} / "
                          f"{_fmt(r.get('kld_spearman_within'), 'kld_spearman_within')} / "
                          f"{_fmt(r.get('kld_coverage'), 'kld_coverage')}"]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def subsample_sections(runs, predictions, sources, kinds) -> list[str]:
    """The equal-cost subsample comparison, from the ``<store>_subsample.parquet`` files next to the stores."""
    files = [subsample_path(s) for s in sources if "://" not in str(s) and subsample_path(s).exists()]
    if not files:
        return []
    sub = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    lines = ["## Against the equal-cost subsample", "",
             "The practitioner's alternative: measure KLD on a few test windows instead of predicting. Each run's "
             "subsample is measured on windows spread over the part of the test split its truth did not use "
             f"({', '.join(Path(f).name for f in files)}), and each run gets as many windows as the predictor's own "
             "feature seconds buy (the run's quantization paid first, so GPTQ recipes pay GPTQ on both sides; the FP "
             "side of a window counted as shared across recipes). Predictions are leave one family out.", "",
             "| kind | runs | predictor KLD med. rel. err | its median seconds | equal-cost subsample KLD med. rel. "
             "err | its median windows | subsample windows to match the predictor | their seconds |",
             "|---|---|---|---|---|---|---|---|"]
    curves = []
    for kind in kinds:
        c = subsample_comparison(runs, sub, predictions, kind)
        if not c:
            continue
        lines.append(f"| {kind} | {c['n_runs']} | {100 * c['predictor_kld_median_rel_err']:.1f}% | "
                     f"{c['median_predictor_seconds']:.2f} | {100 * c['subsample_kld_median_rel_err']:.1f}% | "
                     f"{c['median_subsample_windows']:.0f} | {c['crossover_windows']:.0f} | "
                     f"{c['crossover_seconds']:.2f} |")
        curves.append((kind, c["curve"]))
    by_class = []
    for kind in kinds:
        p = predictions[(predictions["kind"] == kind) & (predictions["split"] == "family")]
        classes = method_classes(runs.loc[p.index]) if len(p) else np.array([], dtype=object)
        for c in METHOD_CLASSES:
            c_ = subsample_comparison(runs, sub, p[classes == c], kind) if (classes == c).any() else {}
            if c_:
                by_class.append(f"| {kind} | {c} | {c_['n_runs']} | {100 * c_['predictor_kld_median_rel_err']:.1f}% | "
                                f"{100 * c_['subsample_kld_median_rel_err']:.1f}% | "
                                f"{c_['median_subsample_windows']:.0f} |")
    if by_class:
        lines += ["", "Per method class (the classes the subsample file measured):", "",
                  "| kind | method class | runs | predictor KLD med. rel. err | equal-cost subsample KLD med. rel. "
                  "err | its median windows |", "|---|---|---|---|---|---|", *by_class]
    if curves:
        lines += ["", "The subsample's error against its windows (same runs):", "",
                  "| windows | " + " | ".join(f"KLD med. rel. err ({k} runs)" for k, _ in curves) + " | seconds |",
                  "|---|" + "---|" * len(curves) + "---|"]
        for i, row in enumerate(curves[0][1]):
            cells = [f"{100 * c[i]['kld_median_rel_err']:.1f}%" for _, c in curves]
            lines.append(f"| {row['k']} | " + " | ".join(cells) + f" | {row['median_seconds']:.2f} |")
    return lines
