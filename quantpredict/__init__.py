"""quantpredict: predict the quality a quantized LLM loses, before you ship it.

Imports run one way, lowest first; a module imports its own layer or those below, never one above (lazy,
in-function imports included), and no two modules import each other (``tests/test_layering.py`` checks all three):

1. ``errors``, ``version``, ``threads``, ``files``, ``lazy``: the user-facing exception types; the package and
   run-key versions; torch's thread count for one call; output paths checked before any work, files written with
   the umask; packages that import a name's module on first use;
2. ``schema``, ``memory``, ``claims``, ``style``: torch-free utilities (feature names, memory budgets, verdict
   helpers, the figure look);
3. ``formats``, ``arch``, ``data``, ``lmhead``: number formats, model architectures, text and windows;
4. ``recipe``, ``mixes``: the Recipe and llama.cpp's named mixes (torch-free: the run store reads recipes);
5. ``gguf_names``, ``imatrix``: llama.cpp's tensor names of a model's layers, and its importance matrices (files,
   per-layer weights, computed on calibration text);
6. ``quantize``, ``evaluate``, ``runtime``: post-training quantization, perplexity / KLD comparison, and a
   runtime's own activation rounding (llama.cpp's CPU backend);
7. ``features``, ``models``, ``qat``, ``attention``, ``safetensors_stream``: predictor features, model loading and
   the zoo, QAT (the method), attention arithmetic, safetensors files mapped and written one tensor at a time;
8. ``runs``: the run store and sweeps (QAT only through the Recipe and ``runs.execute.PROCEDURES``); ``export``: a
   model under an RTN recipe of llama.cpp types as a GGUF file; ``checkpoint_rtn``: data-free RTN of a checkpoint's
   files without building the model (no transformers);
9. ``predict``; 10. ``report`` (the run store's figures and page);
11. ``studies``: the seed studies and their report pages (only the CLI imports them);
12. ``cli`` (and ``__main__``).
"""

from __future__ import annotations

from quantpredict.version import __version__

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
