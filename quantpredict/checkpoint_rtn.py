"""Data-free RTN straight from a checkpoint's files: each linear weight read from the safetensors, rounded, and the
model directory written, without building the model.

Why: ``quantpredict quantize --method rtn`` spent most of its time around the rounding, not in it. On SmolLM2-135M
(AMD EPYC, one thread) the whole command took 8 s, of which the rounding was 0.6 s: importing transformers and its
model code took about 3 s, building the model 0.5 s and re-serializing it 0.7 s. llama-quantize does the same job
in 2-7 s, and issue #30 asks for every type within 3x of it. This path imports neither transformers nor the model
code (the files are mapped and written as numpy arrays by :mod:`quantpredict.safetensors_stream`), imports torch
only for a format the C kernel does not round whole (all but the one-pass llama.cpp types and Q3_K-Q6_K), and
rounds no tensor but the linear weights, one at a time as the output is written.

**The same result as the model path, bit for bit** (``tests/test_checkpoint_rtn.py`` compares it with
:func:`~quantpredict.quantize.model.quantize_model` + :func:`~quantpredict.quantize.model.save_quantized` per
family): each weight is upcast to float32 and rounded as :func:`~quantpredict.quantize.rtn.rtn_quantize` rounds
it (the llama.cpp types of ``native.WHOLE_BLOCKS`` by C kernels, with the relative error summed in the same pass),
written back in the checkpoint's dtype; every other tensor is copied as stored; the report (per-layer relative weight
error, sizes) and ``quantization.json`` are the model path's. What differs is only what transformers would
re-serialize: ``config.json``, ``generation_config.json`` and the tokenizer files are copied as they are, not
re-written (the same settings), and the weights go to one ``model.safetensors``.

**When it is taken** (:func:`direct_plan` says why not otherwise, and the caller builds the model instead):

* the recipe is plain RTN (no SmoothQuant, AWQ, calibration pass or imatrix) of the linear layers alone (not a
  named mix's ``-file`` form, which also quantizes the embedding and head);
* the model type is one of :data:`DIRECT_TYPES` (one adapter row, ``nn.Linear`` layers stored ``[out, in]``, no
  persistent buffers), and every linear sits in the checkpoint at ``<blocks>.<i>.<linear>.weight`` for each of the
  config's ``num_hidden_layers`` blocks;
* the weights are safetensors, every floating tensor in the dtype the config records (what
  ``models.load(dtype="auto")`` keeps), every key a ``.weight`` or ``.bias`` under the model or its head, and the
  head is stored exactly when the config says the embeddings are not tied.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from quantpredict.recipe import Recipe

#: model types whose checkpoints this path reads: llama-layout rows of ``arch.table.ADAPTERS`` without conditions
DIRECT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
#: the files of a model directory besides its weights that a saved model carries (as transformers writes them)
CARRIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                 "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                 "sentencepiece.bpe.model")
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class CheckpointLinear:
    """One linear layer as the checkpoint stores it: its module name (``model.layers.0.self_attn.q_proj``, as
    ``arch.linear_layers`` names it), its path inside the block, its tensor key, its block and its ``[out, in]``
    shape."""

    name: str
    path: str  # inside its block: self_attn.q_proj
    key: str
    block_index: int
    out_features: int
    in_features: int


@dataclass(frozen=True)
class CheckpointPlan:
    """What the direct path needs of a model directory, from its config and safetensors headers alone.

    ``linears``: every linear layer in ``arch.linear_layers`` order; ``files``: the safetensors files;
    ``total_params``: the model's parameter count (a tied head counted once, as ``model.parameters()``
    does); ``n_gqa``: attention heads per key/value head."""

    path: Path
    family: str
    linears: tuple[CheckpointLinear, ...]
    files: tuple[Path, ...]
    total_params: int
    n_gqa: int


def _mix_is_file(mix: str | None) -> bool:
    from quantpredict.mixes import is_file_spec

    return mix is not None and is_file_spec(mix)


def recipe_problem(recipe: Recipe, *, mix: str | None = None, output_errors: bool = False,
                   imatrix: Any = None) -> str | None:
    """Why ``recipe`` (or named ``mix``) needs the model path, or ``None`` when the checkpoint's files suffice."""
    if recipe.method != "rtn":
        return f"method {recipe.method} calibrates"
    if recipe.smoothquant_alpha is not None or recipe.awq:
        return "SmoothQuant and AWQ calibrate"
    if output_errors:
        return "output errors need a calibration pass"
    if imatrix is not None:
        return "an imatrix is read against the model's layers"
    if recipe.embedding_format is not None or recipe.head_format is not None or _mix_is_file(mix):
        return "the embedding and head are quantized too"
    return None


