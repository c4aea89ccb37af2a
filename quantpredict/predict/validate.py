"""Validation of the delta-only kinds (:class:`~quantpredict.predict.predictor.Predictor`): leave-one-model-out /
leave-one-family-out cross-validation, the metrics on delta, and the practitioner's baseline of evaluating only a
prefix of the test windows. The KLD-first kinds are validated by :mod:`quantpredict.predict.targets`.

Predictors are judged on the degradation delta = NLL_quant - NLL_fp, not on perplexity (a predictor of "no change"
looks accurate on perplexity for models that barely notice 4-bit weights).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from quantpredict.errors import PredictorError
from quantpredict.predict.design import KINDS, done_runs, measured_delta
from quantpredict.predict.predictor import Predictor

GROUPINGS = ("model", "family")


@dataclass(frozen=True)
class Validation:
    """``metrics``: one row per (groups, kind); ``predictions``: one row per held-out run per (groups, kind)."""

    metrics: pd.DataFrame
    predictions: pd.DataFrame

    def __iter__(self):  # metrics, predictions = validate(...)
        return iter((self.metrics, self.predictions))


def group_splits(runs: pd.DataFrame, groups: str = "model") -> Iterator[tuple[str, pd.Index, pd.Index]]:
    """Leave-one-group-out splits: ``(held_out, train_index, test_index)`` for each value of ``runs[groups]``."""
    if groups not in GROUPINGS:
        raise PredictorError(f"groups must be one of {list(GROUPINGS)}, got {groups!r}")
    if groups not in runs:
        raise PredictorError(f"the runs lack the column {groups!r} needed for leave-one-{groups}-out validation")
    key = runs[groups].astype(str)
    for g in sorted(key.unique()):
        test = key == g
        yield g, runs.index[~test], runs.index[test]


def validate(runs_df: pd.DataFrame, kinds: Sequence[str] = KINDS, groups: str | Sequence[str] = GROUPINGS, *,
             alpha: float = 0.1, random_state: int = 0, predictor_params: Mapping[str, Mapping] | None = None,
             progress: bool = False) -> Validation:
    """Leave-one-group-out CV of each kind, for each grouping in ``groups`` ("model", "family" or both).

    Every fold fits a fresh ``Predictor(kind, random_state, alpha=alpha, **predictor_params[kind])`` on the other
    groups' done runs and predicts the held-out group (with its measured ``ppl_fp``, and again with ``ppl_fp``
    predicted from ``fp_calib_nll``). A fold that cannot be predicted (e.g. a recipe level never seen in training)
    is recorded with NaN predictions and its error text. Returns :class:`Validation`.
    """
    runs = done_runs(runs_df)
    if runs.empty:
        raise PredictorError("no finished runs to validate on; collect runs first with `quantpredict collect`")
    groupings = (groups,) if isinstance(groups, str) else tuple(groups)
    for k in kinds:
        if k not in KINDS:
            raise PredictorError(f"unknown predictor kind {k!r}; choose from {list(KINDS)}")
    params = {k: dict((predictor_params or {}).get(k, {})) for k in kinds}
    delta = pd.Series(measured_delta(runs), index=runs.index)
    jobs = [(gr, k, split) for gr in groupings for k in kinds for split in group_splits(runs, gr)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="validate", unit="fold")
    parts, feature_groups_of = [], {}
    for gr, kind, (held, tr, te) in jobs:
        test = runs.loc[te]
        base = pd.DataFrame({"groups": gr, "kind": kind, "held_out": held,
                             "model": test.get("model"), "family": test.get("family"), "recipe": test.get("recipe"),
                             "delta": delta.loc[te], "delta_nll_se": test.get("delta_nll_se"),
                             "ppl_quant": test.get("ppl_quant")}, index=te)
        try:
            train = runs.loc[tr]
            assert not set(train[gr].astype(str)) & {held}, "leak: held-out group in the training runs"
            p = Predictor(kind, random_state, alpha=alpha, **params[kind]).fit(train)
            feature_groups_of[kind] = p.required_groups
            pred = p.predict(test)
            pred_fp = p.predict(test.drop(columns=["ppl_fp"], errors="ignore"))
            base = base.join(pred.drop(columns=["ppl_fp_source"]))
            base["ppl_fp_predicted"] = pred_fp["ppl"]
            base["error"] = ""
        except PredictorError as exc:
            for c in ("delta_nll", "delta_low", "delta_high", "ppl", "ppl_low", "ppl_high", "ppl_fp",
                      "ppl_fp_predicted"):
                base[c] = np.nan
            base["error"] = str(exc)
        parts.append(base)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    predictions = pd.concat(parts)
    rows = []
    for (gr, kind), sub in predictions.groupby(["groups", "kind"], sort=False):
        m = delta_metrics(sub)
        m["feature_seconds"] = feature_seconds(runs, feature_groups_of.get(kind, ()))
        rows.append({"groups": gr, "kind": kind, "n_folds": int(sub["held_out"].nunique()),
                     "n_failed_runs": int((sub["error"] != "").sum()), **m})
    return Validation(pd.DataFrame(rows), predictions)


def delta_metrics(pred: pd.DataFrame) -> dict[str, float]:
    """Metrics of predicted vs measured delta over the rows of ``pred`` (rows with NaN predictions are skipped).

    Needs columns ``delta`` (measured), ``delta_nll``, ``delta_low``, ``delta_high``; uses ``model`` for the
    within-model ranking, ``ppl``/``ppl_quant`` (and ``ppl_fp_predicted``) for perplexity errors and
    ``delta_nll_se`` for the resolved subset (|delta| > 2 se). Returns: n_runs, r2, median_rel_error,
    median_rel_error_resolved, spearman_within_model (mean over models with >= 3 runs), coverage,
    median_rel_ppl_error, median_rel_ppl_error_fp_predicted.
    """
    from scipy.stats import spearmanr

    p = pred[np.isfinite(pred["delta_nll"].to_numpy(float))]
    d, dh = p["delta"].to_numpy(float), p["delta_nll"].to_numpy(float)
    out: dict[str, float] = {"n_runs": int(len(p))}
    if len(p) == 0:
        return {**out, **dict.fromkeys(("r2", "median_rel_error", "median_rel_error_resolved",
                                        "spearman_within_model", "coverage", "median_rel_ppl_error",
                                        "median_rel_ppl_error_fp_predicted"), float("nan"))}
    ss_tot = float(np.sum((d - d.mean()) ** 2))
    out["r2"] = 1 - float(np.sum((dh - d) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    nz = d != 0
    rel = np.abs(dh[nz] - d[nz]) / np.abs(d[nz])
    out["median_rel_error"] = float(np.median(rel)) if rel.size else float("nan")
    if "delta_nll_se" in p and p["delta_nll_se"].notna().any():
        se = p["delta_nll_se"].to_numpy(float)
        res = np.abs(d) > 2 * np.nan_to_num(se, nan=0.0)
        out["median_rel_error_resolved"] = (float(np.median(np.abs(dh[res] - d[res]) / np.abs(d[res])))
                                            if res.any() else float("nan"))
    else:
        out["median_rel_error_resolved"] = out["median_rel_error"]
    rhos = []
    if "model" in p:
        for _, g in p.groupby(p["model"].astype(str)):
            if len(g) >= 3 and g["delta"].nunique() > 1 and g["delta_nll"].nunique() > 1:
                rhos.append(spearmanr(g["delta_nll"], g["delta"]).statistic)
    out["spearman_within_model"] = float(np.mean(rhos)) if rhos else float("nan")
    lo, hi = p["delta_low"].to_numpy(float), p["delta_high"].to_numpy(float)
    out["coverage"] = float(np.mean((lo <= d) & (d <= hi)))
    for col, name in (("ppl", "median_rel_ppl_error"), ("ppl_fp_predicted", "median_rel_ppl_error_fp_predicted")):
        if col in p and "ppl_quant" in p:
            e = np.abs(p[col].to_numpy(float) - p["ppl_quant"].to_numpy(float)) / p["ppl_quant"].to_numpy(float)
            e = e[np.isfinite(e)]
            out[name] = float(np.median(e)) if e.size else float("nan")
        else:
            out[name] = float("nan")
    return out


def feature_seconds(runs: pd.DataFrame, groups: Sequence[str]) -> float:
    """Median over runs of the summed ``<group>_seconds`` for ``groups`` (NaN when the runs carry no timings)."""
    cols = [f"{g}_seconds" for g in groups if f"{g}_seconds" in runs]
    if not cols:
        return float("nan") if groups else 0.0
    total = runs[cols].apply(pd.to_numeric, errors="coerce").sum(axis=1, min_count=1).to_numpy(float)
    total = total[np.isfinite(total)]
    return float(np.median(total)) if total.size else float("nan")


# ---- the subsample baseline ---------------------------------------------------------------------------------------
def subsample_curve(window_deltas: Sequence[np.ndarray], window_seconds: float | Sequence[float],
                    ks: Sequence[int] | None = None, base_seconds: float | Sequence[float] = 0.0) -> pd.DataFrame:
    """Error of estimating each run's delta from a prefix of its first ``k`` test windows, against seconds.

    ``window_deltas``: per run, a 1-D array [n_windows] of per-window delta NLL (mean over the window's tokens of
    NLL_quant - NLL_fp; equal-length windows, so the run's measured delta is their mean). ``window_seconds``: the
    seconds one window of the subsample evaluation costs (FP and quantized forwards, as the caller measured it),
    one number or one per run. ``ks``: prefix lengths (default: powers of two up to the shortest run, and its length).
    ``base_seconds``: a fixed cost paid before the first window (e.g. quantizing the model), one number or per run.
    Returns one row per k: ``k``, ``seconds`` (median over runs), ``median_rel_error`` (median over runs of
    |prefix mean - delta| / |delta|), ``median_abs_error`` (nats), ``n_runs``.
    """
    arrays = [np.asarray(w, float).ravel() for w in window_deltas]
    if not arrays or any(a.size == 0 for a in arrays):
        raise PredictorError("subsample_curve needs at least one run with at least one window delta")
    secs = np.broadcast_to(np.asarray(window_seconds, float), (len(arrays),))
    base = np.broadcast_to(np.asarray(base_seconds, float), (len(arrays),))
    n_min = min(a.size for a in arrays)
    if ks is None:
        ks = sorted({*(2**i for i in range(int(np.log2(n_min)) + 1)), n_min})
    rows = []
    for k in ks:
        if not 1 <= k <= n_min:
            raise PredictorError(f"prefix length {k} outside 1..{n_min} (the shortest run's window count)")
        est = np.array([a[:k].mean() for a in arrays])
        full = np.array([a.mean() for a in arrays])
        abs_err = np.abs(est - full)
        nz = full != 0
        rows.append({"k": int(k), "seconds": float(np.median(base + k * secs)),
                     "median_rel_error": float(np.median(abs_err[nz] / np.abs(full[nz]))) if nz.any() else np.nan,
                     "median_abs_error": float(np.median(abs_err)), "n_runs": len(arrays)})
    return pd.DataFrame(rows)


def store_subsample_curve(runs: pd.DataFrame, ks: Sequence[int] | None = None) -> pd.DataFrame | None:
    """:func:`subsample_curve` from a run store's exported runs, or None if no run carries per-window deltas.

    Uses the done runs with a ``window_delta_nll`` column (JSON text or a list: each test window's delta NLL, in
    window order, as :class:`~quantpredict.evaluate.Comparison` records it). A window costs the run's
    ``eval_seconds / eval_windows`` (FP and quantized forward passes), and every prefix first pays the run's
    ``run_quantize_seconds``: a subsample can only be evaluated on a quantized model. ``curve.attrs["runs"]``
    lists the (model, recipe) pairs used.
    """
    import json

    if "window_delta_nll" not in runs:
        return None
    deltas, secs, base, used = [], [], [], []
    for _, r in runs.iterrows():
        raw = r.get("window_delta_nll")
        if r.get("status", "done") != "done" or raw is None or (isinstance(raw, float) and not np.isfinite(raw)):
            continue
        w = np.asarray(json.loads(raw) if isinstance(raw, str) else raw, float)
        n, eval_s = r.get("eval_windows"), r.get("eval_seconds")
        if w.size == 0 or not n or not eval_s or not np.isfinite(float(eval_s)):
            continue
        deltas.append(w)
        secs.append(float(eval_s) / float(n))
        q = r.get("run_quantize_seconds")
        base.append(float(q) if q is not None and np.isfinite(float(q)) else 0.0)
        used.append((str(r.get("model")), str(r.get("recipe"))))
    if not deltas:
        return None
    curve = subsample_curve(deltas, secs, ks, base_seconds=base)
    curve.attrs["runs"] = used  # (model, recipe) of each run behind the curve: compare predictors on the same runs
    return curve


def crossover(curve: pd.DataFrame, predictor_error: float, predictor_seconds: float) -> dict[str, float | bool]:
    """Compare a predictor (median relative delta error, seconds per prediction) with a subsample curve.

    Returns ``subsample_error_at_equal_cost`` (the curve interpolated in log-seconds at ``predictor_seconds``;
    its first point's error if the predictor is cheaper than one window), ``crossover_seconds`` (the fewest
    seconds at which the subsample's error is at most the predictor's, linear interpolation in log-seconds; NaN if
    never within the curve) and ``predictor_better_at_equal_cost``.
    """
    c = curve.sort_values("seconds")
    s, e = np.log(c["seconds"].to_numpy(float)), c["median_rel_error"].to_numpy(float)
    at = float(np.interp(np.log(max(predictor_seconds, 1e-300)), s, e))
    cross = float("nan")
    below = np.nonzero(e <= predictor_error)[0]
    if below.size:
        i = below[0]
        if i == 0:
            cross = float(np.exp(s[0]))
        else:
            f = (e[i - 1] - predictor_error) / (e[i - 1] - e[i])
            cross = float(np.exp(s[i - 1] + f * (s[i] - s[i - 1])))
    return {"subsample_error_at_equal_cost": at, "crossover_seconds": cross,
            "predictor_better_at_equal_cost": bool(predictor_error < at)}
