"""Post-training quantization: RTN, GPTQ, SmoothQuant, AWQ (each composable), activation fake-quant, in every format.

Modules: :mod:`.rtn`, :mod:`.gptq`, :mod:`.smoothquant`, :mod:`.awq`, :mod:`.act` (activation fake-quant hooks),
:mod:`.calib` (layer-input Hessians), :mod:`.model` (block-by-block :func:`quantize_model`, :class:`QuantReport`,
:func:`save_quantized`), :mod:`.checkpoint` (its per-block checkpoint, to resume an interrupted run). The
:class:`Recipe` lives in the torch-free :mod:`quantpredict.recipe` and is re-exported
here.
"""

from __future__ import annotations

from quantpredict.mixes import MIX_NAMES, named_mix
from quantpredict.quantize.act import (
    ActQuantHandle,
    has_act_quant,
    install_act_quant,
    install_act_quant_on,
    remove_act_quant,
)
from quantpredict.quantize.awq import (
    AwqClipReport,
    AwqGroupReport,
    apply_recorded_scales,
    fold_scales,
    search_clip,
    search_scales,
)
from quantpredict.quantize.calib import InputStats, capture_linear_inputs, collect_hessians, sample_calibration
from quantpredict.quantize.gptq import gptq_quantize, layer_output_error, relative_output_error
from quantpredict.quantize.model import (
    QUANT_CONFIG,
    LayerReport,
    PlannedLayer,
    QuantReport,
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
from quantpredict.quantize.plan import keeps_head_and_embeddings
from quantpredict.quantize.rtn import rtn_quantize
from quantpredict.quantize.smoothquant import apply_smoothing, smoothing_scales
from quantpredict.recipe import METHODS, LayerRule, Recipe, mixed_recipe, resolve_block_size

__all__ = [
    "ActQuantHandle",
    "AwqClipReport",
    "AwqGroupReport",
    "InputStats",
    "LayerReport",
    "LayerRule",
    "PlannedLayer",
    "METHODS",
    "MIX_NAMES",
    "QUANT_CONFIG",
    "QuantReport",
    "Recipe",
    "SavedQuantization",
    "apply_recorded_scales",
    "apply_saved_quantization",
    "apply_smoothing",
    "capture_linear_inputs",
    "code_version",
    "collect_hessians",
    "fold_scales",
    "gptq_quantize",
    "has_act_quant",
    "install_act_quant",
    "install_act_quant_on",
    "keeps_head_and_embeddings",
    "layer_output_error",
    "layer_plan",
    "mixed_recipe",
    "named_mix",
    "needs_calibration",
    "quantize_model",
    "quantized_linears",
    "read_quantization",
    "relative_output_error",
    "remove_act_quant",
    "resolve_block_size",
    "rtn_quantize",
    "sample_calibration",
    "save_quantized",
    "search_clip",
    "search_scales",
    "size_report",
    "smoothing_scales",
]
