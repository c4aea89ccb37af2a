"""Predictors: from cheap features to the WikiText-2 perplexity a quantized model will have, with an interval.

``Predictor(kind)`` fits on a run table (``runs.RunStore(path).to_frame()``) and predicts ``delta = NLL_quant -
NLL_fp`` and ``ppl = ppl_fp * exp(delta)``; ``validate`` runs leave-one-model-out / leave-one-family-out
cross-validation; ``subsample_curve`` is the practitioner's baseline (evaluate only a prefix of the test windows);
``predict_quality`` computes a model's features on the fly and predicts.
"""

from __future__ import annotations

from quantpredict.errors import PredictorError
from quantpredict.predict.design import DEFAULT_FEATURES, KINDS
from quantpredict.predict.predictor import Predictor
from quantpredict.predict.quality import DEFAULT_PREDICTOR_DIR, Prediction, predict_quality
from quantpredict.predict.validate import (
    Validation,
    crossover,
    delta_metrics,
    group_splits,
    store_subsample_curve,
    subsample_curve,
    validate,
)

__all__ = [
    "DEFAULT_FEATURES", "DEFAULT_PREDICTOR_DIR", "KINDS", "Prediction", "Predictor", "PredictorError", "Validation",
    "crossover", "delta_metrics", "group_splits", "predict_quality", "store_subsample_curve", "subsample_curve",
    "validate",
]
