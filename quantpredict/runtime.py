"""What a runtime does to activations: the formats an inference engine rounds the input of each linear layer to.

llama.cpp's CPU backend multiplies a quantized weight by integer codes: ``ggml_compute_forward_mul_mat`` first converts
the float32 input (``src1``) of every matmul to the weight type's ``vec_dot_type`` with that type's ``from_float``
(``type_traits_cpu`` in ggml/src/ggml-cpu/ggml-cpu.c of the pinned llama.cpp, llama-cpp-python 0.3.36). So a file
"as written" carries two errors, the weights' and this activation rounding; the weights dequantized to F32 carry
only the first (vec_dot_type F32: no rounding). :data:`LLAMA_CPP_CPU` is that table for the project's weight formats,
:func:`activation_formats` reads it per layer of a recipe, and :func:`install_runtime_act` applies it to a model as
run-time fake-quantization hooks (:func:`quantpredict.quantize.act.install_act_quant_on`).

=================================  ===============  ===================================================
weight type                        vec_dot_type     activation format here
=================================  ===============  ===================================================
Q4_0, Q5_0, Q8_0, IQ4_NL           Q8_0             ``q8_0_x86`` (blocks of 32)
Q4_1, Q5_1                         Q8_1             ``q8_0_x86`` (Q8_1's codes and d are Q8_0's)
Q2_K .. Q6_K, IQ4_XS               Q8_K             ``q8_k`` (blocks of 256)
F16 (``fp16``)                     F16              ``fp16`` (``ggml_cpu_fp32_to_fp16``: nearest even)
BF16 (``bf16``)                    BF16             ``bf16`` (``ggml_cpu_fp32_to_bf16``: nearest even)
=================================  ===============  ===================================================

Which code path, and what departs from llama.cpp (stated, not hidden):

- *x86 SIMD.* The formats are those of an x86 build with AVX/AVX2/AVX-512 (``GGML_NATIVE`` on this machine:
  AVX-512 and AMX): ``quantize_row_q8_0`` of ggml-cpu/arch/x86/quants.c (``127 / amax``, round half to even), which
  is not the reference ``quantize_row_q8_0_ref`` (``roundf``), and ``quantize_row_q8_K``, which on x86 *is* the
  reference (see :mod:`quantpredict.formats.ggml_act`). An ARM or scalar build is not modelled.
- *Repacked and AMX kernels.* By default (the CPU "extra" buffer types on), Q4_0, IQ4_NL and Q4_K weights (AVX2)
  and Q2_K weights (AVX-512) whose output count is a multiple of 8 are repacked, and their inputs are quantized
  four rows at a time by ``ggml_quantize_mat_q8_0_4x8`` / ``ggml_quantize_mat_q8_K_4x8`` (arch/x86/repack.cpp):
  ``127 / amax`` (Q8_K: ``±127 / amax``, the sign of the extreme) and nearest-even rounding, so the same values (read
  from the source, not run). The AMX kernels (amx/mmq.cpp: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_XS, when built
  with AMX) quantize inputs with the same ``quantize_row_q8_0``/``_q8_1`` and ``quantize_row_q8_K_ref`` (their
  ``quantize_row_q8_K_vnni`` is disabled). llamafile's tinyBLAS takes the inputs already converted.
- *Q8_1's block sum.* Q4_1/Q5_1 dot products add ``m * s`` with ``s = fp16(d * sum q)`` (float32 ``d``), where the
  fake-quantized values give ``fp16(d) * sum q``: an fp16 rounding of one block sum, not modelled.
- *Only the planned layers.* Layers a recipe leaves unquantized (and the output head, unless the recipe's
  ``head_format`` quantizes it: then its input is rounded as a linear's) are stored in 16 bits by
  :mod:`quantpredict.export` (F16 by default), so llama.cpp rounds their inputs to fp16 as well; they are not in a
  recipe's layer plan and get no hook here. The attention products (Q against the F16 KV cache) are rounded to
  fp16 by llama.cpp too, in the F32 reference file alike; not modelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from quantpredict.errors import RecipeError

if TYPE_CHECKING:  # the tables need no torch (the CLI reads them to build its options)
    from torch import nn

#: ``type_traits_cpu[weight type].vec_dot_type`` of the pinned ggml-cpu.c, by the project's weight format name
VEC_DOT_TYPE: Mapping[str, str] = MappingProxyType({
    "q4_0": "Q8_0", "q5_0": "Q8_0", "q8_0": "Q8_0", "iq4_nl": "Q8_0",
    "q4_1": "Q8_1", "q5_1": "Q8_1",
    "q2_k": "Q8_K", "q3_k": "Q8_K", "q4_k": "Q8_K", "q5_k": "Q8_K", "q6_k": "Q8_K", "iq4_xs": "Q8_K",
    "fp16": "F16", "bf16": "BF16",
})

#: the values the x86 CPU backend's ``from_float`` of each vec_dot_type gives, as a project format
_FROM_FLOAT: Mapping[str, tuple[str, int | None]] = MappingProxyType({
    "Q8_0": ("q8_0_x86", 32), "Q8_1": ("q8_0_x86", 32), "Q8_K": ("q8_k", 256),
    "F16": ("fp16", None), "BF16": ("bf16", None),
})

#: llama.cpp's CPU backend (x86): weight format -> the (format, block) its matmuls round the layer's input to
LLAMA_CPP_CPU: Mapping[str, tuple[str, int | None]] = MappingProxyType(
    {w: _FROM_FLOAT[v] for w, v in VEC_DOT_TYPE.items()})

#: every runtime by name: weight format -> activation format
RUNTIMES: Mapping[str, Mapping[str, tuple[str, int | None]]] = MappingProxyType({"llama.cpp-cpu": LLAMA_CPP_CPU})


def runtime_table(runtime: str) -> Mapping[str, tuple[str, int | None]]:
    """The weight format -> activation format table of ``runtime``; a :class:`RecipeError` naming the known ones."""
    try:
        return RUNTIMES[runtime]
    except (KeyError, TypeError):
        raise RecipeError(f"unknown runtime {runtime!r}; known runtimes: {', '.join(RUNTIMES)}") from None


def activation_format(weight_format: str, runtime: str = "llama.cpp-cpu") -> tuple[str, int | None]:
    """The ``(format, block)`` ``runtime`` rounds the input of a ``weight_format`` layer to; a :class:`RecipeError`
    for a weight format the runtime does not run (e.g. an MX or AutoGPTQ format on llama.cpp)."""
    table = runtime_table(runtime)
    if weight_format not in table:
        raise RecipeError(f"{runtime} runs no {weight_format!r} weights: its weight formats are "
                          f"{', '.join(table)} (a recipe priced for {runtime} must use them only)")
    return table[weight_format]


def activation_formats(model: nn.Module, recipe, runtime: str = "llama.cpp-cpu") -> list[tuple[str, int | None]]:
    """One ``(format, block)`` per layer of ``quantize.layer_plan(model, recipe)`` (in its order): what ``runtime``
    rounds that layer's input to, from the layer's weight format. A :class:`RecipeError` for an unknown runtime, a
    weight format the runtime does not run, or a recipe with an ``act_format`` of its own (the runtime decides)."""
    from quantpredict.quantize.plan import layer_plan

    runtime_table(runtime)
    if recipe.act_format is not None:
        raise RecipeError(f"{recipe.label} quantizes activations itself (act_format {recipe.act_format}); on "
                          f"{runtime} the runtime decides the activation formats: drop act_format")
    return [activation_format(p.weight_format, runtime) for p in layer_plan(model, recipe)]


@dataclass
class RuntimeActHandle:
    """The hooks :func:`install_runtime_act` registered, one group per activation format; ``remove()`` takes them
    all off. ``formats``: layer name -> its ``(format, block)``."""

    runtime: str
    formats: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    _groups: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for h in self._groups:
            h.remove()
        self._groups.clear()
        self.formats.clear()


def install_runtime_act(model: nn.Module, recipe, runtime: str = "llama.cpp-cpu") -> RuntimeActHandle:
    """Fake-quantize the input of every layer ``recipe`` quantizes to the format ``runtime`` rounds it to
    (:func:`activation_formats`), as forward pre-hooks on the layers (replacing any earlier act-quant hook on them),
    the LM head's too where the recipe quantizes it (``head_format``; ``formats`` names it ``lm_head``). The
    weights are left as they are: apply the recipe's weights separately. Returns the handle."""
    from quantpredict import arch
    from quantpredict.quantize.act import install_act_quant_on
    from quantpredict.quantize.plan import embedding_and_head_plan, layer_plan

    formats = activation_formats(model, recipe, runtime)
    plan = layer_plan(model, recipe)
    refs = [p.ref for p in plan]
    # a quantized head is a quantized matmul too (its input rounded like a linear's); the embedding is a row
    # lookup (dequantized rows, no activation)
    for m in embedding_and_head_plan(model, recipe):
        if m.role != "embedding":
            refs.append(arch.LinearRef("lm_head", arch.head(model), len(arch.blocks(model))))
            formats.append(activation_format(m.weight_format, runtime))
    handle = RuntimeActHandle(runtime, {r.name: fb for r, fb in zip(refs, formats, strict=True)})
    for fb in dict.fromkeys(formats):  # one group per format, in first-seen order
        group = [r for r, g in zip(refs, formats) if g == fb]
        handle._groups.append(install_act_quant_on(group, fb[0], fb[1]))
    return handle
