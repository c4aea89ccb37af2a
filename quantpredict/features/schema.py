"""The feature schema lives in the torch-free :mod:`quantpredict.schema` (the run store reads it without loading
torch); this module keeps the ``quantpredict.features.schema`` path."""

from __future__ import annotations

from quantpredict.schema import FEATURE_NAMES, FEATURES, GROUPS, TIMING_NAMES, FeatureSpec

__all__ = ["FEATURES", "FEATURE_NAMES", "GROUPS", "TIMING_NAMES", "FeatureSpec"]
