"""reports/act_price_study.md: does an activation term in the weights-only price fix the weight+activation class?

    QUANTPREDICT_PROFILES=... /work/main/.venv/bin/python benchmarks/act_price_study.py \
        [--prices /tmp/act_prices.csv] [--out reports/act_price_study.md]

Issue #28. The ``profile`` kind prices a recipe from its weights (``token_gn_quad``); for weight+activation recipes
(``act_format`` set) the stored price is the weight change alone (of the SmoothQuant-smoothed weights), and the law
sees activation quantization only as its 0/1 ``act_quant`` flag. This study prices every done W+A run of
``runs.sqlite`` and ``long.sqlite`` with the activation term of :mod:`quantpredict.features.act_price` (from each zoo
model's cached lean profile, no forward pass per recipe) and refits the profile law with it.

Stage 1 (``prices``): per W+A run, the new price (``act_total``), its weight part (``act_weight``: the smoothed
weight change alone, the same quantity as the stored price up to the SmoothQuant statistics) and activation part
(``act_input``), and ``act_share`` (its largest layer's share). Written to ``--prices`` (reused when present).

Stage 2 (``diagnostics``, ``--check-models``): for a few models, the same price with float32 token inputs (the
profile stores bf16) and with SmoothQuant's max over all 8 profile windows instead of 2: how much the two
departures move it.

Stage 3: leave-one-family-out (:func:`quantpredict.predict.targets.folds`) over the fit stores (``runs``, ``long``,
``smollm2``), :class:`~quantpredict.predict.physics.PhysicsPredictor` kind ``profile`` as it is, with the W+A runs'
``token_gn_quad`` (and ``kfac_max_layer_share``) either as stored (today) or replaced by the new price; weight-only
runs keep their stored values in every variant. Metrics per class by
:func:`quantpredict.predict.targets.target_metrics`.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import write_between  # noqa: E402 -- benchmarks/ is the script's own folder

RUNS = ROOT / "data" / "runs"
FIT_STORES = ("runs.sqlite", "long.sqlite", "smollm2.sqlite")
WA_STORES = ("runs.sqlite", "long.sqlite")
ALPHA = 0.1
MODEL_CONSTANTS = ("fp_entropy_calib", "fp_calib_nll")


# ---- the runs ------------------------------------------------------------------------------------------------------


def is_wa(df: pd.DataFrame) -> np.ndarray:
    act = df["act_format"]
    return act.map(lambda v: v is not None and str(v).lower() not in ("", "none", "nan")).to_numpy(bool)


def load(runs_dir: Path = RUNS) -> pd.DataFrame:
    """Every done run of the fit stores, with ``wa`` (a weight+activation recipe) and ``store``."""
    from quantpredict.runs.table import read_runs

    frames = [read_runs(runs_dir / n).assign(store=n) for n in FIT_STORES if (runs_dir / n).exists()]
    runs = pd.concat(frames, ignore_index=True)
    runs = runs[runs["status"].astype(str) == "done"].reset_index(drop=True)
    runs["wa"] = is_wa(runs)
    for col in MODEL_CONSTANTS:
        runs[col] = pd.to_numeric(runs[col], errors="coerce").groupby(runs["model"]).transform(
            lambda v: v.fillna(v.median()))
    return runs


# ---- stage 1: the prices -------------------------------------------------------------------------------------------


def price_recipe(mp, recipe, token_inputs=None, smoothing_inputs=None) -> dict[str, float]:
    """The new price of one W+A recipe against ``mp`` (a :class:`~quantpredict.predict.rank.ModelProfile`);
    ``token_inputs``: inputs to price instead of the profile's; ``smoothing_inputs``: inputs whose max gives
    SmoothQuant's statistic instead."""
    from quantpredict.features import act_price
    from quantpredict.quantize import layer_plan

    planned = {p.ref.name: (p.weight_format, p.block_size) for p in layer_plan(mp.model, recipe)}
    formats = [planned.get(r.name) for r in mp.refs]
    gptq = {"blocksize": recipe.gptq_blocksize, "percdamp": recipe.percdamp, "act_order": recipe.act_order}
    return act_price.price_act_recipe(mp.model, mp.profile, mp.refs, formats, recipe.method,
                                      act_format=recipe.act_format, act_block=recipe.act_block,
                                      smoothquant_alpha=recipe.smoothquant_alpha, gptq_options=gptq,
                                      token_inputs=token_inputs, smoothing_inputs=smoothing_inputs)


