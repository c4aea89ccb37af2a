"""The regression engines behind the predictor kinds, each with its 90% (1 - alpha) interval.

* :class:`OLSEngine` (kinds ``ols``, ``bits``): statsmodels OLS; intervals are statsmodels' prediction (observation)
  intervals, ``get_prediction(X).summary_frame(alpha)``. Saved as its training matrix and target (JSON); loading
  refits (closed form, deterministic) and checks the coefficients against the stored ones, so ``summary()`` works
  after a load and nothing but numbers is read from disk.
* :class:`TreeEngine` (kinds ``rf``, ``paper``, ``gbm``): scikit-learn ensembles with cross-conformal intervals:
  out-of-fold absolute residuals from folds grouped by model (the residuals a *new* model would see), their
  ceil((n + 1)(1 - alpha)) / n empirical quantile ``q``, interval ``prediction +- q`` around the model refitted on
  all runs. Saved with skops and an explicit allow-list of the estimator's types.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from quantpredict.errors import PredictorError

TREE_DEFAULTS: dict[str, dict] = {
    "rf": {"n_estimators": 300, "min_samples_leaf": 2, "max_features": 0.5},
    "paper": {"n_estimators": 300, "min_samples_leaf": 2},
    "gbm": {"n_estimators": 300, "learning_rate": 0.05, "max_depth": 3, "subsample": 0.8},
}

# skops: the only types a saved tree predictor may contain beyond skops' own defaults (scikit-learn estimators
# and numpy/builtin types). Anything else in a file is refused before loading.
SKOPS_TRUSTED: dict[str, tuple[str, ...]] = {
    "RandomForestRegressor": ("sklearn.tree._tree.Tree",),
    "GradientBoostingRegressor": ("sklearn.tree._tree.Tree",),
}


class OLSEngine:
    """statsmodels OLS with an intercept on the design columns."""

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha
        self.result = None
        self._X: pd.DataFrame | None = None
        self._y: np.ndarray | None = None

    def fit(self, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray | None = None) -> OLSEngine:
        import statsmodels.api as sm

        self._X, self._y = X.copy(), np.asarray(y, float)
        exog = sm.add_constant(X.astype(float), has_constant="add")
        if len(exog) <= exog.shape[1]:
            raise PredictorError(f"OLS needs more training runs ({len(exog)}) than coefficients ({exog.shape[1]}); "
                                 "fit on more runs or fewer features")
        self.result = sm.OLS(self._y, exog).fit()
        return self

    def predict(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import statsmodels.api as sm

        exog = sm.add_constant(X.astype(float), has_constant="add")
        frame = self.result.get_prediction(exog).summary_frame(alpha=self.alpha)
        return (frame["mean"].to_numpy(float), frame["obs_ci_lower"].to_numpy(float),
                frame["obs_ci_upper"].to_numpy(float))

    def summary(self) -> str:
        return str(self.result.summary())

    def to_json(self, directory: Path) -> dict:
        return {"engine": "ols", "alpha": self.alpha, "columns": list(self._X.columns),
                "X": self._X.to_numpy(float).tolist(), "y": self._y.tolist(),
                "params": [float(v) for v in self.result.params]}

    @classmethod
    def from_json(cls, d: Mapping, directory: Path) -> OLSEngine:
        X = pd.DataFrame(np.asarray(d["X"], float).reshape(len(d["X"]), len(d["columns"])), columns=d["columns"])
        eng = cls(float(d["alpha"])).fit(X, np.asarray(d["y"], float))
        stored = np.asarray(d["params"], float)
        if stored.shape != np.shape(eng.result.params) or not np.allclose(eng.result.params, stored, rtol=1e-8,
                                                                           atol=1e-10):
            raise PredictorError(f"the OLS predictor in {directory} is inconsistent (refitted coefficients differ "
                                 "from the stored ones): the file was edited or corrupted; refit it with "
                                 "`quantpredict fit`")
        return eng


class TreeEngine:
    """A scikit-learn tree ensemble plus a cross-conformal interval half-width in target space."""

    def __init__(self, kind: str, alpha: float = 0.1, random_state: int = 0, conformal_folds: int = 5,
                 **params):
        self.kind, self.alpha, self.random_state, self.conformal_folds = kind, alpha, random_state, conformal_folds
        self.params = {**TREE_DEFAULTS[kind], **params}
        self.estimator = None
        self.q: float = float("nan")
        self.n_calibration = 0

    def _new(self):
        from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor

        cls = GradientBoostingRegressor if self.kind == "gbm" else RandomForestRegressor
        return cls(random_state=self.random_state, **self.params)

    def fit(self, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray | None = None) -> TreeEngine:
        from sklearn.model_selection import GroupKFold, KFold

        Xa, y = X.to_numpy(float), np.asarray(y, float)
        if len(y) < 4:
            raise PredictorError(f"a {self.kind!r} predictor needs at least 4 training runs, got {len(y)}")
        n_groups = len(np.unique(groups)) if groups is not None else 0
        if n_groups >= 2:
            folds = GroupKFold(n_splits=min(self.conformal_folds, n_groups)).split(Xa, y, groups)
        else:
            folds = KFold(n_splits=min(self.conformal_folds, len(y)), shuffle=True,
                          random_state=self.random_state).split(Xa)
        resid = np.empty_like(y)
        for tr, te in folds:
            resid[te] = np.abs(y[te] - self._new().fit(Xa[tr], y[tr]).predict(Xa[te]))
        self.q = conformal_quantile(resid, self.alpha)
        self.n_calibration = len(resid)
        self.estimator = self._new().fit(Xa, y)
        self._columns = list(X.columns)
        return self

    def predict(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mid = self.estimator.predict(X.to_numpy(float))
        return mid, mid - self.q, mid + self.q

    def summary(self) -> str:
        imp = sorted(zip(self._columns, self.estimator.feature_importances_), key=lambda t: -t[1])
        lines = [f"{type(self.estimator).__name__} ({self.kind}), conformal half-width q = {self.q:.4g} "
                 f"(target space, from {self.n_calibration} out-of-fold residuals)", "feature importances:"]
        lines += [f"  {name:32s} {v:.3f}" for name, v in imp]
        return "\n".join(lines)

    def to_json(self, directory: Path) -> dict:
        import skops.io as sio

        path = directory / "estimator.skops"
        sio.dump(self.estimator, path)
        return {"engine": "tree", "kind": self.kind, "alpha": self.alpha, "random_state": self.random_state,
                "conformal_folds": self.conformal_folds, "params": self.params, "q": self.q,
                "n_calibration": self.n_calibration, "columns": self._columns,
                "estimator_file": path.name, "estimator_type": type(self.estimator).__name__,
                "estimator_sha256": _sha256(path)}

    @classmethod
    def from_json(cls, d: Mapping, directory: Path) -> TreeEngine:
        import skops.io as sio

        path = directory / d["estimator_file"]
        if not path.is_file():
            raise PredictorError(f"{directory} lacks {d['estimator_file']}: the saved predictor is incomplete; "
                                 "refit it with `quantpredict fit`")
        if _sha256(path) != d["estimator_sha256"]:
            raise PredictorError(f"{path} does not match the checksum in predictor.json (edited or corrupted); "
                                 "refit it with `quantpredict fit`")
        etype = d["estimator_type"]
        if etype not in SKOPS_TRUSTED:
            raise PredictorError(f"{path}: estimator type {etype!r} is not one quantpredict saves; refusing to load")
        untrusted = sio.get_untrusted_types(file=path)
        extra = sorted(set(untrusted) - set(SKOPS_TRUSTED[etype]))
        if extra:
            raise PredictorError(f"{path} contains types outside the allow-list ({extra}); refusing to load it. "
                                 "Refit the predictor with `quantpredict fit`")
        est = sio.load(path, trusted=list(untrusted))
        if type(est).__name__ != etype or not type(est).__module__.startswith("sklearn."):
            raise PredictorError(f"{path} holds a {type(est).__name__}, expected {etype}; refit the predictor")
        eng = cls(d["kind"], float(d["alpha"]), int(d["random_state"]), int(d["conformal_folds"]))
        eng.params = dict(d["params"])
        eng.estimator, eng.q, eng.n_calibration = est, float(d["q"]), int(d["n_calibration"])
        eng._columns = list(d["columns"])
        return eng


def conformal_quantile(abs_residuals: np.ndarray, alpha: float) -> float:
    """The split-conformal quantile: the ceil((n + 1)(1 - alpha))-th smallest residual (inf if n is too small)."""
    r = np.sort(np.asarray(abs_residuals, float))
    k = int(np.ceil((len(r) + 1) * (1 - alpha)))
    return float(r[k - 1]) if k <= len(r) else float("inf")


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
