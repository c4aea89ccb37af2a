"""The one place that knows model architectures.

For a Hugging Face causal LM this package gives its transformer blocks, each block's linear layers (weights always
seen as ``[out, in]``, GPT-2's ``Conv1D`` included), the norm -> linear pairs that SmoothQuant folds scales into,
the embedding and the head, and block-by-block execution for calibration. ``quantize``, ``features`` and ``qat``
walk models only through here: a new architecture is one entry in the table of adapters.

* :mod:`~quantpredict.arch.table`: the table (``ADAPTERS``, one :class:`Adapter` row per model type and config
  layout, and the supported and refused model types);
* :mod:`~quantpredict.arch.layers`: the layer-walking API (:func:`adapter`, :func:`blocks`, :func:`linear_layers`,
  :func:`smooth_pairs`, :func:`awq_groups`, :func:`head` ...) and model-level facts (:func:`hidden_size`,
  :func:`model_device`, :func:`max_positions` ...);
* :mod:`~quantpredict.arch.generic`: the generic walk of a model type the table does not have
  (:func:`generic_adapter`);
* :mod:`~quantpredict.arch.execution`: block-by-block execution (:func:`capture_block_inputs`, :func:`run_block`,
  the bounded-memory variants, :func:`input_hooks`).

Everything is used as ``arch.<name>``; this package re-exports it.
"""

from __future__ import annotations

from quantpredict.arch.execution import (
    BlockInputs,
    PerBlock,
    batch_kwargs,
    block_kwargs,
    capture_block_input_batches,
    capture_block_inputs,
    capture_block_kwargs,
    input_hooks,
    linears_of,
    run_block,
)
from quantpredict.arch.generic import find_block_list, generic_adapter
from quantpredict.arch.layers import (
    LinearRef,
    ScaleGroup,
    SmoothPair,
    adapter,
    awq_groups,
    block_linears,
    blocks,
    check_finite,
    embedding_modules,
    family,
    final_norm,
    head,
    head_is_tied,
    hidden_size,
    iter_block_linears,
    linear_layers,
    logit_softcap,
    logits,
    max_positions,
    model_device,
    non_embedding_parameters,
    require_scale_folds,
    require_smoothquant,
    smooth_pairs,
    smoothquant_supported,
)
from quantpredict.arch.table import ADAPTERS as _ADAPTERS  # noqa: F401 - the tests read the table by its old name
from quantpredict.arch.table import (
    LINEAR_TYPES,
    SUPPORTED_FAMILIES,
    Adapter,
    Condition,
    GenericArchitectureWarning,
    LinearFold,
    architecture_table,
)
from quantpredict.arch.table import module_at as _get  # noqa: F401 - the tests' old name for it

__all__ = [
    "LINEAR_TYPES", "SUPPORTED_FAMILIES", "Adapter", "BlockInputs", "Condition", "GenericArchitectureWarning",
    "LinearFold", "LinearRef", "PerBlock", "ScaleGroup", "SmoothPair", "adapter", "architecture_table", "awq_groups",
    "batch_kwargs", "block_kwargs", "block_linears", "blocks", "capture_block_input_batches", "capture_block_inputs",
    "iter_block_linears",
    "capture_block_kwargs", "check_finite", "embedding_modules", "family", "final_norm", "find_block_list",
    "generic_adapter", "head", "head_is_tied", "hidden_size", "input_hooks", "linear_layers", "linears_of",
    "logit_softcap", "logits",
    "max_positions", "model_device", "non_embedding_parameters", "require_scale_folds", "require_smoothquant",
    "run_block", "smooth_pairs", "smoothquant_supported",
]
