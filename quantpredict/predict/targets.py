"""Validation of the KLD-first predictors on every target, beside the baselines a practitioner would use.

Splits (every fold fits on the training runs only and predicts the held-out ones):

- ``family``: leave one model family out; ``model``: leave one model out;
- ``largest_size``: fit on every model of the smaller zoo sizes (xs, s, m with their snapshots and long-trained
  checkpoints), predict the l models: the extrapolation a real model asks for, at zoo scale;
- ``real``: fit on the zoo alone, predict each real pre-trained model (:data:`REAL_MODELS`).

Metrics per (kind, split, target): KLD median relative error, mean within-model Spearman, R^2 of log KLD; delta
NLL median relative error on resolved runs (> 2 SE) and R^2; top-1 agreement median absolute error (percentage
points); and the 90% interval coverage of each target with its count. :func:`class_metrics` gives the same per
method class (:mod:`quantpredict.predict.classes`) from the held-out predictions.

Baselines on the same held-out runs: ``const_law`` (KLD = c * 0.5 delta^T H delta, ``c`` the training runs' median
ratio), ``paper`` (the seed study's random forest on size, pre-trained loss, RTN SQNR and format, fitted to log KLD)
and, for delta NLL, the shipped ``gbm`` kind.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from quantpredict.predict.physics import PHYSICS_KINDS, PhysicsPredictor, resolved

SPLITS = ("family", "model", "largest_size", "real")
#: the real pre-trained models (both 4-bit on the way in: their GGUF packages), never in a zoo fold's fit
REAL_MODELS = ("smollm2-135m", "qwen2.5-coder-1.5b")


def model_size(name: str) -> str | None:
    """The zoo size of a model name (``llama-s-d30`` -> ``s``), ``None`` for a real model."""
    m = re.match(r"^[a-z_0-9]+-(xs|s|m|l)(?:-[td]\d+)?$", str(name))
    return m.group(1) if m else None


def folds(runs: pd.DataFrame, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, train mask, test mask)`` for each fold of ``split``."""
    models = runs["model"].astype(str)
    real = models.isin(REAL_MODELS).to_numpy()
    zoo = ~real
    out = []
    if split == "family":
        for fam in sorted(runs.loc[zoo, "family"].astype(str).unique()):
            test = zoo & (runs["family"].astype(str) == fam).to_numpy()
            out.append((fam, zoo & ~test, test))
    elif split == "model":
        for m in sorted(models[zoo].unique()):
            test = (models == m).to_numpy()
            out.append((m, zoo & ~test, test))
    elif split == "largest_size":
        sizes = models.map(model_size)
        test = zoo & (sizes == "l").to_numpy()
        if test.any():
            out.append(("l", zoo & ~test, test))
    elif split == "real":
        for m in sorted(models[real].unique()):
            out.append((m, zoo, (models == m).to_numpy()))
    else:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return [(n, tr, te) for n, tr, te in out if tr.sum() >= 20 and te.any()]


def _spearman_within(models: pd.Series, truth: np.ndarray, pred: np.ndarray) -> float:
    from scipy.stats import spearmanr

    vals = []
    for m in models.unique():
        sel = (models == m).to_numpy()
        if sel.sum() >= 3 and np.ptp(truth[sel]) > 0:
            vals.append(spearmanr(truth[sel], pred[sel]).statistic)
    return float(np.nanmean(vals)) if vals else float("nan")


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    ok = np.isfinite(y) & np.isfinite(yhat)
    if ok.sum() < 3:
        return float("nan")
    y, yhat = y[ok], yhat[ok]
    return float(1 - np.sum((y - yhat) ** 2) / np.sum((y - y.mean()) ** 2))


