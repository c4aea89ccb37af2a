"""``Predictor``: the delta-only kinds (``ols``, ``rf``, ``gbm``, ``bits``, ``paper``): fit on runs, predict delta NLL
and perplexity with a 90% interval. Saving and loading (JSON, plus an allow-listed skops file for the trees; no
pickle) are :class:`~quantpredict.predict.saved.SavedPredictor`'s."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from quantpredict.errors import PredictorError
from quantpredict.predict.design import (
    KINDS,
    LINEAR_KINDS,
    Design,
    done_runs,
    feature_groups,
    from_target,
    measured_delta,
    to_target,
)
from quantpredict.predict.engines import OLSEngine, TreeEngine
from quantpredict.predict.saved import FPModel, SavedPredictor, eval_seconds_by_model

TARGETS = ("log", "asinh")
OUTPUT_COLUMNS = ("delta_nll", "delta_low", "delta_high", "ppl", "ppl_low", "ppl_high", "ppl_fp", "ppl_fp_source")


class Predictor(SavedPredictor, kinds=KINDS):
    """Predicts delta = NLL_quant - NLL_fp on WikiText-2 test, and the quantized perplexity ppl_fp * exp(delta).

    ``kind``: ``"ols"`` (scaling law on log features, statsmodels intervals), ``"rf"``, ``"gbm"`` (scikit-learn,
    cross-conformal intervals), baselines ``"bits"`` (bits per element only) and ``"paper"`` (the seed study's random
    forest on parameter count, pre-trained loss, RTN SQNR and format). ``features`` overrides the kind's default
    feature set (schema names); ``alpha`` = 0.1 gives 90% intervals; ``estimator_params`` go to the scikit-learn
    estimator (e.g. ``n_estimators``).
    """

    def __init__(self, kind: str = "ols", random_state: int = 0, *, features: Sequence[str] | None = None,
                 alpha: float = 0.1, conformal_folds: int = 5, target: str | None = None,
                 min_resolved: float = 2.0, **estimator_params):
        if kind not in KINDS:
            raise PredictorError(f"unknown predictor kind {kind!r}; choose one of {list(KINDS)}")
        if not 0 < alpha < 1:
            raise PredictorError(f"alpha must be in (0, 1), got {alpha}")
        if kind in LINEAR_KINDS and estimator_params:
            raise PredictorError(f"the {kind!r} predictor takes no estimator parameters, got "
                                 f"{sorted(estimator_params)}")
        target = target or ("log" if kind in LINEAR_KINDS else "asinh")
        if target not in TARGETS:
            raise PredictorError(f"unknown target transform {target!r}; choose one of {list(TARGETS)}")
        if target == "log" and kind not in LINEAR_KINDS:
            raise PredictorError(f"target='log' is for the linear kinds {list(LINEAR_KINDS)}, not {kind!r}")
        self.target, self.min_resolved = target, float(min_resolved)
        self.kind, self.random_state, self.alpha = kind, int(random_state), float(alpha)
        self.requested_features = None if features is None else tuple(features)
        self.conformal_folds = int(conformal_folds)
        self.estimator_params = dict(estimator_params)
        self.design: Design | None = None
        self.engine: OLSEngine | TreeEngine | None = None
        self.fp_model: FPModel | None = None
        self.metadata: dict = {}

    # ---- fit / predict --------------------------------------------------------------------------------------------
    def fit(self, runs_df: pd.DataFrame) -> Predictor:
        """Fit on the ``status == "done"`` rows of a run table (the run store's exported columns)."""
        t0 = time.perf_counter()
        runs = done_runs(runs_df)
        if runs.empty:
            raise PredictorError("no finished runs (status == 'done' with nll_fp and nll_quant) to fit on; collect "
                                 "runs first with `quantpredict collect`")
        design = Design.fit(self.kind, runs, self.requested_features)
        X = design.matrix(runs) if _all_finite(design, runs) else None
        n_dropped = 0
        if X is None:
            full = design._frame(runs, check=False)[list(design.columns)]
            ok = np.isfinite(full.to_numpy(float)).all(axis=1)
            n_dropped = int((~ok).sum())
            warnings.warn(f"{n_dropped} of {len(runs)} runs lack some of the {self.kind!r} features and are left "
                          "out of the fit", stacklevel=2)
            runs = runs[ok]
            X = full[ok]
        delta = measured_delta(runs)
        n_fit = len(runs)
        if self.target == "log":
            # the power law is fitted where delta is resolved above its measurement noise; below, the measured
            # value is mostly noise (and may be negative), which the interval accounts for at predict time
            se = pd.to_numeric(runs["delta_nll_se"], errors="coerce").to_numpy(float) if "delta_nll_se" in runs \
                else np.zeros(len(runs))
            keep = delta > np.maximum(self.min_resolved * np.nan_to_num(se, nan=0.0), 0.0)
            n_fit = int(keep.sum())
            if n_fit < len(X.columns) + 3:
                raise PredictorError(
                    f"only {n_fit} training runs have a delta resolved above {self.min_resolved} standard errors; "
                    f"the {self.kind!r} log-law needs at least {len(X.columns) + 3}: fit on more runs (lower-bit "
                    "formats degrade more), or use target='asinh'")
            X, y = X[keep], np.log(delta[keep])
            groups_all = runs["model"].astype(str).to_numpy()[keep] if "model" in runs else None
        else:
            y = to_target(delta, design.scale)
            groups_all = runs["model"].astype(str).to_numpy() if "model" in runs else None
        if self.kind in LINEAR_KINDS:
            engine = OLSEngine(self.alpha)
        else:
            engine = TreeEngine(self.kind, self.alpha, self.random_state, self.conformal_folds,
                                **self.estimator_params)
        engine.fit(X, y, groups_all)
        self.design, self.engine = design, engine
        self.fp_model = FPModel.fit(runs)
        self.metadata = {
            "n_runs": int(len(runs)), "n_runs_fitted": n_fit, "n_runs_dropped_missing_features": n_dropped,
            "n_models": int(runs["model"].nunique()) if "model" in runs else None,
            "models": sorted(runs["model"].astype(str).unique()) if "model" in runs else [],
            "families": sorted(runs["family"].astype(str).unique()) if "family" in runs else [],
            "fit_seconds": time.perf_counter() - t0, "validation": None,
            "eval_seconds_by_model": eval_seconds_by_model(runs),
        }
        return self

    @property
    def fitted(self) -> bool:
        return self.engine is not None

    @property
    def features(self) -> tuple[str, ...]:
        """The schema features this fitted predictor uses."""
        self._check_fitted()
        return self.design.features

    @property
    def required_columns(self) -> tuple[str, ...]:
        self._check_fitted()
        return self.design.required_columns

    @property
    def required_groups(self) -> tuple[str, ...]:
        """The feature groups to compute (``features.extract(which=...)``) for this predictor."""
        return feature_groups(self.features)

    def predict(self, features_df: pd.DataFrame) -> pd.DataFrame:
        """Predict for each row of ``features_df`` (schema features plus recipe columns; index kept).

        Returns columns ``delta_nll``, ``delta_low``, ``delta_high`` (nats; 1 - alpha interval), ``ppl``, ``ppl_low``,
        ``ppl_high``, ``ppl_fp`` and ``ppl_fp_source``: ``"measured"`` where the input has a finite ``ppl_fp``,
        ``"predicted"`` where it was predicted from ``fp_calib_nll`` (its uncertainty then widens the perplexity
        interval, combined in quadrature with the delta interval in log space), ``"unavailable"`` otherwise (ppl NaN).
        """
        self._check_fitted()
        if not isinstance(features_df, pd.DataFrame):
            raise PredictorError(f"predict() takes a pandas DataFrame, got {type(features_df).__name__}")
        X = self.design.matrix(features_df)
        mid, lo, hi = self.engine.predict(X)
        s = self.design.scale
        if self.target == "log":
            delta, d_lo, d_hi = np.exp(mid), np.exp(lo), np.exp(hi)
            # a measurement of delta carries noise of about s (the training runs' median standard error): widen the
            # law's interval by it, in quadrature, so that tiny (even negative) measured deltas are covered
            from scipy.stats import norm

            noise = norm.ppf(1 - self.alpha / 2) * s
            d_lo = delta - np.sqrt((delta - d_lo) ** 2 + noise**2)
            d_hi = delta + np.sqrt((d_hi - delta) ** 2 + noise**2)
        else:
            delta, d_lo, d_hi = from_target(mid, s), from_target(lo, s), from_target(hi, s)

        n = len(features_df)
        log_fp = np.full(n, np.nan)
        fp_half = np.zeros(n)
        source = np.array(["unavailable"] * n, dtype=object)
        if "ppl_fp" in features_df:
            measured = pd.to_numeric(features_df["ppl_fp"], errors="coerce").to_numpy(float)
            has = np.isfinite(measured) & (measured > 0)
            log_fp[has] = np.log(measured[has])
            source[has] = "measured"
            if "nll_fp_se" in features_df:  # a measured FP's own SE widens the interval too, in quadrature
                from scipy.stats import norm

                se = pd.to_numeric(features_df["nll_fp_se"], errors="coerce").to_numpy(float)
                fp_half[has] = norm.ppf(1 - self.alpha / 2) * np.nan_to_num(se[has], nan=0.0)
        need = source == "unavailable"
        if need.any() and self.fp_model is not None and "fp_calib_nll" in features_df:
            x = pd.to_numeric(features_df["fp_calib_nll"], errors="coerce").to_numpy(float)
            pred, half = self.fp_model.predict(x, self.alpha)
            ok = need & np.isfinite(pred)
            log_fp[ok] = pred[ok]
            fp_half[ok] = np.nan_to_num(half[ok], nan=0.0)
            source[ok] = "predicted"
        lo_w = np.sqrt((delta - d_lo) ** 2 + fp_half**2)
        hi_w = np.sqrt((d_hi - delta) ** 2 + fp_half**2)
        out = pd.DataFrame({
            "delta_nll": delta, "delta_low": d_lo, "delta_high": d_hi,
            "ppl": np.exp(log_fp + delta), "ppl_low": np.exp(log_fp + delta - lo_w),
            "ppl_high": np.exp(log_fp + delta + hi_w), "ppl_fp": np.exp(log_fp), "ppl_fp_source": source,
        }, index=features_df.index)
        return out

    def summary(self) -> str:
        """statsmodels' summary table for ``ols``/``bits``; feature importances and the conformal width for trees."""
        self._check_fitted()
        target = ("log(delta) on resolved runs" if self.target == "log" else
                  f"asinh(delta / {self.design.scale:.3g})")
        head = (f"quantpredict predictor kind={self.kind!r}: target {target}, "
                f"{self.metadata.get('n_runs')} training runs, features {list(self.design.features)}")
        return head + "\n" + self.engine.summary()

    # ---- the saved format (SavedPredictor.save / load) ------------------------------------------------------------
    def _params(self) -> dict:
        return {"random_state": self.random_state, "alpha": self.alpha, "conformal_folds": self.conformal_folds,
                "target": self.target, "min_resolved": self.min_resolved,
                "features": None if self.requested_features is None else list(self.requested_features),
                "estimator_params": self.estimator_params}

    def _state(self, directory: Path) -> dict:
        engine = self.engine.to_json(directory)  # writes estimator.skops for the tree kinds
        return {"design": self.design.to_json(), "engine": engine}

    @classmethod
    def _from_meta(cls, meta: Mapping, directory: Path) -> Predictor:
        params = meta["params"]
        p = cls(meta["kind"], params["random_state"], features=params["features"], alpha=params["alpha"],
                conformal_folds=params["conformal_folds"], target=params["target"],
                min_resolved=params["min_resolved"], **params["estimator_params"])
        p.design = Design.from_json(meta["design"])
        eng = meta["engine"]
        p.engine = (OLSEngine.from_json(eng, directory) if eng["engine"] == "ols" else
                    TreeEngine.from_json(eng, directory))
        p.fp_model = FPModel.from_json(meta["fp_model"])
        return p

    def __repr__(self) -> str:
        state = f"{self.metadata.get('n_runs')} runs" if self.engine is not None else "unfitted"
        return f"Predictor(kind={self.kind!r}, {state})"


def _all_finite(design: Design, runs: pd.DataFrame) -> bool:
    full = design._frame(runs, check=False)[list(design.columns)]
    return bool(np.isfinite(full.to_numpy(float)).all())
