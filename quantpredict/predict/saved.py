"""The predictor contract: :class:`SavedPredictor`, the base class of every predictor, and what it saves.

In the spirit of scikit-learn's ``BaseEstimator``, the base holds everything that is not a predictor's own maths:

- :meth:`SavedPredictor.save` writes ``predictor.json`` (the format's name and version, the kind, the feature schema
  it was fitted against, the FP model, the training metadata and the recorded validation) plus whatever the subclass
  adds (:meth:`~SavedPredictor._params`, :meth:`~SavedPredictor._state`);
- :meth:`SavedPredictor.load` checks a saved directory and returns an instance of the class registered for its saved
  kind, whichever class it is called on (``Predictor.load`` of a ``physics`` predictor is a ``PhysicsPredictor``);
- :meth:`SavedPredictor.attach_validation` records validation metrics, :meth:`SavedPredictor.describe` says what a
  predictor is in plain JSON values.

A subclass registers the kinds it fits with ``class X(SavedPredictor, kinds=(...))``; each kind must have a row in
:data:`KIND_ROLES`. ``quantpredict/predict/__init__.py`` imports every predictor module, and Python imports a package
before any of its modules, so the registry is complete whenever anything in ``quantpredict.predict`` is in use.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from quantpredict.errors import PredictorError
from quantpredict.schema import FEATURE_NAMES

FORMAT_NAME = "quantpredict.predictor"
FORMAT_VERSION = 1
META_FILE = "predictor.json"

#: Every predictor kind and why it stays (what would be lost without it). ``reports/index.md`` compares the
#: delta-only kinds and ``reports/predictors.md`` the KLD-first ones against their baselines.
KIND_ROLES: dict[str, str] = {
    # KLD-first (PhysicsPredictor): KLD, delta NLL, top-1 agreement and perplexity, each with an interval
    "physics": "the default (data/predictors/default, `quantpredict predict`): the exact second-order KL measured "
               "on the calibration batch, with scale-free corrections only, so a fit on small models carries over",
    "profile": "prices a recipe from its weights alone against a per-model profile, no forward pass per recipe: "
               "what `rank` and `allocate` use (data/predictors/profile)",
    # delta-only (Predictor): delta NLL and perplexity
    "ols": "the delta-only scaling law with readable exponents and exact statsmodels intervals: the interpretable "
           "model of reports/index.md's comparison",
    "rf": "the random forest on every feature, the other tree ensemble of reports/index.md's comparison: the best "
          "there on R² where gbm is on median error",
    "gbm": "the best delta-only kind of reports/index.md, shipped as data/predictors/gbm: the delta-NLL baseline "
           "the KLD-first kinds are compared against (`fit --validate --kinds ...,gbm`)",
    "bits": "baseline: bits per element only, what a practitioner knows without running anything; the floor every "
            "kind must clear",
    "paper": "baseline: the seed study's random forest (parameters, pre-trained loss, RTN SQNR, format), the "
             "published method every kind is judged against",
}


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


def eval_seconds_by_model(runs: pd.DataFrame) -> dict[str, float]:
    """Median measured seconds of a full quantized evaluation per training model (the cost a prediction saves)."""
    if "eval_seconds" not in runs or "model" not in runs:
        return {}
    sec = pd.to_numeric(runs["eval_seconds"], errors="coerce")
    per = sec.groupby(runs["model"].astype(str)).median().dropna()
    return {str(k): float(v) for k, v in per.items()}


class SavedPredictor:
    """The base class of every predictor: save, load by kind, validation metadata and :meth:`describe`.

    A subclass sets ``kind``, ``alpha`` (intervals are 1 - alpha), ``fp_model`` (a :class:`FPModel` or None) and
    ``metadata`` (what :meth:`fit` learnt about its training runs), registers its kinds (``kinds=`` in the class
    statement) and implements ``fit``, ``predict``, ``summary``, the ``features`` and ``required_groups``
    properties, :attr:`fitted`, and the three hooks of the saved format: :meth:`_params`, :meth:`_state` and
    :meth:`_from_meta`.
    """

    _registry: ClassVar[dict[str, type[SavedPredictor]]] = {}

    def __init_subclass__(cls, kinds: Sequence[str] = (), **kwargs):
        super().__init_subclass__(**kwargs)
        for kind in kinds:
            if kind not in KIND_ROLES:
                raise TypeError(f"{cls.__name__} registers the kind {kind!r}, which has no row in "
                                "quantpredict.predict.saved.KIND_ROLES: add one saying why the kind is needed")
            if kind in SavedPredictor._registry:
                raise TypeError(f"the kind {kind!r} is registered twice ({SavedPredictor._registry[kind].__name__}, "
                                f"{cls.__name__})")
            SavedPredictor._registry[kind] = cls

    @staticmethod
    def registry() -> dict[str, type[SavedPredictor]]:
        """``{kind: the class that fits and loads it}``, every registered kind."""
        return dict(SavedPredictor._registry)

    # ---- what a subclass provides ----------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        """True once :meth:`fit` (or :meth:`load`) has set the fitted state."""
        raise NotImplementedError

    def _params(self) -> dict:
        """The constructor's arguments, as saved under ``params``."""
        raise NotImplementedError

    def _state(self, directory: Path) -> dict:
        """The fitted state as top-level entries of ``predictor.json`` (side files may be written to ``directory``)."""
        raise NotImplementedError

    @classmethod
    def _from_meta(cls, meta: Mapping, directory: Path) -> SavedPredictor:
        """Rebuild a predictor from its ``predictor.json`` (``params`` and state; :meth:`load` restores the rest).
        A missing or malformed entry raises ``KeyError``, ``TypeError`` or ``ValueError``."""
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.fitted:
            raise PredictorError(f"this {self.kind!r} predictor is not fitted; call fit(runs) or "
                                 "SavedPredictor.load(dir) first")

    def attach_validation(self, metrics: pd.DataFrame | Sequence[Mapping]) -> SavedPredictor:
        """Record validation metrics (rows of :func:`quantpredict.predict.validate`'s or
        :func:`quantpredict.predict.targets.validate_targets`' table) in the metadata; :meth:`save` writes them."""
        rows = metrics.to_dict("records") if isinstance(metrics, pd.DataFrame) else [dict(r) for r in metrics]
        self.metadata["validation"] = [{k: _jsonable(v) for k, v in r.items()} for r in rows]
        return self

    def describe(self) -> dict:
        """What this predictor is, in plain JSON values: its kind and why the kind exists, its class, the features
        it reads and the feature groups that compute them, what it was fitted on and its recorded validation."""
        fitted = self.fitted
        return {"kind": self.kind, "role": KIND_ROLES[self.kind], "class": type(self).__name__, "fitted": fitted,
                "alpha": self.alpha, "features": list(self.features) if fitted else [],
                "feature_groups": list(self.required_groups) if fitted else [],
                **{k: _jsonable(self.metadata.get(k)) for k in ("n_runs", "n_models", "models", "families",
                                                                "created", "validation")}}

    def save(self, directory: str | Path) -> Path:
        """Write ``predictor.json`` (and the subclass's side files, e.g. ``estimator.skops`` for the tree kinds) into
        ``directory`` (created); returns it."""
        self._check_fitted()
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise PredictorError(f"{d} exists and is not a directory; pass a directory to save the predictor in")
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": self.kind,
                "params": self._params(),
                "schema": {"feature_names": list(FEATURE_NAMES), "used": list(self.features)},
                **self._state(d),
                "fp_model": None if self.fp_model is None else self.fp_model.to_json(),
                "training": {k: _jsonable(v) for k, v in self.metadata.items() if k != "validation"},
                "validation": self.metadata.get("validation"),
                "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (d / META_FILE).write_text(json.dumps(meta, indent=1, allow_nan=True))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> SavedPredictor:
        """Load a predictor saved by :meth:`save`, as the class registered for its saved kind (whichever class this
        is called on). Reads JSON and, for the tree kinds, an allow-listed skops file only: no pickle."""
        d = Path(directory)
        fix = "fit one with `quantpredict fit --store STORE --kind physics --out DIR`"
        if not d.exists():
            raise PredictorError(f"no predictor at {d}: the path does not exist; {fix}")
        if d.is_file():
            raise PredictorError(f"{d} is a file, not a predictor directory (expected a directory with {META_FILE}); "
                                 f"pass the directory, or {fix}")
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise PredictorError(f"{d} is not a saved predictor (no {META_FILE}); {fix}")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PredictorError(f"{meta_path} is not valid JSON ({exc}); it is not a saved predictor; {fix}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise PredictorError(f"{meta_path} is not a quantpredict predictor (format marker missing); {fix}")
        if int(meta.get("format_version", -1)) > FORMAT_VERSION:
            raise PredictorError(f"{d} was saved by a newer quantpredict (predictor format "
                                 f"{meta['format_version']} > {FORMAT_VERSION}); upgrade quantpredict or refit")
        _check_schema(meta, d)
        kind = meta.get("kind")
        sub = SavedPredictor._registry.get(kind)
        if sub is None:
            raise PredictorError(f"{meta_path} holds a predictor of kind {kind!r}, which this quantpredict does not "
                                 f"know (kinds: {', '.join(SavedPredictor._registry)}); {fix}")
        try:
            p = sub._from_meta(meta, d)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PredictorError):
                raise
            raise PredictorError(f"{meta_path}: the saved {kind!r} predictor is incomplete or corrupt "
                                 f"({type(exc).__name__}: {exc}); {fix}") from None
        p.metadata = {**meta.get("training", {}), "validation": meta.get("validation"),
                      "versions": meta.get("versions"), "created": meta.get("created")}
        return p


def _check_schema(meta: Mapping, d: Path) -> None:
    """A predictor is usable when every feature it uses still exists under the same name in the current schema,
    and no name of the schema it was fitted against has disappeared (the schema only ever gains rows)."""
    schema = meta.get("schema") or {}
    used, recorded = list(schema.get("used", [])), list(schema.get("feature_names", []))
    current = set(FEATURE_NAMES)
    gone = [f for f in used if f not in current]
    removed = [f for f in recorded if f not in current]
    if gone or removed or not used:
        raise PredictorError(
            f"the predictor at {d} was fitted on a different feature schema: features "
            f"{sorted(set(gone) | set(removed)) or '(none recorded)'} are not in quantpredict.schema.FEATURE_NAMES "
            "of this version; refit it on runs collected with this version (`quantpredict fit`)")


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