def direct_plan(path: str | Path) -> CheckpointPlan | str:
    """The :class:`CheckpointPlan` of the model directory ``path`` (already resolved and checked by
    ``models.check_model_dir``), or a sentence saying why its files alone do not determine the model path's result
    (see the module docstring)."""
    from quantpredict.arch.table import ADAPTERS
    from quantpredict.mixes import gqa_ratio
    from quantpredict.models.checks import safetensors_header, weight_files
    from quantpredict.quantize.report import QUANT_CONFIG

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"config.json unreadable ({exc})"
    model_type = config.get("model_type")
    if model_type not in DIRECT_TYPES or len(ADAPTERS.get(model_type, ())) != 1 or ADAPTERS[model_type][0].when:
        return f"model type {model_type!r} is not among {', '.join(DIRECT_TYPES)}"
    if (path / QUANT_CONFIG).exists():
        return "the directory is itself a quantized model"
    archs = config.get("architectures") or []
    if archs and not any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "not a causal LM checkpoint"
    ad = ADAPTERS[model_type][0]
    files = weight_files(path)
    if any(f.suffix != ".safetensors" for f in files):
        return "the weights are not safetensors"
    info = {k: v for f in files for k, v in safetensors_header(f).items()}
    want = config.get("dtype") or config.get("torch_dtype") or "float32"
    want = _SAFETENSORS_DTYPES.get(str(want))
    if want is None:
        return f"the config's dtype {config.get('dtype') or config.get('torch_dtype')!r} is not float32/bf16/fp16"
    other = sorted({t["dtype"] for t in info.values() if t["dtype"] in _FLOAT_DTYPES} - {want})
    if other:
        return f"tensors stored as {', '.join(other)}, the config says {want}"
    root, head_key = ad.blocks.split(".")[0], f"{ad.head}.weight"
    stray = [k for k in info if not (k.startswith(f"{root}.") or k == head_key) or not k.endswith((".weight", ".bias"))]
    if stray:
        return f"tensor {stray[0]!r} is not one the model keeps"
    tied = config.get("tie_word_embeddings", True) is not False
    if (head_key in info) == tied:
        return "the head is stored although tied" if tied else "the untied head is not stored"
    n_blocks = config.get("num_hidden_layers")
    if not isinstance(n_blocks, int) or n_blocks < 1:
        return "the config gives no num_hidden_layers"
    if any(k.startswith(f"{ad.blocks}.{n_blocks}.") for k in info):
        return "the checkpoint holds more blocks than the config"
    linears = []
    for i in range(n_blocks):
        for sub in ad.linears:
            key = f"{ad.blocks}.{i}.{sub}.weight"
            if key not in info or len(info[key]["shape"]) != 2:
                return f"no 2-D {key} in the checkpoint"
            out_f, in_f = (int(x) for x in info[key]["shape"])
            linears.append(CheckpointLinear(f"{ad.blocks}.{i}.{sub}", sub, key, i, out_f, in_f))
    total = sum(math.prod(int(x) for x in t["shape"]) for t in info.values())
    n_gqa = gqa_ratio(SimpleNamespace(config=SimpleNamespace(**config)))  # it reads model.config.<attribute>
    return CheckpointPlan(path, ad.family, tuple(linears), tuple(files), total, n_gqa)


