"""Loss-landscape features: cheap measurements that explain how much quality a quantized model loses.

``extract(model, recipe, calib_ids)`` returns every feature of :mod:`quantpredict.schema` by name; the
building blocks (``hvp``, ``hutchinson_trace``, ``top_eigenvalue``) work on any scalar loss closure.
"""

from __future__ import annotations

from quantpredict.features.context import ExtractOptions, parse_which
from quantpredict.features.extract import extract, feature_windows
from quantpredict.features.hessian import HessianOperator, hutchinson_trace, hvp, top_eigenvalue
from quantpredict.features.state import mean_nll
from quantpredict.schema import FEATURE_NAMES, FEATURES, GROUPS, TIMING_NAMES, FeatureSpec

__all__ = [
    "FEATURES", "FEATURE_NAMES", "GROUPS", "TIMING_NAMES", "ExtractOptions", "FeatureSpec", "HessianOperator",
    "extract", "feature_table_markdown", "feature_windows", "hutchinson_trace", "hvp", "mean_nll", "parse_which",
    "top_eigenvalue",
]


def feature_table_markdown() -> str:
    """The table of every feature (docs/workflow.md, "Features"): name, group, definition, cost (generated from the
    schema)."""
    rows = ["| feature | group | definition | cost |", "|---|---|---|---|"]
    for f in FEATURES:
        definition = f.definition.replace("|", r"\|")
        rows.append(f"| `{f.name}` | {f.group} | {definition} | {f.cost} |")
    return "\n".join(rows)
