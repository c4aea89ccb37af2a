"""From run-store columns to design matrices: target transform, per-kind feature sets, recipe encoding.

Everything a fitted predictor needs to turn a frame into numbers lives in a :class:`Design`, which is plain data
(JSON round trip) so that a saved predictor never needs pickle.

Target transform. The degradation ``delta = nll_quant - nll_fp`` spans four decades (8-bit formats on large models
barely move the loss, 2-bit formats add nats) and is measured with noise of a few 1e-4 nats, so small deltas can be
slightly negative. Two transforms (``Predictor(target=...)``):

* ``"log"`` (default of the linear kinds ``ols``/``bits``): ``log(delta)`` fitted on the runs whose delta is
  resolved, above ``min_resolved`` (2) standard errors (``delta_nll_se``); the power law holds there, and
  extrapolates below. Predicted intervals are widened, in quadrature, by the measurement noise of a delta, so tiny
  or negative measured deltas are still covered. On synthetic data this recovered the law's exponents, where fitting
  asinh on all runs bent them (R^2 0.94 vs 0.70 leave-one-family-out).
* ``"asinh"`` (default of the trees): ``y = asinh(delta / s)`` on every run: for ``delta >> s`` this is
  ``log(2 delta / s)`` (errors become relative), for ``|delta| <~ s`` it is linear, so noise around zero, negative
  values included, stays finite and symmetric. Trees can follow the bend between the regimes.

``s`` is the noise floor: the median measured standard error of delta (``delta_nll_se``) over the training runs,
1e-3 nats when the store has none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from quantpredict.errors import PredictorError
from quantpredict.schema import FEATURE_NAMES, FEATURES

KINDS: tuple[str, ...] = ("ols", "rf", "gbm", "bits", "paper")

# Default feature sets, explicit per kind (a predictor records the ones it used).
#  - ols: the scaling-law form. log delta ~ log(second-order loss along the quantization direction) + log(RTN
#    relative weight error) + log(size) + log(pre-trained loss) + bits + element kind + recipe.
#  - rf/gbm: every schema feature except standard errors; trees are invariant to monotone feature transforms.
#  - bits: the format's bits per element only (what a practitioner knows without running anything).
#  - paper: the seed study's random forest: parameter count, pre-trained loss, RTN SQNR and the format.
DEFAULT_FEATURES: dict[str, tuple[str, ...]] = {
    "ols": ("quad_delta_h_delta", "rtn_rel_weight_error", "n_params_nonembed", "fp_calib_nll", "bits_per_element",
            "element_is_fp"),
    "rf": tuple(n for n in FEATURE_NAMES if not n.endswith("_se")),
    "gbm": tuple(n for n in FEATURE_NAMES if not n.endswith("_se")),
    "bits": ("bits_per_element",),
    "paper": ("n_params_nonembed", "fp_calib_nll", "rtn_sqnr_db", "bits_per_element", "element_is_fp"),
}
# Whether the recipe's method / SmoothQuant / activation format enter the design (the baselines do not see them).
USES_RECIPE: dict[str, bool] = {"ols": True, "rf": True, "gbm": True, "bits": False, "paper": False}
# Linear-model kinds (statsmodels OLS); the others are tree ensembles with conformal intervals.
LINEAR_KINDS = ("ols", "bits")

# Features that enter linear models as log(max(x, floor)): positive by nature (counts, losses, noise energies,
# curvature). dB values are already logarithms; bits and flags enter as they are.
LOG_SCALE: frozenset[str] = frozenset({
    "n_params_nonembed", "n_layers", "hidden_size", "fp_calib_nll", "block_size", "rtn_rel_weight_error",
    "hessian_trace", "hessian_trace_per_param", "top_eigenvalue", "trace_x_noise_var", "quad_delta_h_delta",
    "taylor_dnll", "radial_dnll_025", "radial_dnll_050", "radial_dnll_100", "sharpness_random", "gptq_proxy_rtn",
    "gptq_proxy_gptq",
})

# Recipe columns of the run store that are encoded (categorical levels are recorded at fit time).
RECIPE_CATEGORICAL = ("method", "act_format")
NO_ACT = "none"

DEFAULT_DELTA_SCALE = 1e-3  # nats; used when the runs carry no delta_nll_se


def feature_groups(names: Sequence[str]) -> tuple[str, ...]:
    """The schema groups (``extract(which=...)``) needed to compute ``names``, in schema order."""
    wanted = set(names)
    return tuple(dict.fromkeys(f.group for f in FEATURES if f.name in wanted))


def delta_scale_from(runs: pd.DataFrame, default: float = DEFAULT_DELTA_SCALE) -> float:
    """The asinh scale ``s``: median positive ``delta_nll_se`` of the runs (the measurement noise floor), else
    ``default``."""
    if "delta_nll_se" in runs:
        se = pd.to_numeric(runs["delta_nll_se"], errors="coerce").to_numpy(float)
        se = se[np.isfinite(se) & (se > 0)]
        if se.size:
            return float(np.median(se))
    return default


def to_target(delta: np.ndarray, scale: float) -> np.ndarray:
    """``asinh(delta / scale)``: the space every kind is fitted in (see module docstring)."""
    return np.arcsinh(np.asarray(delta, float) / scale)


def from_target(y: np.ndarray, scale: float) -> np.ndarray:
    """Inverse of :func:`to_target` (monotone, so interval end points map to interval end points)."""
    return np.sinh(np.asarray(y, float)) * scale


def measured_delta(runs: pd.DataFrame) -> np.ndarray:
    """``nll_quant - nll_fp`` per run, shape [n_runs]."""
    missing = [c for c in ("nll_quant", "nll_fp") if c not in runs]
    if missing:
        raise PredictorError(f"the runs lack the measured columns {missing}; export them from the run store "
                             "(`quantpredict runs export`) or pass a frame with nll_fp and nll_quant")
    return (pd.to_numeric(runs["nll_quant"], errors="coerce") - pd.to_numeric(runs["nll_fp"], errors="coerce")
            ).to_numpy(float)


def done_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The rows a predictor learns from: ``status == "done"`` with a finite measured delta."""
    if not isinstance(runs, pd.DataFrame):
        raise PredictorError(f"expected a pandas DataFrame of runs, got {type(runs).__name__}")
    out = runs
    if "status" in out:
        out = out[out["status"].astype(str) == "done"]
    delta = measured_delta(out)
    return out[np.isfinite(delta)]