def resolve_recipe(plan: CheckpointPlan, recipe: Recipe, mix: str | None) -> Recipe:
    """``recipe``, or the named ``mix`` with ``recipe``'s options resolved for the plan's layers (what
    ``mixes.named_mix`` gives the built model)."""
    if mix is None:
        return recipe
    from quantpredict.mixes import Slot, mix_base, slots_mix, tensor_role

    found, base = mix_base(mix, recipe)
    slots = [Slot(q.name, tensor_role(q.path), q.block_index, q.in_features) for q in plan.linears]
    return slots_mix(found, base, slots, plan.family, plan.n_gqa)


def quantize_checkpoint(plan: CheckpointPlan, recipe: Recipe, out_dir: str | Path, *, progress: bool = True,
                        threads: int | None = None):
    """Quantize the checkpoint of ``plan`` by ``recipe`` (plain RTN, resolved per layer) and write the model
    directory ``out_dir`` (a new one appears whole or not at all). Returns the
    :class:`~quantpredict.quantize.report.QuantReport` the model path gives, output errors not measured.
    ``threads``: the rounding's threads (``None``: :func:`quantpredict.threads.default_threads` for the C kernel,
    torch's own count for torch).

    One tensor at a time: the source files are mapped without a copy
    (:func:`~quantpredict.safetensors_stream.mapped_arrays`), each tensor is checked for NaN/Inf, rounded if it is
    a planned linear weight, and written at once (:func:`~quantpredict.safetensors_stream.write_streamed`), so
    memory holds one rounded layer besides the mapped pages. A NaN found part-way leaves no folder, as before any
    work (``files.staged_dir``). The report's ``total_seconds`` includes the writing, which the rounding is
    interleaved with (the model path's excludes its save).

    **Torch is imported only for a layer that needs it.** The tensors are numpy arrays over the mapping, and the
    llama.cpp types the C kernel quantizes whole (:data:`~quantpredict.formats.native.WHOLE_BLOCKS`: the one-pass
    types and the K types Q3_K-Q6_K) round in it through ctypes; any other format goes to
    :func:`~quantpredict.quantize.rtn.rtn_quantize` on a torch view of the same memory. Importing torch takes about
    1 s, most of a 135M model's whole quantization."""
    import numpy as np
    from tqdm.auto import tqdm

    from quantpredict.arch.finite import nonfinite_error
    from quantpredict.files import honour_umask, staged_dir
    from quantpredict.formats import get_format, native
    from quantpredict.quantize.report import (
        QUANT_CONFIG,
        LayerReport,
        QuantReport,
        quantization_json,
        quantization_meta,
        size_fields,
    )
    from quantpredict.safetensors_stream import (
        FLOAT_DTYPES,
        file_order,
        from_float32,
        mapped_arrays,
        to_float32,
        write_streamed,
    )
    from quantpredict.threads import default_threads, torch_threads
    from quantpredict.version import build_version

    kernel_threads = threads or default_threads()
    formats = recipe.layer_formats_for([q.name for q in plan.linears])  # a per-layer list of the wrong length fails
    specs, source = {}, {}
    for f in plan.files:
        file_specs, arrays = mapped_arrays(f)
        specs |= file_specs
        source |= arrays
    planned = {q.key: (q, fb) for q, fb in zip(plan.linears, formats, strict=True) if fb is not None}
    for q, (fmt, block) in planned.values():  # a layout a layer's rows cannot take: before any work, not part-way
        f = get_format(fmt)
        f.check_block(block)
        f.check_row_length(q.in_features)
    nan = float("nan")
    layers: dict[str, LayerReport] = {}
    q_bits, q_params = 0.0, 0

    # the llama.cpp types the C kernel quantizes whole (one-pass types, Q3_K-Q6_K) round, check and measure each layer
    # in one pass, into one buffer that every such layer reuses (a fresh one per layer cost a page fault per 4 KiB:
    # a second at 1.5B)
    whole = {k for k, (q, (fmt, block)) in planned.items() if fmt in native.WHOLE_BLOCKS
             and block in (None, native.WHOLE_BLOCKS[fmt]) and q.in_features % native.WHOLE_BLOCKS[fmt] == 0}
    whole = whole if native.available() else set()
    scratch = np.empty(max((planned[k][0].out_features * planned[k][0].in_features for k in whole), default=0),
                       dtype=np.float32)
    if set(planned) - whole:
        import torch  # noqa: F401 - imported before the clock starts: the report times the rounding, not the import

    t_start = time.perf_counter()

    def refuse_nonfinite(key: str, x: np.ndarray) -> None:
        """The error naming ``key`` where the float array ``x`` holds NaN or Inf."""
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise nonfinite_error(key, bad, x.size)

    def round_layer(key: str, w: np.ndarray, fmt: str, block: int | None) -> tuple[np.ndarray, float]:
        """``(w_q, relative error)`` of one float32 weight, what ``rtn_quantize`` and ``relative_error`` give."""
        if key in whole:
            y = scratch[:w.size].reshape(w.shape)
            sums = native.whole_sums_at(w.ctypes.data, y.ctypes.data, w.size, fmt, kernel_threads)
            if sums is not None:
                sum_w, sum_d = sums
                if not math.isfinite(sum_w):  # NaN or Inf in the weight: the error that names it
                    refuse_nonfinite(key, w)
                return y, (math.sqrt(sum_d) / math.sqrt(sum_w) if sum_w > 0 else 0.0)
        # another type, or a scale past fp16's range (rtn_quantize raises the error naming it): torch, on a view
        # of the same memory
        import torch

        from quantpredict.quantize.rtn import relative_error, rtn_quantize

        refuse_nonfinite(key, w)
        with torch_threads(threads):
            wt = torch.from_numpy(w)
            w_q = rtn_quantize(wt, fmt, block_size=block)
            return w_q.numpy(), relative_error(wt, w_q)

    def produce():
        nonlocal q_bits, q_params
        bar = tqdm(total=len(specs), desc=f"quantize {recipe.label[:40]}", unit="tensor", disable=not progress)
        with bar:
            for key in file_order(specs):
                t0 = time.perf_counter()
                stored, dtype = source.pop(key), specs[key].dtype  # dropped once written: its pages can go
                if key not in planned:
                    if dtype in FLOAT_DTYPES:  # as quantize_model checks the model's parameters
                        refuse_nonfinite(key, to_float32(stored, dtype) if dtype == "BF16" else stored)
                else:
                    q, (fmt, block) = planned[key]
                    w_q, rel = round_layer(key, to_float32(stored, dtype), fmt, block)
                    stored = from_float32(w_q, dtype)  # written before the next layer reuses the buffer
                    layers[key] = LayerReport(q.name, q.block_index, q.out_features, q.in_features, rel, nan, nan,
                                              time.perf_counter() - t0)
                    n = q.out_features * q.in_features
                    q_bits += n * get_format(fmt).bits_per_element(block, row_length=q.in_features)
                    q_params += n
                yield key, stored
                bar.update()

    with staged_dir(out_dir) as stage:
        for name in CARRIED_FILES:
            if (plan.path / name).is_file():
                shutil.copyfile(plan.path / name, stage / name)
        write_streamed(stage / "model.safetensors", specs, produce(), metadata={"format": "pt"})
        order = [layers[q.key] for q in plan.linears if q.key in layers]  # the report in arch.linear_layers order
        report = QuantReport(recipe_label=recipe.label, layers=tuple(order), calibration_tokens=0,
                             total_seconds=time.perf_counter() - t_start, output_errors_measured=False,
                             **size_fields(q_bits, q_params, plan.total_params))
        meta = quantization_meta(recipe, report, build_version())
        (stage / QUANT_CONFIG).write_text(quantization_json(meta))
        honour_umask(*stage.glob("*.safetensors"))
    return report
