"""reports/anchor_study.md: do one or two measured "anchor" recipes per model close the profile kind's gap?

    /work/main/.venv/bin/python benchmarks/anchor_study.py [--out reports/anchor_study.md]

Issue #28. The ``profile`` kind prices a recipe from weights alone (``token_gn_quad``, a per-layer quadratic against a
once-per-model profile); the ``physics`` kind reads the recipe's own measured calibration KL (``kl_calib``: a
quantization and 8 calibration forward passes per recipe). The hypothesis: most of the profile kind's error is a
per-model factor (true KL over the summed per-layer quadratic: cross-layer terms, nonlinearity) that measuring
``kl_calib`` of one or two fixed RTN recipes per model ("anchors") would calibrate.

Offline, from the stored runs only (no evaluation). The study set is every done run with ``kl_calib``,
``token_gn_quad`` and the physics kind's features, of a model whose anchor runs are stored; the anchor recipes
themselves (``mxint8-rtn``, ``mxint4-rtn``) are never scored, so every variant is judged on the same runs; each
fold's fits use the training runs with ``kl_calib``. Fits use
``runs.sqlite``, ``long.sqlite`` and ``smollm2.sqlite`` exactly as ``fit --validate`` does
(:func:`quantpredict.predict.targets.folds`: leave one family out; SmolLM2 fitted on the zoo alone);
``alloc.sqlite`` (per-layer allocations) and ``formats.sqlite`` (other formats, named llama.cpp mixes, AWQ) are held
out only, predicted by the fold that leaves their model's family (or real model) out.

Variants (each fold fitted on the training runs, each training run estimated from its own model's anchors):

- ``profile``: today's profile kind; ``physics``: the physics kind on the recipe's own ``kl_calib`` (the reference);
- ``physics(est, A)``: the physics law fitted on measured features, fed ``kl_calib`` and ``fisher_quad`` estimated
  from anchor ``A`` as ``x_A * token_gn_quad / token_gn_quad_A``;
- ``profile+ratio(A)``: the profile law refitted with one more column, ``log(kl_calib_A / token_gn_quad_A)``;
- ``direct(A)``: KLD = ``kl_calib_A * token_gn_quad / token_gn_quad_A`` times the training runs' median
  ``kld / kl_calib`` (no law at all);
- ``profile+offset(A)``: the profile law's prediction shifted by its log residual on the anchor (the anchor's
  ``kl_calib``, mapped to KLD by the same median ratio);
- ``profile(base=anchor-scaled, A)``: the profile law with ``kl_calib_A * token_gn_quad / token_gn_quad_A`` as its
  base quantity (its exponent and corrections refitted);
- two anchors (``8+4``): a per-model power law ``kl_calib = c_m token_gn_quad^b_m`` through ``mxint8-rtn`` and
  ``mxint4-rtn``, used as in ``physics(est)``, ``direct``, the anchor-scaled base, and as an extra column of the
  profile law;
- ``oracle``: the profile prediction times the median measured/predicted KLD of the model's *other* scored runs: an
  upper bound on what any per-model constant could do (it reads their KLD; no interval).

SmolLM2 is scored twice: on its runs with a ``kl_calib`` of their own (every variant), and on every run with the
profile features (the 7 more without ``kl_calib`` are predictable by every variant except ``physics``). The missing
FP calibration entropy of those 7 runs is the model's stored value (it is a property of the model).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import write_between  # noqa: E402 -- benchmarks/ is the script's own folder

from quantpredict.predict.classes import METHOD_CLASSES, method_classes  # noqa: E402

RUNS = ROOT / "data" / "runs"
FIT_STORES = ("runs.sqlite", "long.sqlite", "smollm2.sqlite")
HELD_OUT_STORES = ("alloc.sqlite", "formats.sqlite")
ANCHORS = ("mxint8-rtn", "mxint4-rtn")
ALPHA = 0.1
MODEL_CONSTANTS = ("fp_entropy_calib", "fp_calib_nll")
CLASSES = METHOD_CLASSES  # quantpredict.predict.classes: the predictor's own classes

Variant = Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame]


# ---- the runs ------------------------------------------------------------------------------------------------------


def load(runs_dir: Path = RUNS) -> pd.DataFrame:
    """Every done run of the fit and held-out stores, with ``source`` (``fit`` or ``held_out``) and ``cls``."""
    from quantpredict.runs.table import read_runs

    frames = []
    for names, source in ((FIT_STORES, "fit"), (HELD_OUT_STORES, "held_out")):
        paths = [runs_dir / n for n in names if (runs_dir / n).exists()]
        if paths:
            frames.append(read_runs(paths).assign(source=source))
    runs = pd.concat(frames, ignore_index=True)
    runs = runs[runs["status"].astype(str) == "done"].reset_index(drop=True)
    runs["cls"] = method_classes(runs)
    # the FP model's calibration entropy and NLL are properties of the model, not of the recipe: a run that lacks
    # them (SmolLM2's later RTN runs, extracted without them) takes its model's stored value
    for col in MODEL_CONSTANTS:
        runs[col] = pd.to_numeric(runs[col], errors="coerce").groupby(runs["model"]).transform(
            lambda v: v.fillna(v.median()))
    return runs


def _num(df: pd.DataFrame, col: str) -> np.ndarray:
    return pd.to_numeric(df[col], errors="coerce").to_numpy(float) if col in df else np.full(len(df), np.nan)


def anchor_table(runs: pd.DataFrame, recipe: str) -> pd.DataFrame:
    """Per model, the anchor recipe's measured ``kl_calib``, ``fisher_quad`` and its ``token_gn_quad`` (the first
    stored run of ``recipe`` with all three)."""
    sel = runs[(runs["recipe"].astype(str) == recipe) & (runs["source"] == "fit")]
    ok = np.isfinite(_num(sel, "kl_calib")) & np.isfinite(_num(sel, "token_gn_quad")) & np.isfinite(
        _num(sel, "fisher_quad"))
    sel = sel[ok].drop_duplicates("model")
    return pd.DataFrame({"kl": _num(sel, "kl_calib"), "tgq": _num(sel, "token_gn_quad"),
                         "fq": _num(sel, "fisher_quad")}, index=sel["model"].astype(str).to_numpy())


def with_anchor_estimates(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus each model's anchor columns and the anchor estimates of ``kl_calib`` and ``fisher_quad``:
    ``est_kl_<A>`` (one anchor, exponent 1) and ``est_kl_2a`` (the per-model power law through both anchors)."""
    out = runs.copy()
    models = out["model"].astype(str)
    tgq = _num(out, "token_gn_quad")
    logs = {}
    for a in ANCHORS:
        t = anchor_table(runs, a)
        tag = a.split("-")[0]
        for q in ("kl", "tgq", "fq"):
            out[f"{tag}_{q}"] = models.map(t[q]).to_numpy(float)
        out[f"est_kl_{tag}"] = out[f"{tag}_kl"] * tgq / out[f"{tag}_tgq"]
        out[f"est_fq_{tag}"] = out[f"{tag}_fq"] * tgq / out[f"{tag}_tgq"]
        out[f"ratio_{tag}"] = out[f"{tag}_kl"] / out[f"{tag}_tgq"]
        logs[tag] = {q: np.log(out[f"{tag}_{q}"].to_numpy(float)) for q in ("kl", "tgq", "fq")}
    hi, lo = logs["mxint8"], logs["mxint4"]  # 8-bit: small quadratic; 4-bit: large one
    span = lo["tgq"] - hi["tgq"]
    for q in ("kl", "fq"):
        slope = (lo[q] - hi[q]) / span
        out[f"slope_{q}_2a"] = slope
        out[f"est_{q}_2a"] = np.exp(lo[q] + slope * (np.log(np.maximum(tgq, 1e-30)) - lo["tgq"]))
    return out


