"""Predictors: from cheap features to the quality a quantized model will have, each number with an interval.

Every predictor is a :class:`SavedPredictor` (:mod:`.saved`: save, load by kind, validation metadata, ``describe``);
:data:`KIND_ROLES` lists the kinds and why each stays. Two classes fit them:

- :class:`PhysicsPredictor` (:mod:`.physics`), the KLD-first kinds: ``physics``, the default (the predictor shipped
  in ``data/predictors/default``), and ``profile``, which prices a recipe from weights alone and is what
  :func:`~quantpredict.predict.rank.rank_recipes` and :func:`~quantpredict.predict.allocate.allocate` use. They
  predict the KL divergence to the FP model, ``delta = NLL_quant - NLL_fp``, top-1 agreement and
  ``ppl = ppl_fp * exp(delta)`` on WikiText-2 test; :func:`~quantpredict.predict.targets.validate_targets`
  validates them.
- :class:`Predictor` (:mod:`.predictor`), the delta-only kinds ``ols``, ``rf``, ``gbm``, ``bits``, ``paper``
  (:data:`KINDS`): delta and perplexity; :func:`validate` runs leave-one-model-out / leave-one-family-out
  cross-validation of them, and :func:`subsample_curve` is the practitioner's baseline (evaluate only a prefix of
  the test windows).

:func:`predict_quality` computes a model's features on the fly and predicts with a saved predictor (the default
one unless told). Every quantized perplexity rests on the FP reference of :func:`resolve_fp_reference`
(:mod:`.fp_reference`: a measured FP perplexity with its SE; :func:`full_eval_cost` is the shared estimate of what a
full evaluation would cost). The pages that report validations are written by :mod:`quantpredict.report`; run
tables are read by :mod:`quantpredict.runs.table`.
"""

from __future__ import annotations

from quantpredict.errors import PredictorError
from quantpredict.predict.design import DEFAULT_FEATURES, KINDS
from quantpredict.predict.fp_reference import FPReference, full_eval_cost, resolve_fp_reference
from quantpredict.predict.physics import PHYSICS_KINDS, PhysicsPredictor
from quantpredict.predict.predictor import Predictor
from quantpredict.predict.quality import DEFAULT_PREDICTOR_DIR, Prediction, predict_quality
from quantpredict.predict.saved import KIND_ROLES, SavedPredictor
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
    "DEFAULT_FEATURES", "DEFAULT_PREDICTOR_DIR", "FPReference", "KINDS", "KIND_ROLES", "PHYSICS_KINDS",
    "PhysicsPredictor", "Prediction", "Predictor", "PredictorError", "SavedPredictor", "Validation", "crossover",
    "delta_metrics", "full_eval_cost", "group_splits", "predict_quality", "resolve_fp_reference",
    "store_subsample_curve", "subsample_curve", "validate",
]
