"""quantpredict: predict the quality a quantized LLM loses, before you ship it."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "predict_quality", "rank_recipes"]


def __getattr__(name: str):
    # lazy: ``import quantpredict`` stays light (no torch, sklearn or statsmodels until a prediction is asked for)
    if name == "predict_quality":
        from quantpredict.predict.quality import predict_quality

        return predict_quality
    if name == "rank_recipes":
        from quantpredict.predict.rank import rank_recipes

        return rank_recipes
    raise AttributeError(f"module 'quantpredict' has no attribute {name!r}")
