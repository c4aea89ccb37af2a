"""QAT as a recipe option: ``Recipe(..., qat=True)`` is QAT from the recipe's PTQ ``method`` (RTN or GPTQ), with
``qat_steps`` AdamW steps at ``qat_lr`` on batches of ``qat_batch_size`` of the recipe's calibration windows.

Its label reads ``qat`` (from RTN) or ``qat_gptq`` (from GPTQ) in the method segment, so the run store's ``method``
column tells QAT runs apart (:attr:`quantpredict.recipe.Recipe.method_name`). Running a QAT recipe is
:func:`quantpredict.qat.finetune.run_qat` (this module names and saves QAT runs; it never imports the trainer).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from quantpredict.errors import RecipeError
from quantpredict.recipe import Recipe

# run-store method -> the PTQ method QAT starts from
QAT_METHODS: dict[str, str] = {"qat": "rtn", "qat_gptq": "gptq"}

# the settings of a stored QAT run (and the CLI's defaults): the Recipe's
DEFAULT_STEPS = Recipe("int4").qat_steps
DEFAULT_LR = Recipe("int4").qat_lr
DEFAULT_BATCH_SIZE = Recipe("int4").qat_batch_size


def is_qat_method(method: str) -> bool:
    return method in QAT_METHODS


def init_of(method: str) -> str:
    """The PTQ init of a QAT method name (``qat`` -> ``rtn``, ``qat_gptq`` -> ``gptq``)."""
    try:
        return QAT_METHODS[method]
    except KeyError:
        raise RecipeError(f"unknown QAT method {method!r}; valid: {', '.join(QAT_METHODS)}") from None


def method_of(init: str) -> str:
    """The run-store method name of QAT from ``init`` (``rtn`` -> ``qat``, ``gptq`` -> ``qat_gptq``)."""
    return qat_recipe(Recipe("int4"), init).method_name


def qat_recipe(recipe: Recipe, init: str, **options) -> Recipe:
    """``recipe`` as QAT from ``init`` (``rtn`` or ``gptq``); ``options`` set ``qat_steps``/``qat_lr``/..."""
    return dataclasses.replace(recipe, method=init, qat=True, **options)


def qat_label(recipe: Recipe, init: str) -> str:
    """The label of QAT from ``init`` with ``recipe``'s other options (its method segment ``qat``/``qat_gptq``)."""
    return qat_recipe(recipe, init).label


def save_qat(model: nn.Module, result, out_dir, tokenizer=None):
    """Save a QAT model with :func:`quantpredict.quantize.save_quantized`, then note the QAT run in its config.

    ``quantization.json`` keeps the init's recipe (so loading re-installs any activation quantization), with
    ``label`` set to the QAT label and a ``qat`` entry holding :meth:`QATResult.summary` and the loss curve.
    Returns the directory.
    """
    import json

    from quantpredict.quantize import QUANT_CONFIG, save_quantized

    recipe = dataclasses.replace(result.recipe, method=result.init, qat=False)
    out = save_quantized(model, recipe, result.init_report, out_dir, tokenizer=tokenizer)
    meta = json.loads((out / QUANT_CONFIG).read_text())
    meta["label"] = result.label
    meta["qat"] = {**result.summary(), "losses": list(result.losses)}
    (out / QUANT_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out
