"""Post-training quantization: RTN, GPTQ, SmoothQuant, AWQ (each composable), activation fake-quant, in every format.

Modules: :mod:`.rtn`, :mod:`.gptq`, :mod:`.smoothquant`, :mod:`.awq`, :mod:`.act` (activation fake-quant hooks),
:mod:`.calib` (layer-input Hessians), :mod:`.model` (block-by-block :func:`quantize_model`, :class:`QuantReport`,
:func:`save_quantized`), :mod:`.checkpoint` (its per-block checkpoint, to resume an interrupted run). The
:class:`Recipe` lives in the torch-free :mod:`quantpredict.recipe` and is re-exported
here.

The names are imported from their modules on first use (PEP 562), so ``quantpredict.quantize.rtn`` and
``.direct`` load without torch's model code or transformers (the checkpoint-only RTN path needs neither).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantpredict.lazy import lazy_exports

#: every public name of the package -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("MIX_NAMES", "named_mix"), "quantpredict.mixes"),
    **dict.fromkeys(("ActQuantHandle", "has_act_quant", "install_act_quant", "install_act_quant_on",
                     "remove_act_quant"), "quantpredict.quantize.act"),
    **dict.fromkeys(("AwqClipReport", "AwqGroupReport", "apply_recorded_scales", "fold_scales", "search_clip",
                     "search_scales"), "quantpredict.quantize.awq"),
    **dict.fromkeys(("InputStats", "capture_linear_inputs", "collect_hessians", "sample_calibration"),
                    "quantpredict.quantize.calib"),
    **dict.fromkeys(("gptq_quantize", "layer_output_error", "relative_output_error"), "quantpredict.quantize.gptq"),
    **dict.fromkeys(("QUANT_CONFIG", "PlannedLayer", "SavedQuantization", "apply_saved_quantization",
                     "code_version", "layer_plan", "needs_calibration", "quantize_model", "quantized_linears",
                     "read_quantization", "save_quantized", "size_report"), "quantpredict.quantize.model"),
    **dict.fromkeys(("LayerReport", "QuantReport"), "quantpredict.quantize.report"),
    "keeps_head_and_embeddings": "quantpredict.quantize.plan",
    "rtn_quantize": "quantpredict.quantize.rtn",
    **dict.fromkeys(("apply_smoothing", "smoothing_scales"), "quantpredict.quantize.smoothquant"),
    **dict.fromkeys(("METHODS", "LayerRule", "Recipe", "mixed_recipe", "resolve_block_size"), "quantpredict.recipe"),
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # what type checkers and editors see: the eager imports the lazy table stands for
    from quantpredict.mixes import MIX_NAMES, named_mix  # noqa: F401
    from quantpredict.quantize.act import (  # noqa: F401
        ActQuantHandle,
        has_act_quant,
        install_act_quant,
        install_act_quant_on,
        remove_act_quant,
    )
    from quantpredict.quantize.awq import (  # noqa: F401
        AwqClipReport,
        AwqGroupReport,
        apply_recorded_scales,
        fold_scales,
        search_clip,
        search_scales,
    )
    from quantpredict.quantize.calib import (  # noqa: F401
        InputStats,
        capture_linear_inputs,
        collect_hessians,
        sample_calibration,
    )
    from quantpredict.quantize.gptq import gptq_quantize, layer_output_error, relative_output_error  # noqa: F401
    from quantpredict.quantize.model import (  # noqa: F401
        QUANT_CONFIG,
        PlannedLayer,
        SavedQuantization,
        apply_saved_quantization,
        code_version,
        layer_plan,
        needs_calibration,
        quantize_model,
        quantized_linears,
        read_quantization,
        save_quantized,
        size_report,
    )
    from quantpredict.quantize.plan import keeps_head_and_embeddings  # noqa: F401
    from quantpredict.quantize.report import LayerReport, QuantReport  # noqa: F401
    from quantpredict.quantize.rtn import rtn_quantize  # noqa: F401
    from quantpredict.quantize.smoothquant import apply_smoothing, smoothing_scales  # noqa: F401
    from quantpredict.recipe import METHODS, LayerRule, Recipe, mixed_recipe, resolve_block_size  # noqa: F401