def study_set(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with the profile kind's features, measured targets and both anchors of their model; ``has_kl``
    marks those with the physics kind's features too (the recipe's own ``kl_calib`` and ``fisher_quad``): the
    study set proper, on which every variant is fitted and scored."""
    from quantpredict.predict.physics import PhysicsPredictor

    ok = runs.index.isin(PhysicsPredictor("profile").usable(runs).index)
    ok &= np.isfinite(runs[[c for c in runs if c.startswith("est_")]].to_numpy(float)).all(axis=1)
    out = runs[ok].copy()
    out["has_kl"] = out.index.isin(PhysicsPredictor("physics").usable(runs).index)
    return out


# ---- the variants --------------------------------------------------------------------------------------------------


def _quiet_fit(kind: str, train: pd.DataFrame, extra: tuple[str, ...] = ()):
    from quantpredict.predict.physics import PhysicsPredictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PhysicsPredictor(kind, alpha=ALPHA, extra_columns=extra).fit(train)


def _predict(pred, test: pd.DataFrame) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pred.predict(test)[["kld", "kld_low", "kld_high"]]


def kind_variant(kind: str, extra: tuple[str, ...] = ()) -> Variant:
    """A physics kind fitted and applied as it is (``extra``: further log columns of the law)."""
    return lambda train, test: _predict(_quiet_fit(kind, train, extra), test)


def physics_on_estimates(tag: str) -> Variant:
    """The physics law fitted on measured features, fed the anchor estimates of ``kl_calib`` and ``fisher_quad``."""
    def run(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
        fed = test.assign(kl_calib=test[f"est_kl_{tag}"], fisher_quad=test[f"est_fq_{tag}"])
        return _predict(_quiet_fit("physics", train), fed)
    return run


def _interval(train_log_resid: np.ndarray, mid: np.ndarray, index) -> pd.DataFrame:
    from quantpredict.predict.physics import conformal_quantile

    r = np.abs(train_log_resid[np.isfinite(train_log_resid)])
    q = conformal_quantile(r, ALPHA)
    return pd.DataFrame({"kld": mid, "kld_low": mid * np.exp(-q), "kld_high": mid * np.exp(q)}, index=index)


def _kld_per_kl(train: pd.DataFrame) -> float:
    """The training runs' median ``kld / kl_calib`` (test-set KL over calibration-batch KL)."""
    return float(np.nanmedian(_num(train, "kld") / _num(train, "kl_calib")))


