"""What every saved predictor shares: the file format's name and version, the JSON helpers and the FP model.

Both :mod:`.predictor` (the tree and OLS kinds) and :mod:`.physics` (the physics kinds) save and load through these,
so they live apart from both: ``predictor.load`` dispatches to ``physics`` without physics importing predictor back.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping

import numpy as np
import pandas as pd

FORMAT_NAME = "quantpredict.predictor"
FORMAT_VERSION = 1
META_FILE = "predictor.json"


class FPModel:
    """Maps the calibration (train-split) FP NLL to the WikiText-2 test FP NLL, one point per training model.

    Simple linear regression ``nll_fp = a + b * fp_calib_nll`` with its exact OLS prediction interval; with fewer
    than 3 models the offset alone (b = 1) and no interval.
    """

    def __init__(self, a: float, b: float, sd: float, n: int, x_mean: float, sxx: float):
        self.a, self.b, self.sd, self.n, self.x_mean, self.sxx = a, b, sd, n, x_mean, sxx

    @classmethod
    def fit(cls, runs: pd.DataFrame) -> FPModel | None:
        if "fp_calib_nll" not in runs or "model" not in runs:
            return None
        frame = pd.DataFrame({"model": runs["model"].astype(str),
                              "x": pd.to_numeric(runs["fp_calib_nll"], errors="coerce"),
                              "y": pd.to_numeric(runs["nll_fp"], errors="coerce")})
        per = frame.groupby("model")[["x", "y"]].mean()
        x, y = per["x"].to_numpy(float), per["y"].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if len(x) == 0:
            return None
        sxx = float(np.sum((x - x.mean()) ** 2))
        if len(x) < 3 or sxx <= 0:
            return cls(float(np.mean(y - x)), 1.0, float("nan"), len(x), float(x.mean()), sxx)
        b = float(np.sum((x - x.mean()) * (y - y.mean())) / sxx)
        a = float(y.mean() - b * x.mean())
        sd = float(np.sqrt(np.sum((y - a - b * x) ** 2) / (len(x) - 2)))
        return cls(a, b, sd, len(x), float(x.mean()), sxx)

    def predict(self, x: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Predicted test NLL and the half-width of its (1 - alpha) prediction interval (NaN when unknown)."""
        from scipy import stats

        x = np.asarray(x, float)
        mid = self.a + self.b * x
        if not np.isfinite(self.sd):
            return mid, np.full_like(mid, np.nan)
        t = stats.t.ppf(1 - alpha / 2, self.n - 2)
        half = t * self.sd * np.sqrt(1 + 1 / self.n + (x - self.x_mean) ** 2 / self.sxx)
        return mid, half

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "sd": self.sd, "n": self.n, "x_mean": self.x_mean, "sxx": self.sxx}

    @classmethod
    def from_json(cls, d: Mapping | None) -> FPModel | None:
        return None if d is None else cls(**{k: float(d[k]) if k != "n" else int(d[k]) for k in
                                              ("a", "b", "sd", "n", "x_mean", "sxx")})


def _eval_seconds(runs: pd.DataFrame) -> dict[str, float]:
    """Median measured seconds of a full quantized evaluation per training model (the cost a prediction saves)."""
    if "eval_seconds" not in runs or "model" not in runs:
        return {}
    sec = pd.to_numeric(runs["eval_seconds"], errors="coerce")
    per = sec.groupby(runs["model"].astype(str)).median().dropna()
    return {str(k): float(v) for k, v in per.items()}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("quantpredict", "numpy", "pandas", "scikit-learn", "statsmodels", "scipy", "skops"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v