def compute_prices(runs: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Stage 1 for every W+A run of :data:`WA_STORES` (one profile per model, cached), appended to ``out``."""
    from quantpredict.predict.rank import profile_model
    from quantpredict.recipe import Recipe

    done = pd.read_csv(out) if out.exists() else pd.DataFrame(columns=["model", "recipe"])
    have = set(zip(done["model"].astype(str), done["recipe"].astype(str)))
    wa = runs[runs["wa"] & runs["store"].isin(WA_STORES)]
    for model, g in wa.groupby("model"):
        todo = [r for r in g["recipe"].astype(str).unique() if (model, r) not in have]
        if not todo:
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mp = profile_model(str(model), cache=True)
        rows = []
        for label in todo:
            recipe = Recipe.from_label(label)
            t = time.perf_counter()
            p = price_recipe(mp, recipe)
            rows.append({"model": model, "recipe": label, "act_total": p["token_gn_quad"],
                         "act_weight": p["act_weight_quad"], "act_input": p["act_input_quad"],
                         "act_share": p["kfac_max_layer_share"], "price_seconds": time.perf_counter() - t})
        frame = pd.DataFrame(rows)
        frame.to_csv(out, mode="a", header=not out.exists(), index=False)
        print(f"{model}: {len(rows)} recipes priced in {time.perf_counter() - t0:.1f} s", flush=True)
        del mp
    return pd.read_csv(out)


# ---- stage 2: the departures --------------------------------------------------------------------------------------


def fp32_inputs(mp, n_windows: int = 8) -> tuple[dict, dict]:
    """``({name: x [2 * 256, in] float32}, {name: x [8 * 256, in] float32})``: every layer's FP inputs on the
    profile's first 2 windows (what the profile stores, before its bf16 rounding) and on all 8 of its windows."""
    import torch

    from quantpredict import data
    from quantpredict.features.extract import feature_windows
    from quantpredict.predict.rank import TOKEN_WINDOWS

    windows = feature_windows(mp.model, data.token_stream(mp.tokenizer, "wikitext2", "train"), n_windows, 256, 0)
    parts: dict[str, list] = {r.name: [] for r in mp.refs}
    hooks = [r.module.register_forward_hook(
        lambda m, a, o, n=r.name: parts[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).float()))
        for r in mp.refs]
    try:
        with torch.no_grad():
            for i in range(windows.shape[0]):
                mp.model(input_ids=windows[i: i + 1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return ({n: torch.cat(v[:TOKEN_WINDOWS]) for n, v in parts.items()}, {n: torch.cat(v) for n, v in parts.items()})


def departures(runs: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """Per W+A run of ``models``: the price as in stage 1, with float32 inputs, and with SmoothQuant's max over all 8
    profile windows (float32), and how far the profile's bf16 inputs are from the float32 ones."""

    from quantpredict.predict.rank import profile_model
    from quantpredict.recipe import Recipe

    rows = []
    for model in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mp = profile_model(model, cache=True)
        x2, x8 = fp32_inputs(mp)
        gap = max(float((mp.profile.token_inputs[n].float() - x2[n]).abs().max() / x2[n].abs().max()) for n in x2)
        for label in runs.loc[(runs["model"] == model) & runs["wa"], "recipe"].astype(str).unique():
            recipe = Recipe.from_label(label)
            base = price_recipe(mp, recipe)["token_gn_quad"]
            f32 = price_recipe(mp, recipe, token_inputs=x2)["token_gn_quad"]
            row = {"model": model, "recipe": label, "bf16_vs_fp32_max_rel_gap": gap, "price": base,
                   "fp32_inputs / bf16": f32 / base}
            if recipe.smoothquant_alpha is not None:
                # the statistic from 8 float32 windows, the price on the profile's inputs
                row["max over 8 windows / 2"] = price_recipe(mp, recipe, smoothing_inputs=x8)["token_gn_quad"] / base
            rows.append(row)
        del mp, x2, x8
    return pd.DataFrame(rows)


# ---- stage 3: the refit --------------------------------------------------------------------------------------------


def with_prices(runs: pd.DataFrame, prices: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with the stage-1 columns joined on (model, recipe) for W+A runs (NaN elsewhere)."""
    p = prices.drop_duplicates(["model", "recipe"]).set_index(["model", "recipe"])
    key = pd.MultiIndex.from_arrays([runs["model"].astype(str), runs["recipe"].astype(str)])
    out = runs.copy()
    for col in ("act_total", "act_weight", "act_input", "act_share"):
        out[col] = p[col].reindex(key).to_numpy(float)
        out.loc[~out["wa"], col] = np.nan
    return out


def _replace(df: pd.DataFrame, price: str | None, share: bool, flag: bool) -> pd.DataFrame:
    """The design input of one variant: W+A runs' ``token_gn_quad`` from column ``price`` (``None``: as stored),
    their ``kfac_max_layer_share`` from ``act_share`` (``share``), and the act flag kept or dropped (``flag``)."""
    out = df.copy()
    wa = out["wa"].to_numpy(bool)
    if price is not None:
        out.loc[wa, "token_gn_quad"] = out.loc[wa, price]
    if share:
        out.loc[wa, "kfac_max_layer_share"] = out.loc[wa, "act_share"]
    if not flag:
        out["act_format"] = None
    return out


VARIANTS = {
    "profile (today: stored weight-only price + act flag)": (None, False, True),
    "profile, W+A price = recomputed weight part + act flag": ("act_weight", True, True),
    "profile, W+A price = weight + activation term + act flag": ("act_total", True, True),
    "profile, W+A price = weight + activation term, no act flag": ("act_total", True, False),
}


def held_out(data: pd.DataFrame) -> pd.DataFrame:
    """Every variant's leave-one-family-out KLD predictions (zoo runs; SmolLM2 in every training set's complement
    is not predicted here: it has no W+A run)."""
    from quantpredict.predict.physics import PhysicsPredictor
    from quantpredict.predict.targets import folds

    frames = []
    for name, (price, share, flag) in VARIANTS.items():
        d = _replace(data, price, share, flag)
        for fold, tr, te in folds(d, "family"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pred = PhysicsPredictor("profile", alpha=ALPHA).fit(d[tr])
                out = pred.predict(d[te])[["kld", "kld_low", "kld_high"]]
            frames.append(out.assign(variant=name, fold=fold))
    return pd.concat(frames)


def classes(held: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    wa = held["wa"].to_numpy(bool)
    alpha = pd.to_numeric(held["smoothquant_alpha"], errors="coerce")
    w8 = held["weight_format"].astype(str).eq("mxint8").to_numpy()
    return [("W+A (all)", wa), ("W+A, no SmoothQuant", wa & alpha.isna().to_numpy()),
            ("W+A, SQ 0.5", wa & alpha.eq(0.5).to_numpy()), ("W+A, SQ 0.75", wa & alpha.eq(0.75).to_numpy()),
            ("W+A, mxint8 weights", wa & w8), ("W+A, 4-bit weights", wa & ~w8), ("weight-only", ~wa)]


def metrics(data: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    from quantpredict.predict.targets import target_metrics

    rows = []
    for variant, p in preds.groupby("variant", sort=False):
        held = data.loc[p.index]
        for label, sel in classes(held):
            if sel.any():
                m = target_metrics(held[sel], p[sel])
                rows.append({"variant": variant, "class": label, "runs": m["n_runs"], "models": m["n_models"],
                             "rel_err": m["kld_median_rel_err"], "spearman": m["kld_spearman_within"],
                             "cover": m["kld_coverage"]})
    return pd.DataFrame(rows)


def _pct(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{100 * x:.1f}%"


def render(data: pd.DataFrame, table: pd.DataFrame, dep: pd.DataFrame | None) -> str:
    wa = data[data["wa"]]
    sq = wa["smoothquant_alpha"].fillna(0).map(lambda a: "no SQ" if a == 0 else f"SQ {a:g}")
    lines = ["## Runs", "",
             f"Fit stores ({', '.join(FIT_STORES)}), done runs with the profile kind's features: "
             f"{int((~data['wa']).sum())} weight-only runs of {data.loc[~data['wa'], 'model'].nunique()} models, "
             f"{len(wa)} W+A runs of {wa['model'].nunique()} models "
             f"({', '.join(f'{k}: {v}' for k, v in wa.groupby(sq).size().items())}); "
             f"{int(wa['act_total'].notna().sum())} W+A runs priced with the activation term.", "",
             "## Leave one family out: KLD median relative error / within-model Spearman / 90% coverage", ""]
    labels = [c for c, _ in classes(data)]
    lines += ["| variant | " + " | ".join(f"{c} ({int(table[table['class'] == c]['runs'].iloc[0])})"
                                          for c in labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for v in VARIANTS:
        t = table[table["variant"] == v].set_index("class")
        lines.append(f"| {v} | " + " | ".join(
            f"{_pct(t.loc[c, 'rel_err'])} / {t.loc[c, 'spearman']:.2f} / {_pct(t.loc[c, 'cover'])}"
            if c in t.index else "–" for c in labels) + " |")
    lines += ["", "## The raw ratio measured KLD / price (no law)", "",
              "| runs | price | median | 10% | 90% |", "|---|---|---|---|---|"]
    for label, sel, col in (("weight-only", ~data["wa"], "token_gn_quad"), ("W+A", data["wa"], "token_gn_quad"),
                            ("W+A", data["wa"], "act_total"), ("W+A, no SQ", data["wa"] & data["smoothquant_alpha"]
                                                               .isna(), "act_total"),
                            ("W+A, mxint8 weights", data["wa"] & data["weight_format"].eq("mxint8"), "token_gn_quad"),
                            ("W+A, mxint8 weights", data["wa"] & data["weight_format"].eq("mxint8"), "act_total")):
        r = (pd.to_numeric(data.loc[sel, "kld"]) / pd.to_numeric(data.loc[sel, col])).dropna()
        name = {"token_gn_quad": "stored token_gn_quad", "act_total": "with the activation term"}[col]
        lines.append(f"| {label} ({len(r)}) | {name} | {r.median():.2f} | {r.quantile(.1):.2f} | "
                     f"{r.quantile(.9):.2f} |")
    share = (data.loc[data["wa"], "act_input"] / data.loc[data["wa"], "act_total"]).dropna()
    lines += ["", f"Activation part's share of the new W+A price (act_input / total, cross term aside): median "
              f"{share.median():.2f}, range {share.min():.2f}-{share.max():.2f}.", ""]
    w = data[data["wa"]]
    agree = (w["act_weight"] / pd.to_numeric(w["token_gn_quad"])).dropna()
    lines += [f"Recomputed weight part / stored W+A token_gn_quad: median {agree.median():.3f}, range "
              f"{agree.min():.3f}-{agree.max():.3f} (SmoothQuant statistics from 2 profile windows here, from the "
              "extraction's calibration forward there).", ""]
    if dep is not None and not dep.empty:
        cols = list(dep.columns)
        lines += ["## The departures (price ratios)", "", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
        lines += ["| " + " | ".join(v if isinstance(v, str) else f"{v:.3g}" for v in row) + " |"
                  for row in dep.itertuples(index=False)]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=RUNS)
    ap.add_argument("--prices", type=Path, default=Path("/tmp/act_prices.csv"))
    ap.add_argument("--check-models", default="llama-m,gpt2-xs-d30,opt-l,gpt_neox-m",
                    help="models for the departures check ('' to skip)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--prices-only", action="store_true")
    args = ap.parse_args(argv)
    from quantpredict.predict.physics import PhysicsPredictor

    runs = load(args.runs_dir)
    prices = compute_prices(runs, args.prices)
    if args.prices_only:
        return 0
    data = with_prices(runs, prices)
    data = data[data.index.isin(PhysicsPredictor("profile").usable(data).index)]
    data = data[~data["wa"] | data["act_total"].notna()]
    dep = None
    if args.check_models:
        cached = args.prices.with_name(args.prices.stem + "_departures.csv")
        dep = pd.read_csv(cached) if cached.exists() else departures(data, args.check_models.split(","))
        dep.to_csv(cached, index=False)
    text = render(data, metrics(data, held_out(data)), dep)
    print(text)
    if args.out:
        write_between(args.out, "act_price_study:tables", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
