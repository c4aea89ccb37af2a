"""Permutation importance of a predictor's features on held-out groups (leave-one-family-out by default).

Model-agnostic (it works through :meth:`Predictor.predict`, so OLS and the forests are scored the same way):
for each held-out group, a predictor is fitted on the other groups; each of its features is then shuffled within the
held-out runs (seeded) and the increase of the error is recorded. The error is the mean absolute difference of
``asinh(delta / s)`` between prediction and measurement, ``s`` the runs' median ``delta_nll_se``: relative for large
degradations, absolute near the noise floor, the space the predictors are judged in.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from quantpredict.errors import PredictorError


def _error(pred: np.ndarray, meas: np.ndarray, scale: float) -> float:
    ok = np.isfinite(pred) & np.isfinite(meas)
    return float(np.mean(np.abs(np.arcsinh(pred[ok] / scale) - np.arcsinh(meas[ok] / scale)))) if ok.any() \
        else float("nan")


def permutation_importance(runs: pd.DataFrame, kind: str, *, groups: str = "family", n_repeats: int = 3,
                           random_state: int = 0, predictor_params: Mapping | None = None) -> pd.DataFrame:
    """Held-out permutation importance of each feature of a ``kind`` predictor.

    ``runs``: a run table (done rows are used); ``groups``: ``"family"`` or ``"model"`` (leave-one-out folds);
    ``n_repeats``: shuffles per feature and fold; ``predictor_params``: keyword arguments of :class:`Predictor`
    (e.g. ``{"n_estimators": 50}``). Returns one row per feature, most important first: ``feature``,
    ``importance`` (mean increase of the error over folds and repeats), ``std``, ``n`` (folds x repeats) and the
    unshuffled ``baseline_error``. Folds whose predictor cannot be fitted or applied are skipped; if none is left,
    :class:`PredictorError`.
    """
    from quantpredict.predict import Predictor
    from quantpredict.predict.design import delta_scale_from, done_runs, measured_delta
    from quantpredict.predict.validate import group_splits

    done = done_runs(runs)
    scale = delta_scale_from(done)
    rng = np.random.default_rng(random_state)
    scores: dict[str, list[float]] = {}
    baselines = []
    for _, tr, te in group_splits(done, groups):
        train, test = done.loc[tr], done.loc[te]
        if train.empty or test.empty:
            continue
        try:
            pred = Predictor(kind, random_state, **dict(predictor_params or {})).fit(train)
            meas = measured_delta(test)
            base = _error(pred.predict(test)["delta_nll"].to_numpy(float), meas, scale)
        except PredictorError:
            continue
        baselines.append(base)
        # every shuffled copy of the held-out runs in one frame, predicted in one call (the design matrix is built
        # once rather than once per feature and repeat)
        copies, keys = [], []
        for feat in pred.features:
            for _ in range(n_repeats):
                shuffled = test.copy()
                shuffled[feat] = rng.permutation(shuffled[feat].to_numpy())
                copies.append(shuffled)
                keys.append(feat)
        stacked = pred.predict(pd.concat(copies, ignore_index=True))["delta_nll"].to_numpy(float)
        n = len(test)
        for i, feat in enumerate(keys):
            err = _error(stacked[i * n:(i + 1) * n], meas, scale)
            scores.setdefault(feat, []).append(err - base)
    if not scores:
        raise PredictorError(f"no leave-one-{groups}-out fold of the {kind!r} predictor could be fitted and "
                             "applied; the report needs runs from at least two groups with that kind's features")
    rows = [{"feature": f, "importance": float(np.mean(v)), "std": float(np.std(v)), "n": len(v),
             "baseline_error": float(np.mean(baselines))} for f, v in scores.items()]
    return pd.DataFrame(rows).sort_values("importance", ascending=False, kind="mergesort").reset_index(drop=True)