def profile_on_estimate(tag: str) -> Variant:
    """The profile law with the anchor-scaled quadratic ``kl_calib_A * token_gn_quad / token_gn_quad_A`` as its base
    (its corrections, GPTQ, element kind, largest layer share, refitted on the training runs' own estimates)."""
    def run(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
        col = f"est_kl_{tag}"
        fitted = _quiet_fit("profile", train.assign(token_gn_quad=train[col]))
        return _predict(fitted, test.assign(token_gn_quad=test[col]))
    return run


def direct(tag: str) -> Variant:
    """KLD = the anchor estimate of ``kl_calib`` times the training median ``kld / kl_calib``; the interval from the
    same construction's residuals on the training runs (each estimated from its own model's anchors)."""
    def run(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
        c = _kld_per_kl(train)
        resid = np.log(_num(train, "kld")) - np.log(c * _num(train, f"est_kl_{tag}"))
        return _interval(resid, c * _num(test, f"est_kl_{tag}"), test.index)
    return run


def profile_offset(tag: str, anchor_rows: pd.DataFrame) -> Variant:
    """The profile law's prediction times a per-model factor read off the anchor ``tag``: the anchor's measured
    ``kl_calib`` (times the training median ``kld / kl_calib``) over the law's prediction for the anchor recipe.
    ``anchor_rows``: the anchor runs (only their features and ``kl_calib`` are read, never their KLD)."""
    recipe = f"{tag}-rtn"
    rows = anchor_rows[anchor_rows["recipe"].astype(str) == recipe].drop_duplicates("model")

    def run(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
        pred = _quiet_fit("profile", train)
        c = _kld_per_kl(train)
        anchors = rows[rows["model"].isin(set(train["model"]) | set(test["model"]))]
        off = pd.Series(np.log(c * _num(anchors, "kl_calib")) - np.log(_predict(pred, anchors)["kld"].to_numpy(float)),
                        index=anchors["model"].astype(str).to_numpy())

        def shifted(df: pd.DataFrame) -> np.ndarray:
            return _predict(pred, df)["kld"].to_numpy(float) * np.exp(df["model"].astype(str).map(off).to_numpy(float))

        return _interval(np.log(_num(train, "kld")) - np.log(shifted(train)), shifted(test), test.index)
    return run


def variants(anchor_rows: pd.DataFrame) -> dict[str, Variant]:
    """The variants by name (``anchor_rows``: the anchor runs, which ``profile+offset`` prices for its factor)."""
    return {
        "profile (today)": kind_variant("profile"),
        "physics (reference: own kl_calib)": kind_variant("physics"),
        "physics(est, mxint4-rtn)": physics_on_estimates("mxint4"),
        "physics(est, mxint8-rtn)": physics_on_estimates("mxint8"),
        "physics(est, 8+4 power law)": physics_on_estimates("2a"),
        "profile+ratio(mxint4-rtn)": kind_variant("profile", ("ratio_mxint4",)),
        "profile+ratio(mxint8-rtn)": kind_variant("profile", ("ratio_mxint8",)),
        "profile+est(8+4 power law)": kind_variant("profile", ("est_kl_2a",)),
        "profile(base=anchor-scaled, mxint8-rtn)": profile_on_estimate("mxint8"),
        "profile(base=anchor-scaled, mxint4-rtn)": profile_on_estimate("mxint4"),
        "profile(base=anchor-scaled, 8+4 power law)": profile_on_estimate("2a"),
        "direct(mxint4-rtn)": direct("mxint4"),
        "direct(mxint8-rtn)": direct("mxint8"),
        "direct(8+4 power law)": direct("2a"),
        "profile+offset(mxint4-rtn)": profile_offset("mxint4", anchor_rows),
        "profile+offset(mxint8-rtn)": profile_offset("mxint8", anchor_rows),
    }


# ---- the evaluation ------------------------------------------------------------------------------------------------


def held_out_predictions(data: pd.DataFrame, named: dict[str, Variant]) -> pd.DataFrame:
    """Every variant's held-out KLD predictions of the non-anchor study runs: leave one family out for the zoo,
    SmolLM2 fitted on the zoo alone; each fold fitted on the fit stores' runs only."""
    from quantpredict.predict.targets import folds

    scored = ~data["recipe"].astype(str).isin(ANCHORS).to_numpy()
    fit = (data["source"] == "fit").to_numpy()
    has_kl = data["has_kl"].to_numpy(bool)
    frames = []
    # "real+": every SmolLM2 run with the profile features, those without a kl_calib of their own included, which
    # every variant that reads no recipe's own measurement can still predict
    for split, folds_of, test_rows in (("family", "family", has_kl), ("real", "real", has_kl),
                                       ("real+", "real", np.ones(len(data), bool))):
        for fold, tr, te in folds(data, folds_of):
            train, test = data[tr & fit & has_kl], data[te & scored & test_rows]
            if test.empty:
                continue
            for name, fn in named.items():
                if split == "real+" and name in OWN_KL:
                    continue
                frames.append(fn(train, test).assign(variant=name, split=split, fold=fold))
    preds = pd.concat(frames)
    return pd.concat([preds, oracle_factor(data, preds)])


#: The variants that read the recipe's own measured kl_calib (not an anchor's).
OWN_KL = ("physics (reference: own kl_calib)",)
ORACLE = "oracle: profile x its model's median factor (from the model's other runs' KLD)"


def oracle_factor(data: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    """An upper bound on any per-model calibration: the profile kind's prediction times the median ratio of
    measured to predicted KLD over the *other* scored runs of the same model and split (reads their KLD)."""
    p = preds[preds["variant"] == "profile (today)"]
    out = []
    for _split, g in p.groupby("split"):
        resid = np.log(_num(data.loc[g.index], "kld")) - np.log(g["kld"].to_numpy(float))
        models = data.loc[g.index, "model"].astype(str).to_numpy()
        off = np.array([np.median(resid[(models == m) & (np.arange(len(g)) != i)]) if (models == m).sum() > 1
                        else 0.0 for i, m in enumerate(models)])
        out.append(pd.DataFrame({"kld": g["kld"].to_numpy(float) * np.exp(off), "variant": ORACLE,
                                 "split": g["split"].to_numpy(), "fold": g["fold"].to_numpy()}, index=g.index))
    return pd.concat(out)


def metrics_table(data: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, split, class): KLD median relative error, within-model Spearman, 90% coverage."""
    from quantpredict.predict.targets import target_metrics

    rows = []
    for (variant, split), p in preds.groupby(["variant", "split"], sort=False):
        held = data.loc[p.index]
        groups = [("all (fit stores)", held["source"] == "fit"),
                  ("weight-only (fit stores)", (held["source"] == "fit") & (held["cls"] != "weight+activation"))]
        groups += [(c, held["cls"] == c) for c in CLASSES]
        for label, sel in groups:
            sel = sel.to_numpy()
            if not sel.any():
                continue
            m = target_metrics(held[sel], p[sel])
            if p.loc[sel, "kld_low"].isna().all():  # a variant without intervals (the oracle)
                m["kld_coverage"] = np.nan
            rows.append({"variant": variant, "split": split, "class": label, "runs": m["n_runs"],
                         "models": m["n_models"], "rel_err": m["kld_median_rel_err"],
                         "spearman": m["kld_spearman_within"], "cover": m.get("kld_coverage", np.nan)})
    return pd.DataFrame(rows)


def _pct(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{100 * x:.1f}%"


def render(table: pd.DataFrame, counts: pd.DataFrame, names: list[str]) -> str:
    lines = ["## Study runs", "",
             "Done runs with `kl_calib`, `token_gn_quad` and the physics kind's features, of models with both anchors "
             "stored; the anchor recipes (mxint8-rtn, mxint4-rtn) are scored by no variant.", "",
             "| store | class | runs | scored (non-anchor) | models |", "|---|---|---|---|---|"]
    lines += [f"| {src} | {cls} | {r['runs']} | {r['scored']} | {r['models']} |" for (src, cls), r in counts.iterrows()]
    lines.append("")
    for split, title in (("family", "Leave one family out (zoo; held-out stores predicted by the same folds)"),
                         ("real", "SmolLM2-135M, fitted on the zoo alone"),
                         ("real+", "SmolLM2-135M, every run with the profile features (those above and 7 without a "
                                   "kl_calib of their own, which the physics kind cannot predict)")):
        t = table[table["split"] == split]
        if t.empty:
            continue
        lines += [f"## {title}", "", "KLD median relative error (runs in brackets):", ""]
        classes = [c for c in ("all (fit stores)", "weight-only (fit stores)") + CLASSES if c in set(t["class"])]
        head = "| variant | " + " | ".join(
            f"{c} ({int(t[t['class'] == c]['runs'].iloc[0])})" for c in classes) + " |"
        lines += [head, "|---" * (len(classes) + 1) + "|"]
        for v in names:
            tv = t[t["variant"] == v].set_index("class")
            if tv.empty:
                continue
            lines.append(f"| {v} | " + " | ".join(_pct(tv.loc[c, "rel_err"]) if c in tv.index else "–"
                                                  for c in classes) + " |")
        lines += ["", "Within-model Spearman / 90% interval coverage:", "",
                  "| variant | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
        for v in names:
            tv = t[t["variant"] == v].set_index("class")
            if tv.empty:
                continue
            lines.append(f"| {v} | " + " | ".join(
                f"{tv.loc[c, 'spearman']:.3f} / {_pct(tv.loc[c, 'cover'])}" if c in tv.index else "–"
                for c in classes) + " |")
        lines.append("")
    return "\n".join(lines)


def diagnostics(data: pd.DataFrame, preds: pd.DataFrame) -> str:
    """How much of the profile kind's leave-one-family-out log error is a per-model constant, and how well one
    anchor's factor agrees with the other's."""
    p = preds[(preds["variant"] == "profile (today)") & (preds["split"] == "family")]
    held = data.loc[p.index]
    w = ((held["source"] == "fit") & (held["cls"] != "weight+activation")).to_numpy()
    resid = pd.Series(np.log(_num(held, "kld")) - np.log(p["kld"].to_numpy(float)), index=p.index)[w]
    models = held.loc[w, "model"].astype(str)
    between = resid.groupby(models).transform("mean")
    share = float(np.mean(between**2) / np.mean(resid**2))
    per_model = data.drop_duplicates("model")
    r8, r4 = np.log(per_model["ratio_mxint8"].to_numpy(float)), np.log(per_model["ratio_mxint4"].to_numpy(float))
    zoo = per_model["source"].eq("fit") & ~per_model["model"].eq("smollm2-135m")
    return "\n".join([
        "## Diagnostics", "",
        f"- The profile kind's leave-one-family-out log residuals on the {int(w.sum())} weight-only fit-store runs: "
        f"RMS {np.sqrt(np.mean(resid**2)):.3f}; the per-model means carry {share:.0%} of the mean square, the "
        f"within-model scatter {1 - share:.0%}.",
        f"- Per-model factor kl_calib / token_gn_quad of the anchors on the {int(zoo.sum())} zoo models: mxint8-rtn "
        f"{np.exp(r8[zoo]).min():.2f}-{np.exp(r8[zoo]).max():.2f}, mxint4-rtn {np.exp(r4[zoo]).min():.2f}-"
        f"{np.exp(r4[zoo]).max():.2f}; correlation of their logs across models "
        f"{np.corrcoef(r8[zoo], r4[zoo])[0, 1]:.2f}."
        + "".join(f" {m}: {np.exp(a):.2f} and {np.exp(b):.2f}." for m, a, b in
                  zip(per_model.loc[~zoo, "model"], r8[~zoo], r4[~zoo])),
        ""])


def run_counts(data: pd.DataFrame) -> pd.DataFrame:
    """Study runs per method class and store kind, with the scored (non-anchor) ones and the models."""
    d = data[data["has_kl"]].assign(scored=~data["recipe"].astype(str).isin(ANCHORS))
    g = d.groupby(["source", "cls"])
    return pd.DataFrame({"runs": g.size(), "scored": g["scored"].sum(),
                         "models": g["model"].nunique()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=RUNS)
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the tables to this markdown file (between its markers, if it has them)")
    args = ap.parse_args(argv)
    data = study_set(with_anchor_estimates(load(args.runs_dir)))
    named = variants(data[data["recipe"].astype(str).isin(ANCHORS) & (data["source"] == "fit")])
    preds = held_out_predictions(data, named)
    text = render(metrics_table(data, preds), run_counts(data), list(named) + [ORACLE])
    text += "\n" + diagnostics(data, preds)
    print(text)
    if args.out:
        write_between(args.out, "anchor_study:tables", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
