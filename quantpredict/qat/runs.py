"""QAT as a run-store method: ``qat`` (QAT from RTN) and ``qat_gptq`` (QAT from GPTQ).

The run store keys runs by recipe label. A QAT run's label is the init recipe's label with the method segment
replaced (``mxint4-rtn`` -> ``mxint4-qat``, ``int3-gptq`` -> ``int3-qat_gptq``); the hyper-parameters are this
module's defaults, which are part of the code version (change them and bump ``runs.spec.CODE_VERSION``).
"""

from __future__ import annotations

from torch import nn

from quantpredict.quantize.recipe import Recipe

# run-store method -> the PTQ method QAT starts from
QAT_METHODS: dict[str, str] = {"qat": "rtn", "qat_gptq": "gptq"}

# the settings of a stored QAT run (and the CLI's defaults)
DEFAULT_STEPS = 200
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 8


def is_qat_method(method: str) -> bool:
    return method in QAT_METHODS


def init_of(method: str) -> str:
    """The PTQ init of a QAT method name (``qat`` -> ``rtn``, ``qat_gptq`` -> ``gptq``)."""
    try:
        return QAT_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown QAT method {method!r}; valid: {', '.join(QAT_METHODS)}") from None


def method_of(init: str) -> str:
    """The run-store method name of QAT from ``init`` (``rtn`` -> ``qat``, ``gptq`` -> ``qat_gptq``)."""
    for method, i in QAT_METHODS.items():
        if i == init:
            return method
    raise ValueError(f"unknown QAT init {init!r}; valid: {', '.join(QAT_METHODS.values())}")


def qat_label(recipe: Recipe, init: str) -> str:
    """``recipe``'s label with its method segment (always the second) replaced by the QAT method of ``init``."""
    parts = recipe.label.split("-")
    parts[1] = method_of(init)
    return "-".join(parts)


def run_qat(model: nn.Module, method: str, recipe: Recipe, calib_ids, *, batch_size: int = DEFAULT_BATCH_SIZE,
            steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, progress: bool = False):
    """QAT of ``model`` in place for a run of method ``qat``/``qat_gptq``; returns the :class:`QATResult`.

    ``recipe`` is the run's recipe (its method is ignored). The result's ``summary()`` is what the store keeps as the
    run's quantization summary.
    """
    from quantpredict.qat.finetune import finetune

    return finetune(model, recipe, calib_ids, steps=steps, lr=lr, batch_size=batch_size, init=init_of(method),
                    seed=recipe.seed, progress=progress)


def save_qat(model: nn.Module, result, out_dir, tokenizer=None):
    """Save a QAT model with :func:`quantpredict.quantize.save_quantized`, then note the QAT run in its config.

    ``quantization.json`` keeps the init's recipe (so loading re-installs any activation quantization), with
    ``label`` set to the QAT label and a ``qat`` entry holding :meth:`QATResult.summary` and the loss curve.
    Returns the directory.
    """
    import json

    from quantpredict.quantize import QUANT_CONFIG, save_quantized

    recipe = result.recipe if result.recipe.method == result.init else _with_method(result.recipe, result.init)
    out = save_quantized(model, recipe, result.init_report, out_dir, tokenizer=tokenizer)
    meta = json.loads((out / QUANT_CONFIG).read_text())
    meta["label"] = result.label
    meta["qat"] = {**result.summary(), "losses": list(result.losses)}
    (out / QUANT_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def _with_method(recipe: Recipe, method: str) -> Recipe:
    import dataclasses

    return dataclasses.replace(recipe, method=method)
