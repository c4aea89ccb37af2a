"""Predictors built on the second-order law: KLD, delta NLL, top-1 agreement and perplexity, each with an interval.

To second order, KL(P_fp || P_q) = 0.5 delta^T F delta with F the Fisher of the next-token distribution: the
constant is 1 by construction, for any model at any size. The predictor therefore regresses each target on the
logarithm of a measured second-order quantity plus a few *scale-free* corrections (ratios, bits, element kind,
method; never a raw parameter count or width), so a fit on small models carries over to large ones:

- ``log KLD = a + b log(Q) + c . z`` with ``Q`` the kind's base quantity:
  - kind ``physics``: ``fisher_quad`` (the exact 0.5 delta^T F delta on the calibration batch, a forward-mode JVP)
    with the measured calibration KL as a higher-order correction, ``log(kl_calib / fisher_quad)``;
  - kind ``profile``: ``token_gn_quad`` (the same quadratic priced from weights alone, token-wise against the
    model's profile of per-token layer inputs and sampled output gradients: what ``rank`` and ``allocate`` use, no
    forward pass per recipe), with the largest layer's share of it (``kfac_max_layer_share``) as a correction.
    An AWQ recipe's base is ``token_cross_quad`` instead (:data:`AWQ_BASE_FEATURE`): the same price with each
    position's terms summed over the layers before squaring. AWQ folds each group's scales into the layer before
    it, so the errors of consecutive layers partly cancel, which the token-wise price cannot see: on the zoo its
    AWQ runs measured 0.6-0.95 of ``token_gn_quad`` where other recipes measure about 1, and the cross-layer price
    tracked that (``reports/profile_law_study.md``: AWQ's error 29% -> 9% leave one family out). For the other
    classes the cross-layer price is noisier than the token-wise one and predicts worse, so they keep it.
- ``log delta_NLL`` on the runs whose delta is resolved (> 2 standard errors), on the same base and corrections,
  weighted by each run's measurement precision (the law B). The ratio of delta NLL to KL is a property of the
  model (1 for a model that matches the data's distribution; 1.1-1.5 on the undertrained zoo, 0.83 on SmolLM2),
  which no scale-free input predicts across such different models. The ``physics`` kind therefore combines B
  with the NLL change it measured on the calibration batch (A = ``dnll_calib`` +- ``dnll_calib_se``) by their
  precisions: A decides where the quantization error is large beside its calibration noise (low bits, real
  models), B where it is not (8-bit recipes of small models).
- ``log(1 - top1)`` on the base (disagreement grows like sqrt(KL) for small perturbations) and the FP entropy.
- ``ppl = ppl_fp * exp(delta_NLL)``, ``ppl_fp`` measured when given (its NLL's standard error ``nll_fp_se``
  widening the interval in quadrature, :mod:`quantpredict.predict.fp_reference`), else from the calibration NLL.

Intervals: split-conformal per target on out-of-fold log residuals from folds grouped by model (the residuals a
*new* model would see), widened for inputs outside the training ranges (:meth:`PhysicsPredictor._widen`, with an
:class:`OutOfRangeWarning`; the output's ``out_of_range`` column names each row's inputs outside them). The
half-width is calibrated per method class (:mod:`quantpredict.predict.classes`: RTN, GPTQ, AWQ, named mix,
allocated mix, weight+activation) on that class's own residuals where the training runs hold at least
:data:`MIN_CLASS_RUNS` of it, else on all of them: one width for every class would be too wide for RTN and too
narrow for the classes the law fits worst. A row's class is read from its ``recipe``, ``method`` and
``act_format``; a frame without ``recipe`` gets the all-runs width.
MAPIE's conformal regressors would do the same residual bookkeeping, but a saved predictor here must load
without pickle (plain JSON numbers), so the quantile is computed directly, exactly as MAPIE's split method does.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from quantpredict.errors import PredictorError
from quantpredict.predict.classes import is_set, method_classes
from quantpredict.predict.design import done_runs, feature_groups
from quantpredict.predict.saved import FPModel, SavedPredictor, eval_seconds_by_model

PHYSICS_KINDS: tuple[str, ...] = ("physics", "profile")
BASE_FEATURE = {"physics": "fisher_quad", "profile": "token_gn_quad"}
#: the base quantity of an AWQ recipe's row, where it differs from :data:`BASE_FEATURE` (module docstring)
AWQ_BASE_FEATURE = {"profile": "token_cross_quad"}
TARGETS = ("kld", "delta_nll", "top1")
FLOOR = 1e-12  # nats: log() of a second-order term that rounds to zero
#: the fewest out-of-fold residuals of one method class that get their own conformal half-width (at 90% the
#: quantile is then the 28th of 30: a width that one unlucky run cannot double)
MIN_CLASS_RUNS = 30


class OutOfRangeWarning(UserWarning):
    """A prediction for an input outside the range the predictor was fitted on (its interval is widened)."""


def _num(df: pd.DataFrame, col: str) -> np.ndarray:
    if col not in df:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[col], errors="coerce").to_numpy(float)


def _log(x: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(x, float), FLOOR))


def _flag(df: pd.DataFrame, col: str, value: str | None = None) -> np.ndarray:
    """1.0 where the recipe column is set (or equals ``value``)."""
    if col not in df:
        return np.zeros(len(df))
    s = df[col]
    if value is not None:
        return (s.astype(str) == value).to_numpy(float)
    return s.map(is_set).to_numpy(float)


def _gptq(df: pd.DataFrame) -> np.ndarray:
    return df["method"].astype(str).isin(["gptq", "qat_gptq"]).to_numpy(float) if "method" in df else \
        np.zeros(len(df))


def design_columns(kind: str, target: str, df: pd.DataFrame, extra: Sequence[str] = (),
                   awq_base: str | None = None) -> pd.DataFrame:
    """The scale-free design matrix of one target, ``[n_rows, columns]`` (no intercept column); ``extra`` columns of
    ``df`` (positive attributes such as ``tokens_per_param``) enter as logarithms. ``awq_base``: the base feature of
    the AWQ rows (:func:`awq_rows`; ``None``: the kind's :data:`BASE_FEATURE`, as for every other row)."""
    base = _log(_num(df, BASE_FEATURE[kind]))
    if awq_base is not None:
        base = np.where(awq_rows(df), _log(_num(df, awq_base)), base)
    cols: dict[str, np.ndarray] = {"log_base": base}
    if kind == "physics":
        cols["log_kl_over_quad"] = _log(_num(df, "kl_calib")) - base
    else:
        cols["max_layer_share"] = _num(df, "kfac_max_layer_share")
    cols["element_is_fp"] = _num(df, "element_is_fp")
    cols["gptq"] = _gptq(df)
    cols["act_quant"] = _flag(df, "act_format")
    if target == "top1":
        cols["log_fp_entropy"] = _log(_num(df, "fp_entropy_calib"))
    for name in extra:
        cols[f"log_{name}"] = _log(_num(df, name))
    return pd.DataFrame(cols, index=df.index)


def awq_rows(df: pd.DataFrame) -> np.ndarray:
    """``[n_rows]`` bool: the rows whose recipe is AWQ (:func:`~quantpredict.predict.classes.method_class`; a frame
    without ``recipe`` has none)."""
    if "recipe" not in df or df.empty:
        return np.zeros(len(df), bool)
    return method_classes(df) == "AWQ"


def column_words(kind: str, column: str) -> str:
    """A design column in the schema's words, for messages."""
    names = {"log_base": f"log {BASE_FEATURE[kind]}", "log_kl_over_quad": "log(kl_calib / fisher_quad)",
             "max_layer_share": "kfac_max_layer_share",
             "calib_gap": "fp_calib_nll - fp_entropy_calib", "calib_dnll_per_kl": "asinh(dnll_calib / kl_calib)",
             "log_fp_entropy": "log fp_entropy_calib"}
    return names.get(column, column)


def required_features(kind: str) -> tuple[str, ...]:
    """The schema features a predictor of ``kind`` reads."""
    common = ("element_is_fp", "fp_calib_nll", "fp_entropy_calib")
    if kind == "physics":
        return ("fisher_quad", "kl_calib", "dnll_calib") + common
    return ("token_gn_quad", "kfac_max_layer_share") + common


#: Read when present (runs extracted before it existed lack it; the law then stands alone).
OPTIONAL_FEATURES = {"physics": ("dnll_calib_se",), "profile": ()}


def target_values(target: str, df: pd.DataFrame) -> np.ndarray:
    """The transformed measured target: log KLD, log delta NLL, log(1 - top1)."""
    if target == "kld":
        return _log(_num(df, "kld"))
    if target == "delta_nll":
        return _log(_num(df, "nll_quant") - _num(df, "nll_fp"))
    return _log(1.0 - _num(df, "top1_agree"))


def resolved(df: pd.DataFrame, min_se: float = 2.0) -> np.ndarray:
    """Runs whose delta NLL is above ``min_se`` standard errors (what the delta NLL law is fitted on)."""
    delta = _num(df, "nll_quant") - _num(df, "nll_fp")
    se = np.nan_to_num(_num(df, "delta_nll_se"), nan=0.0)
    return delta > np.maximum(min_se * se, 0.0)


DELTA_LAW_SCATTER = 0.1  # log-space scatter of the law itself, beside each run's measurement noise


def delta_weights(df: pd.DataFrame) -> np.ndarray:
    """Inverse-variance weights of log delta NLL: a run's relative standard error (its measurement noise in log
    space) in quadrature with the law's own scatter. A delta measured to 3% counts ~10x one measured to 40%."""
    delta = _num(df, "nll_quant") - _num(df, "nll_fp")
    rel = np.nan_to_num(_num(df, "delta_nll_se"), nan=0.0) / np.maximum(np.abs(delta), FLOOR)
    return 1.0 / (DELTA_LAW_SCATTER**2 + rel**2)


def conformal_quantile(abs_residuals: np.ndarray, alpha: float) -> float:
    """The split-conformal quantile: the ceil((n + 1)(1 - alpha))-th smallest residual (inf if n is too small)."""
    r = np.sort(np.asarray(abs_residuals, float))
    k = int(np.ceil((len(r) + 1) * (1 - alpha)))
    return float(r[k - 1]) if k <= len(r) else float("inf")


@dataclass
class LogLaw:
    """One target's fitted law: least squares in log space, its conformal half-width and its training ranges.

    ``sd``: the law's out-of-fold scatter in log space (its precision when it is combined with a measurement);
    ``q_combined``: the conformal half-width of the precision-weighted combination with the calibration
    measurement (delta NLL of the ``physics`` kind), NaN where there is none."""

    target: str
    columns: tuple[str, ...]
    coef: np.ndarray  # [1 + len(columns)]: intercept first
    q: float  # conformal half-width in log space (1 - alpha coverage)
    ranges: dict[str, tuple[float, float]]
    n: int
    dropped: tuple[str, ...] = ()
    sd: float = float("nan")
    q_combined: float = float("nan")
    q_class: dict[str, float] = field(default_factory=dict)  # per method class half-width (MIN_CLASS_RUNS or more)
    oof: np.ndarray | None = None  # out-of-fold log predictions of the training rows (not saved)

    def half_widths(self, classes: np.ndarray | None, n: int) -> np.ndarray:
        """``[n]`` conformal half-widths: each row's class width where it has one, else :attr:`q`."""
        if classes is None or not self.q_class:
            return np.full(n, self.q)
        return np.array([self.q_class.get(c, self.q) for c in classes], float)

    def predict_log(self, X: pd.DataFrame) -> np.ndarray:
        A = np.column_stack([np.ones(len(X))] + [X[c].to_numpy(float) for c in self.columns])
        return A @ self.coef

    def to_json(self) -> dict:
        return {"target": self.target, "columns": list(self.columns), "coef": [float(c) for c in self.coef],
                "q": self.q, "ranges": {k: list(v) for k, v in self.ranges.items()}, "n": self.n,
                "dropped": list(self.dropped), "sd": self.sd, "q_combined": self.q_combined,
                "q_class": dict(self.q_class)}

    @classmethod
    def from_json(cls, d: Mapping) -> LogLaw:
        return cls(str(d["target"]), tuple(d["columns"]), np.asarray(d["coef"], float), float(d["q"]),
                   {k: (float(v[0]), float(v[1])) for k, v in d["ranges"].items()}, int(d["n"]),
                   tuple(d.get("dropped", ())), float(d.get("sd", float("nan"))),
                   float(d.get("q_combined", float("nan"))),
                   {str(k): float(v) for k, v in d.get("q_class", {}).items()})  # saved before it: one width


def _lstsq(X: np.ndarray, y: np.ndarray, ridge: float = 1e-6, weights: np.ndarray | None = None) -> np.ndarray:
    """(Weighted) least squares with an unpenalised intercept and a tiny ridge (keeps collinear indicator columns
    finite)."""
    A = np.column_stack([np.ones(len(X)), X])
    w = np.ones(len(y)) if weights is None else np.asarray(weights, float)
    reg = ridge * np.eye(A.shape[1])
    reg[0, 0] = 0.0
    Aw = A * w[:, None]
    return np.linalg.solve(A.T @ Aw + reg * w.sum(), Aw.T @ y)


def fit_law(target: str, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray, alpha: float,
            n_folds: int = 10, weights: np.ndarray | None = None, classes: np.ndarray | None = None) -> LogLaw:
    """Fit one target and its grouped cross-conformal half-width (out-of-fold residuals, folds grouped by model).

    ``weights``: per-run least-squares weights (the delta NLL law weighs runs by their measurement precision);
    ``classes``: each run's method class, for the per-class half-widths (:data:`MIN_CLASS_RUNS`)."""
    from sklearn.model_selection import GroupKFold

    keep_cols = [c for c in X.columns if np.nanstd(X[c].to_numpy(float)) > 0]
    dropped = tuple(c for c in X.columns if c not in keep_cols)
    Xa = X[keep_cols].to_numpy(float)
    w = None if weights is None else np.asarray(weights, float)
    coef = _lstsq(Xa, y, weights=w)
    n_groups = len(np.unique(groups))
    resid = np.full(len(y), np.nan)
    if n_groups >= 2:
        for tr, te in GroupKFold(n_splits=min(n_folds, n_groups)).split(Xa, y, groups):
            c = _lstsq(Xa[tr], y[tr], weights=None if w is None else w[tr])
            resid[te] = y[te] - np.column_stack([np.ones(len(te)), Xa[te]]) @ c
    ok = np.isfinite(resid)
    q = conformal_quantile(np.abs(resid[ok]), alpha) if ok.any() else float("inf")
    sd = float(np.sqrt(np.mean(resid[ok] ** 2))) if ok.any() else float("nan")
    ranges = {c: (float(np.min(X[c])), float(np.max(X[c]))) for c in keep_cols
              if X[c].nunique() > 2}  # indicators are in range by construction
    q_class = {}
    if classes is not None:
        for c in np.unique(classes[ok]):
            r = np.abs(resid[ok & (classes == c)])
            if r.size >= MIN_CLASS_RUNS:
                q_class[str(c)] = conformal_quantile(r, alpha)
    return LogLaw(target, tuple(keep_cols), coef, q, ranges, len(y), dropped, sd, q_class=q_class, oof=y - resid)


def combine_with_measurement(law_value: np.ndarray, law_sd: float, measured: np.ndarray,
                             measured_se: np.ndarray) -> np.ndarray:
    """Precision-weighted mean of a law's prediction (relative scatter ``law_sd``) and a noisy measurement of the
    same quantity (standard error ``measured_se``); the law alone where the measurement is missing. The result is
    kept above the law's 3-sigma lower bound: a measurement that is negative within its noise (an 8-bit recipe's
    calibration NLL change) must not drag a positive quantity to zero."""
    law_var = (law_sd * law_value) ** 2
    se = np.asarray(measured_se, float)
    has = np.isfinite(measured) & np.isfinite(se) & (se > 0)
    w_m = np.where(has, 1.0 / np.where(has, se, 1.0) ** 2, 0.0)
    w_l = 1.0 / np.maximum(law_var, FLOOR**2)
    out = (w_l * law_value + w_m * np.where(has, measured, 0.0)) / (w_l + w_m)
    return np.maximum(out, law_value * np.exp(-3.0 * law_sd))


@dataclass
class PhysicsPredictor(SavedPredictor, kinds=PHYSICS_KINDS):
    """The KLD-first predictor (kinds ``physics`` and ``profile``); see the module docstring.

    ``predict(frame)`` returns every column the delta-only kinds return (``delta_nll``, ``ppl`` ... with intervals)
    plus ``kld``, ``kld_low``, ``kld_high``, ``top1``, ``top1_low``, ``top1_high``.
    """

    kind: str = "physics"
    alpha: float = 0.1
    laws: dict[str, LogLaw] = field(default_factory=dict)
    fp_model: object = None
    delta_noise: float = 0.0  # nats: the training runs' median standard error of a measured delta NLL
    extra_columns: tuple[str, ...] = ()  # further positive inputs, as logs (e.g. tokens_per_param, for a study)
    #: the AWQ rows' base feature: "auto" is the kind's AWQ_BASE_FEATURE; None (a predictor saved before it) the
    #: kind's one base for every row
    awq_base: str | None = "auto"
    metadata: dict = field(default_factory=dict)
    _warned: set = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in PHYSICS_KINDS:
            raise PredictorError(f"unknown physics predictor kind {self.kind!r}; choose one of {list(PHYSICS_KINDS)}")
        if not 0 < self.alpha < 1:
            raise PredictorError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.awq_base == "auto":
            self.awq_base = AWQ_BASE_FEATURE.get(self.kind)

    # ---- fit -------------------------------------------------------------------------------------------------------
    @property
    def features(self) -> tuple[str, ...]:
        """Every schema feature the predictor reads (the optional ones included)."""
        return required_features(self.kind) + OPTIONAL_FEATURES[self.kind]

    @property
    def required_groups(self) -> tuple[str, ...]:
        """The feature groups to compute (``features.extract(which=...)``) for this predictor."""
        return tuple(dict.fromkeys(("model", "format") + feature_groups(self.features)))

    def usable(self, runs: pd.DataFrame) -> pd.DataFrame:
        """The done runs with every feature and measured target this kind needs, but runs whose recipe quantizes
        the token embedding or the LM head (labels with ``E=``/``H=``): a run stored before those two matrices were
        priced has a ``token_gn_quad`` of the linear layers alone, which would teach the predictor that they cost
        nothing; and kept out of every fit, such runs judge the embedding and head terms on runs they never saw. An
        AWQ run also needs its ``awq_base`` feature (``quantpredict backfill --groups profile`` adds it)."""
        runs = done_runs(runs)
        if "recipe" in runs:
            runs = runs[~runs["recipe"].astype(str).str.contains(r"-[EH]=", regex=True)]
        need = list(required_features(self.kind)) + list(self.extra_columns) + ["kld", "top1_agree"]
        missing = [c for c in need if c not in runs]
        if missing:
            raise PredictorError(f"the runs lack {missing}, which the {self.kind!r} predictor needs; add them with "
                                 f"`quantpredict backfill --store S --groups "
                                 f"{','.join(self.required_groups[2:])}`")
        ok = np.all([np.isfinite(_num(runs, c)) for c in need], axis=0)
        if self.awq_base is not None:  # an AWQ run is fitted on its own base: stored before it, it waits
            ok &= ~awq_rows(runs) | np.isfinite(_num(runs, self.awq_base))
        return runs[ok]

    @property
    def fitted(self) -> bool:
        return bool(self.laws)

    def fit(self, runs_df: pd.DataFrame) -> PhysicsPredictor:
        """Fit the three laws on the usable done runs of a run table (at least 2 models, 20 runs)."""
        t0 = time.perf_counter()
        runs = self.usable(runs_df)
        if runs["model"].nunique() < 2 or len(runs) < 20:
            raise PredictorError(f"the {self.kind!r} predictor needs runs of at least 2 models (20 runs); got "
                                 f"{len(runs)} runs of {runs['model'].nunique()} model(s) with its features")
        groups = runs["model"].astype(str).to_numpy()
        classes = method_classes(runs)
        laws = {}
        for target in TARGETS:
            rows = resolved(runs) if target == "delta_nll" else np.isfinite(target_values(target, runs))
            X = design_columns(self.kind, target, runs[rows], self.extra_columns, self.awq_base)
            laws[target] = fit_law(target, X, target_values(target, runs[rows]), groups[rows], self.alpha,
                                   weights=delta_weights(runs[rows]) if target == "delta_nll" else None,
                                   classes=classes[rows])
            if target == "delta_nll" and self.kind == "physics":
                law = laws[target]
                sub = runs[rows]
                combined = combine_with_measurement(np.exp(law.oof), law.sd, _num(sub, "dnll_calib"),
                                                    _num(sub, "dnll_calib_se"))
                res = np.abs(target_values(target, sub) - np.log(combined))
                law.q_combined = conformal_quantile(res[np.isfinite(res)], self.alpha)
        self.laws = laws
        self.fp_model = FPModel.fit(runs)
        se = _num(runs, "delta_nll_se")
        self.delta_noise = float(np.nanmedian(se)) if np.isfinite(se).any() else 0.0
        self.metadata = {"n_runs": int(len(runs)), "n_models": int(runs["model"].nunique()),
                         "models": sorted(runs["model"].astype(str).unique()),
                         "families": sorted(runs["family"].astype(str).unique()) if "family" in runs else [],
                         "fit_seconds": time.perf_counter() - t0, "eval_seconds_by_model": eval_seconds_by_model(runs),
                         "validation": None}
        return self

    # ---- predict ---------------------------------------------------------------------------------------------------
    def _widen(self, law: LogLaw, X: pd.DataFrame, flags: list[set] | None = None,
               classes: np.ndarray | None = None) -> np.ndarray:
        """Half-width per row: the row's class ``q`` (:meth:`LogLaw.half_widths`) times (1 + the summed distance
        outside the training ranges, in range units). ``flags``: one set per row, to which the words of each input
        outside its range are added."""
        excess = np.zeros(len(X))
        for col, (lo, hi) in law.ranges.items():
            v = X[col].to_numpy(float)
            span = max(hi - lo, 1e-9)
            out = np.maximum(lo - v, 0.0) + np.maximum(v - hi, 0.0)
            if flags is not None:
                for i in np.flatnonzero(out > 0):
                    flags[i].add(column_words(self.kind, col))
            if (out > 0).any() and col not in self._warned:
                self._warned.add(col)
                worst = float(v[np.argmax(out)])
                warnings.warn(f"{self.kind} predictor: input {column_words(self.kind, col)} = {worst:.4g} lies outside "
                              f"its training range [{lo:.4g}, {hi:.4g}]; the intervals are widened by the distance "
                              "outside (in units of the range)", OutOfRangeWarning, stacklevel=3)
            excess += out / span
        return law.half_widths(classes, len(X)) * (1.0 + excess)

    def predict(self, features_df: pd.DataFrame) -> pd.DataFrame:
        """Predict for each row of ``features_df`` (schema features plus recipe columns; index kept): the columns of
        the class docstring, intervals at 1 - alpha."""
        self._check_fitted()
        if not isinstance(features_df, pd.DataFrame):
            raise PredictorError(f"predict() takes a pandas DataFrame, got {type(features_df).__name__}")
        missing = [c for c in required_features(self.kind) if c not in features_df]
        if missing:
            raise PredictorError(f"the input lacks {missing} that this {self.kind!r} predictor needs; compute the "
                                 f"feature groups {list(self.required_groups)} (features.extract(which=...))")
        out = {}
        flags: list[set] = [set() for _ in range(len(features_df))]
        classes = method_classes(features_df) if "recipe" in features_df else None
        for target, law in self.laws.items():
            X = design_columns(self.kind, target, features_df, self.extra_columns, self.awq_base)
            bad = ~np.isfinite(X[list(law.columns)].to_numpy(float)).all(axis=1)
            if bad.any():
                raise PredictorError(f"{int(bad.sum())} input row(s) have missing or non-finite {self.kind} features "
                                     f"for {target} (first row {features_df.index[np.argmax(bad)]!r}); recompute them")
            mid = law.predict_log(X)
            half = self._widen(law, X, flags, classes)
            if target == "delta_nll" and self.kind == "physics" and np.isfinite(law.q_combined):
                measured_se = _num(features_df, "dnll_calib_se")
                mid = np.log(combine_with_measurement(np.exp(mid), law.sd, _num(features_df, "dnll_calib"),
                                                      measured_se))
                has = np.isfinite(measured_se) & (measured_se > 0)
                half = np.where(has, half * law.q_combined / law.q, half)  # the class's width, in proportion
            out[target] = (mid, mid - half, mid + half)
        kld = {k: np.exp(v) for k, v in zip(("mid", "lo", "hi"), out["kld"])}
        dn = {k: np.exp(v) for k, v in zip(("mid", "lo", "hi"), out["delta_nll"])}
        # an interval for a *measured* delta: the law's (log-space, fitted on resolved runs) widened in quadrature by
        # the measurement noise of a delta, so tiny or negative measured deltas of 8-bit recipes are covered too
        from scipy.stats import norm

        noise = norm.ppf(1 - self.alpha / 2) * self.delta_noise
        dn["lo"] = dn["mid"] - np.sqrt((dn["mid"] - dn["lo"]) ** 2 + noise**2)
        dn["hi"] = dn["mid"] + np.sqrt((dn["hi"] - dn["mid"]) ** 2 + noise**2)
        dis = {k: np.exp(v) for k, v in zip(("mid", "lo", "hi"), out["top1"])}
        frame = pd.DataFrame({
            "kld": kld["mid"], "kld_low": kld["lo"], "kld_high": kld["hi"],
            "delta_nll": dn["mid"], "delta_low": dn["lo"], "delta_high": dn["hi"],
            # the law is for the disagreement 1 - top1, which cannot exceed 1: at 2 bits it extrapolates past it
            "top1": 1 - np.minimum(dis["mid"], 1.0), "top1_low": 1 - np.minimum(dis["hi"], 1.0),
            "top1_high": 1 - np.minimum(dis["lo"], 1.0),
        }, index=features_df.index)
        # which inputs of each row lie outside the training ranges ("" if none): the CLI's one note per answer
        frame["out_of_range"] = ["; ".join(sorted(f)) for f in flags]
        return frame.join(self._ppl(features_df, frame))

    def _ppl(self, df: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
        n = len(df)
        log_fp, fp_half = np.full(n, np.nan), np.zeros(n)
        source = np.array(["unavailable"] * n, dtype=object)
        measured = _num(df, "ppl_fp")
        has = np.isfinite(measured) & (measured > 0)
        log_fp[has], source[has] = np.log(measured[has]), "measured"
        # a measured FP's own standard error (nll_fp_se, nats) widens the interval too, in quadrature (fp_reference)
        from scipy.stats import norm

        fp_half[has] = norm.ppf(1 - self.alpha / 2) * np.nan_to_num(_num(df, "nll_fp_se")[has], nan=0.0)
        need = source == "unavailable"
        if need.any() and self.fp_model is not None:
            pred, half = self.fp_model.predict(_num(df, "fp_calib_nll"), self.alpha)
            ok = need & np.isfinite(pred)
            log_fp[ok], fp_half[ok], source[ok] = pred[ok], np.nan_to_num(half[ok], nan=0.0), "predicted"
        d, lo, hi = (frame[c].to_numpy(float) for c in ("delta_nll", "delta_low", "delta_high"))
        lo_w, hi_w = np.sqrt((d - lo) ** 2 + fp_half**2), np.sqrt((hi - d) ** 2 + fp_half**2)
        return pd.DataFrame({"ppl": np.exp(log_fp + d), "ppl_low": np.exp(log_fp + d - lo_w),
                             "ppl_high": np.exp(log_fp + d + hi_w), "ppl_fp": np.exp(log_fp),
                             "ppl_fp_source": source}, index=df.index)

    def summary(self) -> str:
        """Each law's coefficients (log space, intercept first), training runs and conformal half-width."""
        lines = [f"quantpredict predictor kind={self.kind!r}: {self.metadata.get('n_runs')} runs of "
                 f"{self.metadata.get('n_models')} models; log-space laws (intercept first), conformal half-width q"]
        for t, law in self.laws.items():
            terms = ", ".join(f"{c} {v:+.3f}" for c, v in zip(("1",) + law.columns, law.coef))
            lines.append(f"  {t:10s} n={law.n:4d} q={law.q:.3f}: {terms}")
            if law.q_class:
                lines.append(f"  {'':10s} q by method class: "
                             + ", ".join(f"{c} {v:.3f}" for c, v in sorted(law.q_class.items())))
        return "\n".join(lines)

    # ---- the saved format (SavedPredictor.save / load) --------------------------------------------------------------
    def _params(self) -> dict:
        return {"alpha": self.alpha, "delta_noise": self.delta_noise, "extra_columns": list(self.extra_columns),
                "awq_base": self.awq_base}

    def _state(self, directory: Path) -> dict:
        return {"laws": {t: law.to_json() for t, law in self.laws.items()}}

    @classmethod
    def _from_meta(cls, meta: Mapping, directory: Path) -> PhysicsPredictor:
        p = cls(str(meta["kind"]), float(meta["params"]["alpha"]),
                delta_noise=float(meta["params"].get("delta_noise", 0.0)),
                extra_columns=tuple(meta["params"].get("extra_columns", ())),
                awq_base=meta["params"].get("awq_base"))  # saved before it: None, one base for every row
        p.laws = {t: LogLaw.from_json(v) for t, v in meta["laws"].items()}
        p.fp_model = FPModel.from_json(meta.get("fp_model"))
        if set(p.laws) != set(TARGETS):
            raise PredictorError(f"{directory}: the saved predictor lacks the laws {sorted(set(TARGETS) - set(p.laws))}"
                                 "; refit it with `quantpredict fit`")
        return p