def target_metrics(runs: pd.DataFrame, pred: pd.DataFrame) -> dict[str, float]:
    """Every target's accuracy and coverage for predictions ``pred`` of ``runs`` (same index)."""
    kld = pd.to_numeric(runs["kld"], errors="coerce").to_numpy(float)
    out: dict[str, float] = {"n_runs": len(runs), "n_models": int(runs["model"].nunique())}
    if "kld" in pred:
        p = pred["kld"].to_numpy(float)
        out["kld_median_rel_err"] = float(np.nanmedian(np.abs(p / kld - 1)))
        out["kld_spearman_within"] = _spearman_within(runs["model"].astype(str), kld, p)
        out["kld_r2_log"] = _r2(np.log(kld), np.log(p))
        if "kld_low" in pred:
            out["kld_coverage"] = float(np.mean((pred["kld_low"] <= kld) & (kld <= pred["kld_high"])))
    delta = (pd.to_numeric(runs["nll_quant"], errors="coerce") - pd.to_numeric(runs["nll_fp"], errors="coerce")
             ).to_numpy(float)
    res = resolved(runs)
    if "delta_nll" in pred:
        d = pred["delta_nll"].to_numpy(float)
        out["delta_n_resolved"] = int(res.sum())
        out["delta_median_rel_err"] = float(np.nanmedian(np.abs(d[res] / delta[res] - 1))) if res.any() else np.nan
        # the runs whose own noise is small beside the target (> 10 SE): where the law, not the measurement, limits
        precise = resolved(runs, 10.0)
        out["delta_n_precise"] = int(precise.sum())
        out["delta_median_rel_err_precise"] = (float(np.nanmedian(np.abs(d[precise] / delta[precise] - 1)))
                                               if precise.any() else np.nan)
        se_all = np.nan_to_num(pd.to_numeric(runs["delta_nll_se"], errors="coerce").to_numpy(float))
        out["delta_noise_floor"] = float(np.nanmedian(0.674 * se_all[res] / delta[res])) if res.any() else np.nan
        out["delta_r2"] = _r2(delta, d)
        out["delta_r2_log_resolved"] = _r2(np.log(delta[res]), np.log(np.maximum(d[res], 1e-12)))
        if "delta_low" in pred:
            # a measured delta carries noise: count a run covered when the interval meets delta +- 2 SE
            se = np.nan_to_num(pd.to_numeric(runs["delta_nll_se"], errors="coerce").to_numpy(float))
            out["delta_coverage"] = float(np.mean((pred["delta_low"] <= delta) & (delta <= pred["delta_high"])))
            out["delta_coverage_noise"] = float(np.mean((pred["delta_low"] <= delta + 2 * se)
                                                        & (delta - 2 * se <= pred["delta_high"])))
    if "top1" in pred:
        t = pd.to_numeric(runs["top1_agree"], errors="coerce").to_numpy(float)
        out["top1_median_abs_err_pp"] = float(100 * np.nanmedian(np.abs(pred["top1"].to_numpy(float) - t)))
        if "top1_low" in pred:
            out["top1_coverage"] = float(np.mean((pred["top1_low"] <= t) & (t <= pred["top1_high"])))
    return out


# ---- the baselines ------------------------------------------------------------------------------------------------


