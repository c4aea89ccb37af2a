"""``reports/training_tokens.md``: quantization damage against training tokens per parameter, and Ouyang's law.

Ouyang et al. 2024 ("Low-bit quantization favors undertrained LLMs", arXiv 2411.17691) fit the quantization-induced
loss increase of 1,500+ Pythia checkpoints as ``dqLoss = k D^beta / (N^alpha P^gamma)`` (D training tokens, N
non-embedding parameters, P bits). Here the same form is fitted by least squares in log space to the runs of the
long-trained zoo checkpoints (one training run per architecture, saved at several budgets) with the base zoo models
as their first point, to delta NLL and to KLD, for integer formats (P = the element's bits). Repeated epochs over a
small corpus are not Pythia's fresh tokens; the page says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# quoted from arXiv 2411.17691 (their unified law for GPTQ on Pythia); not re-checked here, which has no network
PUBLISHED = {"alpha": 0.2276, "beta": 0.5251, "gamma": 5.4812}
INT_BITS = {f"int{k}": k for k in range(2, 9)} | {f"mxint{k}": k for k in range(2, 9)}


def base_of(name: str) -> str:
    """``llama-xs-d300`` -> ``llama-xs``; a base zoo model is its own base."""
    parts = str(name).split("-")
    return "-".join(parts[:2]) if len(parts) > 2 and parts[2].startswith("d") else str(name)


def study_frame(runs: pd.DataFrame, bases: Sequence[str]) -> pd.DataFrame:
    """The runs of the long-trained checkpoints and of their base models (their first point), default block size,
    weight-only, with ``base``, ``tokens_per_param``, ``delta`` and the element bits ``P`` of integer formats."""
    r = runs[(runs["status"] == "done") & runs["model"].map(base_of).isin(bases)].copy()
    r = r[r["act_format"].isna() & r["smoothquant_alpha"].isna() & r["recipe_block_size"].isna()]
    r["base"] = r["model"].map(base_of)
    r["delta"] = r["nll_quant"] - r["nll_fp"]
    r["P"] = r["weight_format"].map(INT_BITS)
    return r


def fit_ouyang(df: pd.DataFrame, target: str, form: str = "ouyang") -> dict:
    """Least squares on the resolved runs of integer formats, coefficients with standard errors (statsmodels OLS).

    ``form="ouyang"``: ``log target = log k + beta log D - alpha log N - gamma log P`` (Ouyang et al.'s law).
    ``form="ratio"``: ``log target = log k + beta log (D/N) - gamma log P``, the scale-free special case
    alpha = beta (damage set by tokens per parameter, as Kumar et al. find for post-training quantization); it is
    the form that can be carried to a model far larger than the zoo without extrapolating a size exponent."""
    import statsmodels.api as sm

    if form not in ("ouyang", "ratio"):
        raise ValueError(f"form must be 'ouyang' or 'ratio', got {form!r}")
    d = df[df["P"].notna() & (df[target] > 0)]
    if target == "delta":
        d = d[d["delta"] > 2 * d["delta_nll_se"]]
    if len(d) < 8 or d["model"].nunique() < 3:
        return {"n": len(d), "form": form}
    tpp, n = d["tokens_per_param"].to_numpy(float), d["n_params_nonembed"].to_numpy(float)
    cols = {"log_D": np.log(tpp * n), "neg_log_N": -np.log(n)} if form == "ouyang" else {"log_D": np.log(tpp)}
    X = pd.DataFrame(cols | {"neg_log_P": -np.log(d["P"].to_numpy(float))}, index=d.index)
    fit = sm.OLS(np.log(d[target].to_numpy(float)), sm.add_constant(X)).fit()
    out = {"n": len(d), "form": form, "models": int(d["model"].nunique()), "log_k": float(fit.params["const"]),
           "beta": float(fit.params["log_D"]), "beta_se": float(fit.bse["log_D"]),
           "gamma": float(fit.params["neg_log_P"]), "gamma_se": float(fit.bse["neg_log_P"]),
           "r2": float(fit.rsquared), "resid_sd": float(np.sqrt(fit.scale)), "result": fit}
    if form == "ouyang":
        out |= {"alpha": float(fit.params["neg_log_N"]), "alpha_se": float(fit.bse["neg_log_N"])}
    else:  # alpha = beta by construction
        out |= {"alpha": out["beta"], "alpha_se": out["beta_se"]}
    return out


def law_predict(fit: dict, D: np.ndarray, N: np.ndarray, P: np.ndarray) -> np.ndarray:
    """The fitted law at training tokens ``D``, non-embedding parameters ``N`` and element bits ``P``."""
    return np.exp(fit["log_k"] + fit["beta"] * np.log(D) - fit["alpha"] * np.log(N) - fit["gamma"] * np.log(P))


def figure(df: pd.DataFrame, out: Path, target: str, formats: Sequence[str], real: pd.DataFrame | None = None) -> Path:
    """One panel per format: ``target`` against training tokens per parameter, one line per zoo base model (its
    family's colour, one marker per size), the real model a star in its own colour; one x label for the row."""
    from quantpredict.report.style import PANEL, family_colors, pyplot, style

    plt = pyplot()
    bases = sorted(df["base"].unique())
    colors = family_colors(list(bases) + ([] if real is None else list(real["model"].astype(str).unique())))
    markers = dict(zip(sorted({b.split("-", 1)[-1] for b in bases}), "o^sDv"))
    with style():
        fig, axes = plt.subplots(1, len(formats), figsize=(PANEL[0] * len(formats) * 0.8, PANEL[1] + 0.3),
                                 squeeze=False, layout="constrained")
        for ax, fmt in zip(axes[0], formats):
            for base in bases:
                s = df[(df["base"] == base) & (df["recipe"] == f"{fmt}-rtn")].sort_values("tokens_per_param")
                if len(s):
                    ax.plot(s["tokens_per_param"], s[target].clip(lower=1e-6), "-", marker=markers.get(
                        base.split("-", 1)[-1], "o"), ms=3.5, color=colors[base], label=base)
            if real is not None:
                rr = real[real["recipe"] == f"{fmt}-rtn"].assign(delta=lambda r: r["nll_quant"] - r["nll_fp"])
                if len(rr):
                    name = str(rr["model"].iloc[0])
                    ax.plot(rr["tokens_per_param"], rr[target], "*", ms=11, color=colors[name], mec="k", mew=0.5,
                            label=f"{name} (real)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{fmt} RTN")
        fig.supxlabel("training tokens per non-embedding parameter", fontsize=8.5)
        axes[0][0].set_ylabel({"kld": "KLD (nats/token)", "delta": "delta NLL (nats/token)"}[target])
        axes[0][-1].legend(fontsize=6, loc="lower right")
        fig.savefig(out)
        plt.close(fig)
    return out


def render(runs: pd.DataFrame, cards: dict[str, dict], out: str | Path, *, bases: Sequence[str],
           real: pd.DataFrame | None = None, predictor_note: Sequence[str] = (), commands: Sequence[str] = ()
           ) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df = study_frame(runs, bases)
    figs = {t: figure(df, out.parent / f"training_tokens_{t}.png", t, ("mxint4", "int4", "mxint3", "mxfp6_e2m3"),
                      real) for t in ("kld", "delta")}
    parts = ["# Quantization damage against training tokens", "",
             "Each long-trained checkpoint is one warmup-stable-decay training run per architecture, saved (after a "
             "cooldown branch) at 30, 100 and 300 training tokens per non-embedding parameter; the base zoo model "
             "(1-10 tokens per parameter, its own cosine schedule) is the first point. The corpus is WikiText-2 train "
             "plus tiny-shakespeare train (3.48M tokens), so the longer budgets repeat it for up to ~9 epochs: these "
             "are not Pythia's fresh tokens, and a model may start to overfit (valid perplexity is in the table).", "",
             "Overfitting is held by AdamW weight decay 0.1 and gradient clipping at 1.0 only (no dropout, no early "
             "stopping), and valid perplexity fell at every budget. Training resumes from "
             "`data/zoo/_long/<base>-long.resume.safetensors`, the committed compact state of each run whose budgets "
             "are not all trained (bf16 weights; AdamW's moments are re-estimated at resume over the 100 batches "
             "before it, with the weights frozen), or from the full fp32 state with the moments where the training "
             "machine kept it; `quantpredict zoo build --long` does either.", ""]
    parts += ["| checkpoint | tokens/param | tokens | epochs | valid ppl | test ppl |", "|---|---|---|---|---|---|"]
    for name in sorted(df["model"].unique(), key=lambda n: (base_of(n), cards.get(n, {}).get("tokens_trained", 0))):
        c = cards.get(name, {})
        tpp = c.get("tokens_per_param") or (c.get("tokens_trained", 0) / max(c.get("n_params_nonembed", 1), 1))
        parts.append(f"| {name} | {tpp:,.1f} | {c.get('tokens_trained', 0):,} | {c.get('epochs', '–')} | "
                     f"{c.get('valid_ppl', float('nan')):.2f} | {c.get('test_ppl', float('nan')):.2f} |")
    parts += ["", f"![KLD against tokens per parameter]({figs['kld'].name})", "",
              f"![delta NLL against tokens per parameter]({figs['delta'].name})", ""]
    m4 = df[df["recipe"] == "mxint4-rtn"]
    if len(m4):
        base_max = m4[m4["model"] == m4["base"]]["kld"].max()
        long_max = m4[m4["model"] != m4["base"]]["kld"].max()
        who = m4.loc[m4["kld"].idxmax(), "model"]
        parts += [f"**mxint4 RTN KLD.** The base zoo models reach at most {base_max:.4f}; the long-trained "
                  f"checkpoints reach {long_max:.4f} ({who})"
                  + (f"; the real model {real['model'].iloc[0]} has "
                     f"{real[real['recipe'] == 'mxint4-rtn']['kld'].iloc[0]:.3f}"
                     if real is not None and (real["recipe"] == "mxint4-rtn").any() else "") + ".", ""]
        per_base = []
        for b in sorted(m4["base"].unique()):
            s = m4[m4["base"] == b].sort_values("tokens_per_param")
            if len(s) >= 2:
                per_base.append(f"{b}: {s['kld'].iloc[0]:.4f} at {s['tokens_per_param'].iloc[0]:.0f} -> "
                                f"{s['kld'].iloc[-1]:.4f} at {s['tokens_per_param'].iloc[-1]:.0f} tokens/param "
                                f"({s['kld'].iloc[-1] / s['kld'].iloc[0]:.1f}x)")
        parts += ["- " + p for p in per_base] + [""]
    parts += ["## Ouyang's law fitted here", "",
              "`target = k D^beta / (N^alpha P^gamma)`, least squares in log space over integer formats (int2-8, "
              "mxint2-8; RTN and GPTQ), resolved runs only for delta NLL.", "",
              "| target | runs | models | beta (D) | alpha (N) | gamma (P) | R² | scatter (log sd) |",
              "|---|---|---|---|---|---|---|---|"]
    fits = {}
    for target in ("delta", "kld"):
        for form in ("ouyang", "ratio"):
            f = fit_ouyang(df, target, form)
            fits[target, form] = f
            label = f"{target}, " + ("Ouyang's form" if form == "ouyang" else "tokens/param only (alpha = beta)")
            if "beta" in f:
                parts.append(f"| {label} | {f['n']} | {f['models']} | {f['beta']:.3f} ± {f['beta_se']:.3f} | "
                             f"{f['alpha']:.3f} ± {f['alpha_se']:.3f} | {f['gamma']:.2f} ± {f['gamma_se']:.2f} | "
                             f"{f['r2']:.3f} | {f['resid_sd']:.2f} |")
            else:
                parts.append(f"| {label} | {f['n']} | – | too few runs to fit | | | | |")
    parts.append(f"| published (Pythia, ΔqLoss) | 1,500+ | | {PUBLISHED['beta']} | {PUBLISHED['alpha']} | "
                 f"{PUBLISHED['gamma']} | | |")
    parts.append("")
    f = fits.get(("delta", "ouyang"), {})
    if "beta" in f:
        sign = "grows" if f["beta"] - 2 * f["beta_se"] > 0 else ("shrinks" if f["beta"] + 2 * f["beta_se"] < 0 else
                                                                   "does not change significantly")
        parts += [f"Here delta NLL {sign} with training tokens at fixed size and bits (beta = {f['beta']:.3f} ± "
                  f"{f['beta_se']:.3f}, published {PUBLISHED['beta']}). The size exponent is poorly determined: the "
                  f"long runs cover {df['n_params_nonembed'].nunique()} widths within "
                  f"{df['n_params_nonembed'].max() / df['n_params_nonembed'].min():.1f}x of each other, so alpha is "
                  "not identified apart from beta and must not be extrapolated.", ""]
        if real is not None and len(real):
            rr = real[real["weight_format"].isin(INT_BITS) & real["method"].isin(["rtn", "gptq"])
                      & real["recipe_block_size"].isna()].copy()
            rr["P"] = rr["weight_format"].map(INT_BITS)
            rr["delta"] = rr["nll_quant"] - rr["nll_fp"]
            D, N = rr["tokens_per_param"] * rr["n_params_nonembed"], rr["n_params_nonembed"]
            for form in ("ouyang", "ratio"):
                if "beta" in fits.get(("delta", form), {}):
                    rr[form] = law_predict(fits["delta", form], D, N, rr["P"].astype(float))
            ratio = rr["ratio"] / rr["delta"] if "ratio" in rr else None
            parts += ["**Where the real model falls.** Both laws fitted on the zoo, carried to "
                      f"{rr['model'].iloc[0]} ({rr['tokens_per_param'].iloc[0]:,.0f} tokens per parameter, "
                      f"{rr['n_params_nonembed'].iloc[0] / 1e6:.0f}M non-embedding parameters):", "",
                      "| recipe | measured delta NLL | Ouyang's form | tokens/param only | ratio (tokens/param) |",
                      "|---|---|---|---|---|"]
            for _, r in rr.sort_values(["P", "recipe"]).iterrows():
                parts.append(f"| {r['recipe']} | {r['delta']:.4f} | {r.get('ouyang', float('nan')):.4g} | "
                             f"{r.get('ratio', float('nan')):.4g} | {r.get('ratio', float('nan')) / r['delta']:.3g} |")
            if ratio is not None and len(ratio):
                parts += ["", f"Ouyang's full form, with its ill-determined size exponent, misses the real model by "
                          f"orders of magnitude; the tokens-per-parameter form is off by a median factor "
                          f"{float(np.exp(np.median(np.abs(np.log(ratio.to_numpy(float)))))):.1f} (ratios "
                          f"{ratio.min():.2g}-{ratio.max():.2g}). Extrapolating "
                          f"{rr['tokens_per_param'].iloc[0] / df['tokens_per_param'].max():.0f}x past the zoo's "
                          "largest budget in tokens per parameter, that is the honest range of such a law here; the "
                          "loss-landscape predictors below do not extrapolate in tokens at all."]
            parts.append("")
    parts += list(predictor_note)
    if commands:
        parts += ["", "## Reproduce", "", "```bash", *commands, "```"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts).rstrip() + "\n")
    return out


def tokens_value(runs: pd.DataFrame) -> list[str]:
    """What the training-token count adds to the physics predictor: leave-one-model-out KLD and delta NLL error with
    and without ``log tokens_per_param`` as one more correction (the predictor does not need it)."""
    import warnings

    from quantpredict.predict.physics import PhysicsPredictor
    from quantpredict.predict.targets import folds, target_metrics

    if "tokens_per_param" not in runs or pd.to_numeric(runs["tokens_per_param"], errors="coerce").notna().sum() == 0:
        return ["The runs carry no training-token counts."]
    usable = PhysicsPredictor("physics", extra_columns=("tokens_per_param",)).usable(runs)
    res = {}
    for extra in ((), ("tokens_per_param",)):
        preds = []
        for _, tr, te in folds(usable, "model"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                preds.append(PhysicsPredictor("physics", extra_columns=extra).fit(usable[tr]).predict(usable[te]))
        pred = pd.concat(preds)
        res[bool(extra)] = target_metrics(usable.loc[pred.index], pred)
    lines = []
    for key, label in (("kld_median_rel_err", "KLD median relative error"),
                       ("delta_median_rel_err", "delta NLL median relative error (resolved)")):
        a, b = res[False].get(key), res[True].get(key)
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
            lines.append(f"- {label}, leave one model out ({len(usable)} runs): {100 * a:.1f}% without the "
                         f"training-token count, {100 * b:.1f}% with log(tokens per parameter) as one more correction.")
    return lines