def _act_level(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v.strip().lower() in
                                                                  ("", "none", "nan")):
        return NO_ACT
    return str(v)


def _categorical(df: pd.DataFrame, col: str) -> pd.Series:
    if col == "act_format":
        return df[col].map(_act_level) if col in df else pd.Series(NO_ACT, index=df.index)
    return df[col].astype(str)


@dataclass(frozen=True)
class Design:
    """How a frame becomes the design matrix of one predictor (plain data, JSON round trip).

    ``features``: schema features used; ``log_features``: the subset entering as log(max(x, floor[name]));
    ``categories``: recipe column -> levels seen at fit (one-hot); ``use_smoothquant``: SmoothQuant on/alpha columns;
    ``columns``: final design column names (constant columns dropped at fit); ``scale``: the asinh target scale.
    """

    kind: str
    features: tuple[str, ...]
    log_features: tuple[str, ...]
    floors: Mapping[str, float]
    categories: Mapping[str, tuple[str, ...]]
    use_smoothquant: bool
    columns: tuple[str, ...]
    scale: float
    dropped_features: tuple[str, ...] = field(default=())

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, kind: str, runs: pd.DataFrame, features: Sequence[str] | None = None) -> Design:
        """Choose features/levels/floors from training ``runs`` (already filtered to done rows)."""
        explicit = features is not None
        wanted = tuple(features) if explicit else DEFAULT_FEATURES[kind]
        unknown = [f for f in wanted if f not in FEATURE_NAMES]
        if unknown:
            raise PredictorError(f"features {unknown} are not in quantpredict.schema.FEATURE_NAMES; "
                                 "use names from the schema")
        present, dropped = [], []
        for f in wanted:
            ok = f in runs and pd.to_numeric(runs[f], errors="coerce").notna().any()
            (present if ok else dropped).append(f)
        if dropped and explicit:
            raise PredictorError(f"the runs have no values for the requested features {dropped}; compute them "
                                 "(`quantpredict collect` with those feature groups) or drop them from features=")
        if not present:
            raise PredictorError(f"none of the {kind!r} predictor's features {list(wanted)} is in the runs; the run "
                                 "store must export the feature columns")
        linear = kind in LINEAR_KINDS
        log_feats = tuple(f for f in present if linear and f in LOG_SCALE)
        floors = {}
        for f in log_feats:
            v = pd.to_numeric(runs[f], errors="coerce").to_numpy(float)
            pos = v[np.isfinite(v) & (v > 0)]
            # a floor far below the data keeps log finite for the odd non-positive value (e.g. a negative
            # 0.5 delta^T H delta where H is indefinite) without letting it dominate the fit
            floors[f] = float(np.min(pos) / 10) if pos.size else 1e-12
        categories: dict[str, tuple[str, ...]] = {}
        use_sq = False
        if USES_RECIPE[kind]:
            for col in RECIPE_CATEGORICAL:
                if col in runs:
                    categories[col] = tuple(sorted(_categorical(runs, col).unique(), key=_level_order))
            use_sq = "smoothquant_alpha" in runs
        proto = cls(kind, tuple(present), log_feats, floors, categories, use_sq, (), delta_scale_from(runs),
                    tuple(dropped))
        full = proto._frame(runs, check=False)
        keep = [c for c in full.columns if full[c].nunique(dropna=False) > 1]
        if linear:
            # one level of each categorical is the baseline absorbed by the intercept
            for col, levels in categories.items():
                base = f"{col}={levels[0]}"
                if base in keep:
                    keep.remove(base)
        if not keep:
            raise PredictorError(f"every {kind!r} feature is constant over the training runs ({list(present)}); "
                                 "fit on runs that vary in model and recipe")
        return cls(kind, tuple(present), log_feats, floors, categories, use_sq, tuple(keep), proto.scale,
                   tuple(dropped))

    # ---- use ------------------------------------------------------------------------------------------------------
    @property
    def required_columns(self) -> tuple[str, ...]:
        cols = list(self.features)
        cols += [c for c in self.categories if c != "act_format"]  # no act_format column means no activation quant
        return tuple(cols)

    def _frame(self, df: pd.DataFrame, check: bool) -> pd.DataFrame:
        missing = [c for c in self.required_columns if c not in df]
        if missing:
            raise PredictorError(f"the input lacks the columns {missing} that this {self.kind!r} predictor needs; "
                                 "compute those features (quantpredict.features.extract) and pass the recipe "
                                 "columns, or use a predictor fitted on the features you have")
        out = {}
        for f in self.features:
            v = pd.to_numeric(df[f], errors="coerce").to_numpy(float)
            if f in self.log_features:
                v = np.log(np.maximum(v, self.floors[f]))
            out[f"log_{f}" if f in self.log_features else f] = v
        for col, levels in self.categories.items():
            vals = _categorical(df, col)
            unseen = sorted(set(vals) - set(levels))
            if unseen:
                raise PredictorError(f"{col} values {unseen} were never seen in this predictor's training runs "
                                     f"(seen: {list(levels)}); refit on runs that include them")
            for lv in levels:
                out[f"{col}={lv}"] = (vals == lv).to_numpy(float)
        if self.use_smoothquant:
            a = pd.to_numeric(df["smoothquant_alpha"], errors="coerce") if "smoothquant_alpha" in df else \
                pd.Series(np.nan, index=df.index)
            out["smoothquant"] = a.notna().to_numpy(float)
            out["smoothquant_alpha"] = a.fillna(0.0).to_numpy(float)
        frame = pd.DataFrame(out, index=df.index)
        if check:
            _require_finite(frame, df.index)
        return frame

    def matrix(self, df: pd.DataFrame) -> pd.DataFrame:
        """The design matrix [n_rows, len(columns)] as a DataFrame indexed like ``df``."""
        frame = self._frame(df, check=False)[list(self.columns)]
        _require_finite(frame, df.index)
        return frame

    # ---- JSON -----------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"kind": self.kind, "features": list(self.features), "log_features": list(self.log_features),
                "floors": dict(self.floors), "categories": {k: list(v) for k, v in self.categories.items()},
                "use_smoothquant": self.use_smoothquant, "columns": list(self.columns), "scale": self.scale,
                "dropped_features": list(self.dropped_features)}

    @classmethod
    def from_json(cls, d: Mapping) -> Design:
        return cls(str(d["kind"]), tuple(d["features"]), tuple(d["log_features"]),
                   {k: float(v) for k, v in d["floors"].items()},
                   {k: tuple(v) for k, v in d["categories"].items()}, bool(d["use_smoothquant"]),
                   tuple(d["columns"]), float(d["scale"]), tuple(d.get("dropped_features", ())))


def _level_order(level: str) -> tuple[int, str]:
    # the natural baseline first (plain RTN, no activation quantization), so OLS coefficients read as "vs RTN"
    return (0 if level in ("rtn", NO_ACT) else 1, level)


def _require_finite(frame: pd.DataFrame, index: pd.Index) -> None:
    """Raise :class:`PredictorError` naming the columns and first row of ``frame`` that hold NaN or Inf."""
    bad = ~np.isfinite(frame.to_numpy(float))
    if bad.any():
        rows, cols = np.nonzero(bad)
        names = sorted({frame.columns[c] for c in cols})
        raise PredictorError(f"{len(set(rows))} input row(s) have missing or non-finite values in {names} "
                             f"(first row index {index[rows[0]]!r}); recompute those features or drop the rows")