def _const_law(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    q_tr = pd.to_numeric(train["quad_delta_h_delta"], errors="coerce").to_numpy(float)
    ratio = pd.to_numeric(train["kld"], errors="coerce").to_numpy(float) / q_tr
    c = float(np.nanmedian(ratio[np.isfinite(ratio) & (q_tr > 0)]))
    q = pd.to_numeric(test["quad_delta_h_delta"], errors="coerce").to_numpy(float)
    return pd.DataFrame({"kld": c * np.maximum(q, 1e-12)}, index=test.index)


PAPER_FEATURES = ("n_params_nonembed", "fp_calib_nll", "rtn_sqnr_db", "bits_per_element", "element_is_fp")


def _paper(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    from sklearn.ensemble import RandomForestRegressor

    def X(df):
        return df[list(PAPER_FEATURES)].apply(pd.to_numeric, errors="coerce").to_numpy(float)

    y = np.log(np.maximum(pd.to_numeric(train["kld"], errors="coerce").to_numpy(float), 1e-12))
    rf = RandomForestRegressor(n_estimators=200, min_samples_leaf=2, random_state=0).fit(X(train), y)
    return pd.DataFrame({"kld": np.exp(rf.predict(X(test)))}, index=test.index)


def _gbm_delta(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    from quantpredict.predict.predictor import Predictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = Predictor("gbm", features=None).fit(train)
        cols = [c for c in p.required_columns if c in test]
        ok = test[cols].apply(pd.to_numeric, errors="coerce").notna().all(axis=1) if cols else None
        out = pd.DataFrame(index=test.index, columns=["delta_nll", "delta_low", "delta_high"], dtype=float)
        if ok is not None and ok.any():
            out.loc[ok] = p.predict(test[ok])[["delta_nll", "delta_low", "delta_high"]].to_numpy(float)
    return out


BASELINES: dict[str, Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame]] = {
    "const_law": _const_law, "paper": _paper, "gbm": _gbm_delta,
}


def _kind_fn(kind: str) -> Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame]:
    def run(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PhysicsPredictor(kind).fit(train).predict(test)

    return run


def validate_targets(runs: pd.DataFrame, kinds: Sequence[str] = PHYSICS_KINDS + tuple(BASELINES),
                     splits: Sequence[str] = SPLITS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cross-validate ``kinds`` (physics kinds and baselines) on ``splits``.

    Returns ``(metrics, predictions)``: one metrics row per (kind, split) over all held-out runs of the split, and
    every held-out prediction with its kind, split and fold.
    """
    usable = PhysicsPredictor("physics").usable(runs) if "fisher_quad" in runs else runs
    metric_rows, pred_frames = [], []
    for kind in kinds:
        fn = _kind_fn(kind) if kind in PHYSICS_KINDS else BASELINES[kind]
        data = PhysicsPredictor(kind).usable(runs) if kind in PHYSICS_KINDS else usable
        for split in splits:
            preds = []
            for name, tr, te in folds(data, split):
                p = fn(data[tr], data[te]).copy()
                p["fold"] = name
                preds.append(p)
            if not preds:
                continue
            pred = pd.concat(preds)
            held = data.loc[pred.index]
            metric_rows.append({"kind": kind, "split": split, **target_metrics(held, pred)})
            pred_frames.append(pred.assign(kind=kind, split=split, model=held["model"].to_numpy(),
                                           recipe=held["recipe"].to_numpy()))
    return pd.DataFrame(metric_rows), (pd.concat(pred_frames) if pred_frames else pd.DataFrame())


def class_metrics(runs: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """:func:`target_metrics` per (kind, split, method class) of :func:`validate_targets`' ``predictions`` (whose
    index is ``runs``' index): one row per class with held-out runs, classes in :data:`METHOD_CLASSES` order."""
    from quantpredict.predict.classes import METHOD_CLASSES, method_classes

    rows = []
    for (kind, split), pred in predictions.groupby(["kind", "split"], sort=False):
        # the columns this kind never fills (a baseline's intervals) are absent from its own frame, as here
        pred = pred.dropna(axis=1, how="all")
        if "kld" not in pred:
            continue
        held = runs.loc[pred.index]
        classes = method_classes(held)
        for c in METHOD_CLASSES:
            sel = classes == c
            if sel.any():
                rows.append({"kind": kind, "split": split, "method_class": c,
                             **target_metrics(held[sel], pred[sel])})
    return pd.DataFrame(rows)


# ---- the equal-cost subsample ---------------------------------------------------------------------------------------

GROUP_SECONDS = {"physics": ("model_seconds", "format_seconds", "fisher_seconds"),
                 "profile": ("model_seconds", "format_seconds", "profile_seconds")}


def predictor_seconds(runs: pd.DataFrame, kind: str) -> pd.Series:
    """Per run (indexed by run key), the seconds the ``kind`` predictor's features cost: its groups' stored seconds;
    for ``profile`` the model's one profile measurement is shared by its recipes (its seconds are in each run's
    ``profile_seconds`` only when the run measured it itself)."""
    cols = [c for c in GROUP_SECONDS[kind] if c in runs]
    sec = runs[cols].apply(pd.to_numeric, errors="coerce").fillna(0.0).sum(axis=1)
    return pd.Series(sec.to_numpy(float), index=runs["run_key"].to_numpy())


def subsample_comparison(runs: pd.DataFrame, sub: pd.DataFrame, predictions: pd.DataFrame, kind: str,
                         split: str = "family") -> dict[str, float]:
    """The ``kind`` predictor's held-out KLD error against the equal-cost subsample's on the same runs, and the
    subsample curve (error against windows and seconds) to read the crossover from."""
    from quantpredict.predict.subsample import equal_cost, subsample_curve

    p = predictions[(predictions["kind"] == kind) & (predictions["split"] == split)]
    held = runs.loc[p.index]
    keys = held["run_key"].to_numpy()
    secs = predictor_seconds(held, kind)
    eq = equal_cost(sub[sub["run_key"].isin(keys)], secs)
    if eq.empty:
        return {}
    truth = held.set_index("run_key")
    common = eq.index.intersection(truth.index)
    pred_kld = pd.Series(p["kld"].to_numpy(float), index=keys).loc[common]
    t = truth.loc[common, "kld"].to_numpy(float)
    curve = subsample_curve(sub[sub["run_key"].isin(common)], truth.loc[common, ["kld", "top1_agree"]])
    pred_err = float(np.median(np.abs(pred_kld.to_numpy(float) / t - 1)))
    sub_err = float(np.median(np.abs(eq.loc[common, "kld"].to_numpy(float) / t - 1)))
    cross = curve[curve["kld_median_rel_err"] <= pred_err]
    return {"kind": kind, "n_runs": len(common), "predictor_kld_median_rel_err": pred_err,
            "subsample_kld_median_rel_err": sub_err, "median_predictor_seconds": float(secs.loc[common].median()),
            "median_subsample_windows": float(eq.loc[common, "k"].median()),
            "crossover_windows": float(cross["k"].min()) if not cross.empty else float("nan"),
            "crossover_seconds": float(cross["median_seconds"].min()) if not cross.empty else float("nan"),
            "curve": curve.to_dict("records")}
