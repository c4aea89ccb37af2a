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
* :mod:`~quantpredict.arch.finite`: the NaN/Inf check of weights (:func:`check_finite_tensors`);
* :mod:`~quantpredict.arch.execution`: block-by-block execution (:func:`capture_block_inputs`, :func:`run_block`,
  the bounded-memory variants, :func:`input_hooks`).

Everything is used as ``arch.<name>``; this package re-exports it, lazily: a name is imported from its module on
first use (PEP 562), so ``quantpredict.arch.table`` can be read without importing torch or transformers (what the
checkpoint-only RTN path, :mod:`quantpredict.quantize.direct`, needs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantpredict.lazy import lazy_exports

#: every public name of the package -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("BlockInputs", "PerBlock", "batch_kwargs", "block_kwargs", "capture_block_input_batches",
                     "capture_block_inputs", "capture_block_kwargs", "input_hooks", "linears_of", "run_block"),
                    "execution"),
    **dict.fromkeys(("LINEAR_TYPES", "find_block_list", "generic_adapter"), "generic"),
    "check_finite_tensors": "finite",
    **dict.fromkeys(("LinearRef", "ScaleGroup", "SmoothPair", "adapter", "awq_groups", "block_linears", "blocks",
                     "check_finite", "embedding_modules", "family", "final_norm", "head", "head_is_tied",
                     "hidden_size", "iter_block_linears", "linear_layers", "logit_softcap", "logits",
                     "max_positions", "model_device", "non_embedding_parameters", "require_scale_folds",
                     "require_smoothquant", "smooth_pairs", "smoothquant_supported"), "layers"),
    **dict.fromkeys(("SUPPORTED_FAMILIES", "Adapter", "Condition", "GenericArchitectureWarning", "LinearFold",
                     "architecture_table"), "table"),
}
#: the tests' old names: arch._ADAPTERS is table.ADAPTERS, arch._get is table.module_at
_ALIASES = {"_ADAPTERS": (f"{__name__}.table", "ADAPTERS"), "_get": (f"{__name__}.table", "module_at")}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, {**{k: f"{__name__}.{v}" for k, v in _EXPORTS.items()}, **_ALIASES})


if TYPE_CHECKING:  # what type checkers and editors see: the eager imports the lazy table stands for
    from quantpredict.arch.execution import (  # noqa: F401
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
    from quantpredict.arch.finite import check_finite_tensors  # noqa: F401
    from quantpredict.arch.generic import LINEAR_TYPES, find_block_list, generic_adapter  # noqa: F401
    from quantpredict.arch.layers import (  # noqa: F401
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
    from quantpredict.arch.table import (  # noqa: F401
        SUPPORTED_FAMILIES,
        Adapter,
        Condition,
        GenericArchitectureWarning,
        LinearFold,
        architecture_table,
    )
