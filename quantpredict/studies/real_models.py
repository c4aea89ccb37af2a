"""``reports/real_models.md``: the real pre-trained models' runs, and what the predictors said before they saw them.

Per recipe: perplexity, KLD and top-1 agreement with their standard errors, and GPTQ's gain over RTN (the paired
difference of the two runs' delta NLL on the same windows). Then the predictors' first contact: the shipped
predictor (fitted without the model) against what was measured, with intervals, and the KLD-first kinds fitted
on the zoo alone. Nothing here is written by hand: every sentence with a number is computed from the runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# the method classes issue #28 validates separately: one definition, the predictor's (its per-class intervals)
from quantpredict.predict.classes import METHOD_CLASSES, method_class


def _windows(v) -> np.ndarray:
    if isinstance(v, str):
        v = json.loads(v)
    return np.asarray(v if v is not None else [], float)


def paired_gain(rtn: pd.Series, gptq: pd.Series) -> tuple[float, float]:
    """``delta_rtn - delta_gptq`` and its paired standard error over the shared windows (NaN when the runs do not
    share their windows)."""
    a, b = _windows(rtn.get("window_delta_nll")), _windows(gptq.get("window_delta_nll"))
    if len(a) == 0 or len(a) != len(b):
        return float("nan"), float("nan")
    w = _windows(rtn.get("window_tokens"))
    w = w / w.sum() if len(w) == len(a) else np.full(len(a), 1 / len(a))
    d = a - b
    mean = float((w * d).sum())
    se = float(np.sqrt(np.sum(w**2 * (d - mean) ** 2) * len(d) / max(len(d) - 1, 1)))
    return mean, se


def bits_of(run: pd.Series) -> float:
    return float(run.get("bits_per_element", float("nan")))


def measured_table(runs: pd.DataFrame) -> str:
    """One row per run; a ``windows`` column where the runs were measured on more than one window count (each
    row's Δppl is against the FP model on its own windows)."""
    several = runs["eval_windows"].nunique() > 1 if "eval_windows" in runs else False
    lines = ["| recipe | bits | " + ("windows | " if several else "") + "ppl ± SE | Δppl | KLD ± SE | top-1 ± SE | "
             "GPTQ gain in ΔNLL (RTN − GPTQ) ± paired SE |",
             "|---|---|" + ("---|" if several else "") + "---|---|---|---|---|"]
    by = {r["recipe"]: r for _, r in runs.iterrows()}
    for _, r in runs.sort_values(["bits_per_element", "recipe"], ascending=[False, True]).iterrows():
        gain = ""
        if r["method"] == "gptq":
            rtn = by.get(str(r["recipe"]).replace("-gptq", "-rtn", 1))
            if rtn is not None:
                g, se = paired_gain(rtn, r)
                gain = f"{g:+.4f} ± {se:.4f}" if math.isfinite(g) else ""
        ppl_se = r["ppl_quant"] * r.get("nll_quant_se", float("nan"))
        windows = f"{int(r['eval_windows'])} | " if several else ""
        lines.append(f"| {r['recipe']} | {bits_of(r):.2f} | {windows}{r['ppl_quant']:.2f} ± {ppl_se:.2f} | "
                     f"{100 * (r['ppl_quant'] / r['ppl_fp'] - 1):+.1f}% | {r['kld']:.4f} ± {r['kld_se']:.4f} | "
                     f"{100 * r['top1_agree']:.2f}% ± {100 * r.get('top1_agreement_pct_se', float('nan')) / 100:.2f} "
                     f"| {gain} |")
    return "\n".join(lines)


def prediction_table(runs: pd.DataFrame, pred: pd.DataFrame, label: str) -> str:
    has_kld = "kld" in pred and pred["kld"].notna().any()
    head = "| recipe | ΔNLL measured | ΔNLL predicted [90%] | ppl measured | ppl predicted [90%] |"
    sep = "|---|---|---|---|---|"
    if has_kld:
        head += " KLD measured | KLD predicted [90%] |"
        sep += "---|---|"
    lines = [f"**{label}**", "", head, sep]
    for i, r in runs.iterrows():
        p = pred.loc[i]
        delta = r["nll_quant"] - r["nll_fp"]
        row = (f"| {r['recipe']} | {delta:.4f} ± {r['delta_nll_se']:.4f} | {p['delta_nll']:.4f} "
               f"[{p['delta_low']:.4f}, {p['delta_high']:.4f}] | {r['ppl_quant']:.2f} | {p['ppl']:.2f} "
               f"[{p['ppl_low']:.2f}, {p['ppl_high']:.2f}] |")
        if has_kld:
            row += f" {r['kld']:.4f} | {p['kld']:.4f} [{p['kld_low']:.4f}, {p['kld_high']:.4f}] |"
        lines.append(row)
    return "\n".join(lines)


def accuracy_line(runs: pd.DataFrame, pred: pd.DataFrame, label: str) -> str:
    from scipy.stats import spearmanr

    delta = (runs["nll_quant"] - runs["nll_fp"]).to_numpy(float)
    d = pred["delta_nll"].to_numpy(float)
    res = delta > 2 * runs["delta_nll_se"].to_numpy(float)
    ratio = d[res] / delta[res]
    parts = [f"{label}: delta NLL median relative error {100 * np.median(np.abs(ratio - 1)):.0f}% on "
             f"{int(res.sum())} resolved runs (median ratio predicted/measured {np.median(ratio):.2f})"]
    cover = np.mean((pred["delta_low"] <= delta) & (delta <= pred["delta_high"]))
    parts.append(f"90% interval covers {100 * cover:.0f}% of the deltas")
    if "kld" in pred and pred["kld"].notna().any():
        k, kp = runs["kld"].to_numpy(float), pred["kld"].to_numpy(float)
        parts.append(f"KLD median relative error {100 * np.median(np.abs(kp / k - 1)):.1f}%, ranking Spearman "
                     f"{spearmanr(k, kp).statistic:.3f}, coverage "
                     f"{100 * np.mean((pred['kld_low'] <= k) & (k <= pred['kld_high'])):.0f}%")
    return "- " + "; ".join(parts) + "."


def class_table(runs: pd.DataFrame, pred: pd.DataFrame) -> str:
    """Per method class: the runs predicted, KLD median relative error, within-model Spearman (3 runs or more) and
    the 90% interval's coverage; a class without runs is listed as such."""
    from scipy.stats import spearmanr

    lines = ["| method class | runs | KLD med. rel. err | Spearman | 90% coverage |", "|---|---|---|---|---|"]
    classes = runs.apply(method_class, axis=1)
    for c in METHOD_CLASSES:
        idx = classes.index[classes == c]
        if len(idx) == 0:
            lines.append(f"| {c} | 0 | – | – | – |")
            continue
        k, kp = runs.loc[idx, "kld"].to_numpy(float), pred.loc[idx, "kld"].to_numpy(float)
        cover = np.mean((pred.loc[idx, "kld_low"].to_numpy(float) <= k) & (k <= pred.loc[idx, "kld_high"]
                                                                              .to_numpy(float)))
        rho = f"{spearmanr(k, kp).statistic:.3f}" if len(idx) >= 3 else "–"
        lines.append(f"| {c} | {len(idx)} | {100 * np.median(np.abs(kp / k - 1)):.1f}% | {rho} | "
                     f"{100 * cover:.0f}% |")
    return "\n".join(lines)


def render(runs: pd.DataFrame, predictions: Sequence[tuple[str, pd.DataFrame]], out: str | Path, *,
           cards: dict[str, dict], commands: Sequence[str], refit_note: str = "") -> Path:
    """Write the page for every real model in ``runs``; ``predictions`` are (label, frame indexed like runs)."""
    out = Path(out)
    parts = ["# Real pre-trained models", "",
             "The zoo's models are small and undertrained; these are models nobody here trained. Each is measured "
             "on a fixed prefix of WikiText-2 test (the window count is in the table heading), FP and quantized on "
             "the same windows; standard errors are over windows, the GPTQ gain's is paired (same windows).", ""]
    for model in sorted(runs["model"].unique()):
        r = runs[runs["model"] == model]
        card = cards.get(model, {})
        parts += [f"## {model}", ""]
        if card:
            parts += [f"{card.get('n_params_total', 0):,} parameters ({card.get('family')}), from "
                      f"`{card.get('package') or card.get('gguf_file')}`; about {card.get('tokens_per_param', 0):,.0f} "
                      f"training tokens per non-embedding parameter ({card.get('tokens_source', 'unknown')}).", "",
                      f"**Note:** {card['note']}" if card.get("note") else "", ""]
        fp = []
        for n, rn in r.groupby(r["eval_windows"].astype(int)):  # each window count has its own FP side
            runs_word = "" if r["eval_windows"].nunique() == 1 else f" ({len(rn)} run{'s' * (len(rn) > 1)})"
            fp.append(f"{rn['ppl_fp'].median():.2f} on {n} windows of {int(rn['seq_len'].iloc[0])} tokens "
                      f"({int(rn['eval_tokens'].median()):,} predicted tokens){runs_word}")
        parts += [f"FP perplexity {'; '.join(fp)}.", "", measured_table(r), ""]
        gptq = r[r["method"] == "gptq"]
        gains = []
        for _, g in gptq.iterrows():
            rtn = r[r["recipe"] == str(g["recipe"]).replace("-gptq", "-rtn", 1)]
            if not rtn.empty:
                gains.append((g["recipe"], *paired_gain(rtn.iloc[0], g)))
        if gains:
            better = sum(1 for _, m, se in gains if m > 2 * se)
            worse = sum(1 for _, m, se in gains if m < -2 * se)
            parts += [f"GPTQ lowers the delta NLL significantly (> 2 paired SE) in {better} of {len(gains)} formats "
                      f"and raises it in {worse}.", ""]
        parts += ["### What the predictors said before seeing this model", ""]
        said = False
        for label, pred in predictions:
            pm = pred.loc[pred.index.intersection(r.index)]
            if pm.empty:
                continue
            rr = r.loc[pm.index]
            parts += [accuracy_line(rr, pm, label), ""]
            if "kld" in pm and pm["kld"].notna().any():
                parts += [class_table(rr, pm), ""]
            said = True
        if not said:  # an empty heading would read as "they said nothing"; say why
            parts += ["No run of this model has the features the KLD-first kinds read yet (the `fisher` and "
                      "`profile` groups); `quantpredict backfill --store STORE --groups fisher,profile` adds them "
                      "without evaluating again.", ""]
        for label, pred in predictions:
            pm = pred.loc[pred.index.intersection(r.index)]
            if not pm.empty:
                parts += [prediction_table(r.loc[pm.index], pm, label), ""]
    if refit_note:
        parts += ["## After refitting with the real model included", "", refit_note, ""]
    parts += ["## Reproduce", "", "```bash", *commands, "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(p for p in parts if p is not None).rstrip() + "\n")
    return out
