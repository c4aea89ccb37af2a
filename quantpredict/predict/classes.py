"""The method class of a stored run: the groups issue #28 validates and calibrates separately.

:data:`METHOD_CLASSES`, in the order reports print them:

- ``weight+activation``: any recipe with an activation format (with or without SmoothQuant, any weight method);
- ``AWQ``: activation-aware scaling before RTN or GPTQ (``-awq`` in the label);
- ``named mix``: a per-layer recipe (``-L=`` in the label) whose every layer is in one of llama.cpp's types or
  left at 16 bits, which is what ``q4_k_m``, ``q5_k_m``, ``q3_k_m`` ... resolve to (their fallback types
  included). An allocation restricted to llama.cpp's types (``allocate --match q4_k_m``) lands here too: it is
  priced and measured exactly like a named mix, and nothing in a stored run says which of the two made it;
- ``allocated mix``: any other per-layer recipe (``allocate``'s MX and INT mixes);
- ``GPTQ`` and ``RTN``: one format for every layer, by the method that rounded it (QAT runs go with their
  initialisation's method).

The classes read the run's stored columns only (``recipe``, ``method``, ``act_format``): no model is loaded.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

#: every class, in the order reports print their rows
METHOD_CLASSES = ("RTN", "GPTQ", "AWQ", "named mix", "allocated mix", "weight+activation")
#: the per-layer "formats" a llama.cpp file keeps at 16 bits (the mixes' fallback for rows no block tiles)
_SIXTEEN_BIT = frozenset({"fp16", "bf16", "f16", "skip"})


def is_set(value: object) -> bool:
    """Whether a recipe column holds a value: not None, NaN, or an empty / "none" / "nan" string (how a stored
    frame spells an unset ``act_format`` or ``smoothquant_alpha``)."""
    return value is not None and str(value).strip().lower() not in ("", "none", "nan")


def _layer_formats(label: str) -> list[str]:
    """The formats of a label's ``-L=`` list (``...-L=q5_0*6,fp16,mxint4_b64`` -> ``[q5_0, fp16, mxint4]``)."""
    from quantpredict.errors import QuantpredictError
    from quantpredict.recipe import Recipe

    try:
        return [fmt for fmt, _ in Recipe.from_label(label).layer_formats or ()]
    except QuantpredictError:  # a label this version does not parse (an unknown format): read the list's text
        text = label.split("-L=", 1)[1].split("-", 1)[0]
        return [re.sub(r"_b\d+$", "", e.split("*", 1)[0]) for e in text.split(",") if e]


def method_class(run: pd.Series | dict) -> str:
    """The method class (:data:`METHOD_CLASSES`) of one run, from its ``recipe``, ``method`` and ``act_format``:
    activation quantization first, then AWQ, then a per-layer recipe (named mix or allocation), then GPTQ or RTN."""
    from quantpredict.formats.table import GGML_TYPE_ID

    recipe = str(run.get("recipe", ""))
    if is_set(run.get("act_format")):
        return "weight+activation"
    if "-awq" in recipe:
        return "AWQ"
    if "-L=" in recipe:
        llama = set(GGML_TYPE_ID) | _SIXTEEN_BIT
        return "named mix" if all(f in llama for f in _layer_formats(recipe)) else "allocated mix"
    return "GPTQ" if str(run.get("method", "")) in ("gptq", "qat_gptq") else "RTN"


def method_classes(runs: pd.DataFrame) -> np.ndarray:
    """:func:`method_class` of every row of ``runs`` (``[n_runs]`` object array, in row order). Each distinct
    (``recipe``, ``method``, ``act_format``) is classified once: the predictors call this on every fit and predict,
    and a store repeats a few hundred recipes over thousands of runs."""
    if runs.empty:
        return np.array([], dtype=object)
    cols = [c for c in ("recipe", "method", "act_format") if c in runs]
    keys = list(zip(*(runs[c].astype(str) for c in cols))) if cols else [()] * len(runs)
    found = {k: method_class(dict(zip(cols, k))) for k in dict.fromkeys(keys)}
    return np.array([found[k] for k in keys], dtype=object)
