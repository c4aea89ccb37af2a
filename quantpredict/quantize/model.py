"""Quantizing a whole model, block by block, and saving it.

:func:`quantize_model` walks the transformer blocks in order. Block ``i`` is calibrated on the outputs of blocks
``0 .. i-1`` *as already quantized* (weights and, if the recipe says so, activations), as GPTQ does:

1. one forward pass of block ``i`` with hooks on its linear layers collects, per layer, ``H = 2/N sum x x^T`` and the
   per-channel ``max|x|``; all linears of the block see the block's unquantized weights (GPTQ's "true sequential"
   order within a block is not used: one pass per block instead of one per linear);
2. SmoothQuant (if ``smoothquant_alpha`` is set) folds its scales into the norm -> linear pairs; each affected
   Hessian is rescaled exactly (``X' = X / s`` gives ``H' = diag(1/s) H diag(1/s)``), so no second pass is needed;
3. AWQ (if ``recipe.awq``, :mod:`.awq`) searches each scaling group's scales on those Hessians, folds them (the
   Hessians rescaled the same way) and, before RTN, clips the weights;
4. every linear not in ``recipe.skip`` is quantized (RTN or GPTQ); the report records RTN's and the method's output
   error on the calibration inputs;
5. activation fake-quant hooks go on the block's quantized linears, and the block's outputs become block ``i+1``'s
   inputs;
6. with a ``checkpoint`` directory, the block's weights and block ``i+1``'s inputs are saved there
   (:mod:`.checkpoint`), and a later call continues at block ``i+1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantpredict import arch
from quantpredict.arch import LinearRef
from quantpredict.quantize.act import install_act_quant, install_act_quant_on
from quantpredict.quantize.awq import AwqClipReport, AwqGroupReport, awq_block
from quantpredict.quantize.calib import capture_linear_inputs
from quantpredict.quantize.embeddings import quantize_embedding_and_head
from quantpredict.quantize.gptq import gptq_quantize, relative_output_error
from quantpredict.quantize.plan import (  # noqa: F401 (kept at this path)
    PlannedLayer,
    embedding_and_head_plan,
    layer_plan,
    quantized_linears,
)
from quantpredict.quantize.report import (  # noqa: F401 (kept at this path)
    QUANT_CONFIG,
    LayerReport,
    QuantReport,
    size_fields,
)
from quantpredict.quantize.rtn import relative_error, rtn_quantize
from quantpredict.quantize.smoothquant import apply_smoothing, smoothing_scales
from quantpredict.recipe import Recipe

# ---- report ---------------------------------------------------------------------------------------------------------


def size_report(model: nn.Module, recipe: Recipe) -> dict[str, float]:
    """Effective bits and bytes of ``model`` quantized by ``recipe`` (see :class:`QuantReport`)."""
    from quantpredict.formats import get_format

    q_bits = 0.0
    q_params = 0
    for p in layer_plan(model, recipe):
        n = p.ref.weight.numel()
        q_bits += n * get_format(p.weight_format).bits_per_element(p.block_size, row_length=p.ref.in_features)
        q_params += n
    for m in embedding_and_head_plan(model, recipe):  # a tied matrix is planned (and counted) once
        n, row = m.module.weight.numel(), int(m.module.weight.shape[-1])
        q_bits += n * get_format(m.weight_format).bits_per_element(None, row_length=row)
        q_params += n
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return size_fields(q_bits, q_params, total)


# ---- quantize -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calib_ids: torch.Tensor | None,
    *,
    batch_size: int = 8,
    progress: bool = True,
    output_errors: bool | None = None,
    max_memory: int | str | None = None,
    device: Any = None,
    dtype: Any = None,
    checkpoint: str | Path | None = None,
    imatrix: Any = None,
) -> QuantReport:
    """Quantize ``model`` in place as ``recipe`` says, calibrated on ``calib_ids``.

    Args:
        model: a Hugging Face causal LM of a family ``quantpredict.arch`` supports.
        recipe: what to do.
        calib_ids: 1-D token ids (cut into ``recipe.calib_samples`` windows of ``recipe.calib_seq_len`` at offsets
            seeded by ``recipe.seed``) or 2-D ``[n, seq_len]`` windows used as given. Use WikiText-2 *train*. May be
            ``None`` when no calibration pass runs (:func:`needs_calibration` is false), so a caller can skip
            tokenizing calibration text; a recipe that needs one then raises :class:`~quantpredict.errors.DataError`.
        batch_size: windows per forward pass.
        progress: show a progress bar over blocks.
        output_errors: measure each layer's output error on the calibration inputs. ``None`` (default): only when
            the recipe needs a calibration pass anyway (GPTQ, SmoothQuant or AWQ); plain RTN is data-free, and skipping
            the pass makes it ~10x cheaper (its report's ``output_errors_measured`` is then false and its layers'
            output errors NaN). A ``calib_ids`` that is given is checked either way.
        max_memory: working-memory budget (bytes or text such as ``"4GiB"``; default
            ``memory.DEFAULT_MAX_MEMORY``): when the hidden states between blocks (inputs and outputs of one block,
            ``2 x n x seq x hidden``) would take more than half of it, they go to files in a temporary directory,
            one batch resident at a time. The weights are not counted: they stay where and as they are.
        device: where block forward passes and GPTQ run (``"cuda"``; default: where the model is). Blocks are
            copied there one at a time; the model itself does not move.
        dtype: compute dtype of the block forward passes (``"bf16"``, ``"fp32"``; default: the model's). A bf16 model
            calibrated in float32 is upcast one block at a time; a float32 model calibrated in bf16 runs a bf16 copy
            of each block. Hessians are accumulated in float64 from float32 products, GPTQ runs in float32/64 on
            the stored weights, and the quantized weights are written in the model's own dtype.
        checkpoint: a directory where the calibration pass checkpoints after every block
            (:class:`~quantpredict.quantize.checkpoint.BlockCheckpoint`: the finished blocks' weights, the next
            block's calibration inputs, a manifest), so that the same call after an interruption continues at the
            next block instead of block 0, with the very weights (bit for bit) of an uninterrupted run. A checkpoint
            of another model, recipe, calibration, batch size or dtype is stale: it is deleted and the pass starts
            over (a warning is logged). The directory is left in place, its files whole: delete it when the model
            is no longer wanted (``None``, the default: no checkpoint; data-free RTN never writes one).
        imatrix: an importance matrix (:class:`~quantpredict.imatrix.Imatrix` or a llama.cpp imatrix file): each
            layer of a llama.cpp type is rounded as llama-quantize --imatrix rounds it (its quant_weights, by the
            layer's GGUF name: :func:`quantpredict.imatrix.layer_importance`). Data-free RTN of llama.cpp types only
            (a :class:`~quantpredict.errors.RecipeError` otherwise, before any work; output errors are not measured
            with one yet).

    Returns:
        A :class:`QuantReport`. Activation fake-quant hooks (``recipe.act_format``) stay installed on the model.
    """
    from quantpredict.data import calibration_windows
    from quantpredict.memory import parse_bytes, resolve_device, resolve_dtype

    t_start = time.perf_counter()
    arch.adapter(model)  # unsupported architecture: a clear error before any work
    if recipe.smoothquant_alpha is not None:
        arch.require_smoothquant(model)  # so is SmoothQuant where no fold is exact (post-norm, generic walk)
    if recipe.awq:
        arch.require_scale_folds(model, "AWQ", "awq")  # and AWQ, which folds into the same norms
    arch.check_finite(model)
    calibrate = needs_calibration(recipe, output_errors=output_errors)
    if calib_ids is None and calibrate:
        from quantpredict.errors import DataError

        raise DataError(f"recipe {recipe.label} needs a calibration pass (GPTQ, SmoothQuant, AWQ or "
                        "output_errors=True): pass calibration token ids, e.g. quantize.sample_calibration(...)")
    windows = (None if calib_ids is None else
               calibration_windows(calib_ids, recipe.calib_samples, recipe.calib_seq_len, seed=recipe.seed))
    budget = parse_bytes(max_memory, flag="max_memory")
    stored = next(model.parameters())
    target = stored.device if device is None else resolve_device(device, flag="device")
    compute_dtype = resolve_dtype(dtype, flag="dtype") or stored.dtype
    plan = layer_plan(model, recipe)  # a per-layer list of the wrong length fails here, before any work
    importance = None if imatrix is None else _imatrix_importance(model, recipe, plan, imatrix, calibrate)
    # first, so that a calibration pass sees the quantized embedding as llama.cpp's model has it (the head is read
    # by no calibration pass); data-free RTN, the same on a resumed run
    matrices = tuple(quantize_embedding_and_head(model, recipe))

    blocks = arch.blocks(model)
    if not calibrate:
        report = _quantize_rtn_data_free(model, recipe, blocks, t_start, progress, importance)
        return dataclasses.replace(report, matrices=matrices) if matrices else report
    ckpt = None
    if checkpoint is not None:
        from quantpredict.quantize.checkpoint import BlockCheckpoint, checkpoint_key

        key = checkpoint_key(model, recipe.to_dict(), windows, batch_size=batch_size, dtype=compute_dtype)
        ckpt = BlockCheckpoint.open(checkpoint, key, recipe.label, len(blocks))
    layers, awq_groups, awq_clips = _calibrated_blocks(model, recipe, plan, windows, batch_size=batch_size,
                                                       progress=progress, budget=budget, device=target,
                                                       dtype=compute_dtype, ckpt=ckpt)
    size = size_report(model, recipe)
    return QuantReport(recipe_label=recipe.label, layers=tuple(layers), calibration_tokens=windows.numel(),
                       total_seconds=time.perf_counter() - t_start, awq=tuple(awq_groups), awq_clips=tuple(awq_clips),
                       matrices=matrices, **size)


def needs_calibration(recipe: Recipe, *, output_errors: bool | None = None) -> bool:
    """Whether :func:`quantize_model` runs its block-by-block calibration pass for ``recipe``.

    GPTQ (Hessians), SmoothQuant (activation maxima) and AWQ (activation means, scale search) need calibration data;
    plain RTN does not, with or without activation quantization (its fake-quant is dynamic, computed per input at
    inference, and RTN's weights never see an activation), so it runs one only when ``output_errors`` is true.
    """
    data_free = recipe.method == "rtn" and recipe.smoothquant_alpha is None and not recipe.awq
    return not data_free or bool(output_errors)


def _quantize_layer(p: PlannedLayer, index: int, recipe: Recipe, H: torch.Tensor, reference: torch.Tensor | None,
                    baseline_rtn: float | None, device: torch.device | None = None) -> LayerReport:
    """Round one layer (RTN or GPTQ on ``H``) and report it. ``reference``: the FP weight errors are measured against
    when it is not the layer's current weight (AWQ: scaled but not clipped); ``baseline_rtn``: the RTN error to
    report instead of RTN of the current weight (AWQ: RTN of the layer before scaling)."""
    ref = p.ref
    t0 = time.perf_counter()
    w_in = ref.weight.detach().to(device=device or ref.weight.device, dtype=torch.float32)
    w = w_in if reference is None else reference.to(w_in.device)
    w_rtn = rtn_quantize(w_in, p.weight_format, block_size=p.block_size)
    if recipe.method == "gptq":
        w_q = gptq_quantize(w_in, H, p.weight_format, block_size=p.block_size, blocksize=recipe.gptq_blocksize,
                            percdamp=recipe.percdamp, act_order=recipe.act_order)
    else:
        w_q = w_rtn
    err_rtn = relative_output_error(w, w_rtn, H) if baseline_rtn is None else baseline_rtn
    err = relative_output_error(w, w_q, H) if (w_q is not w_rtn or baseline_rtn is not None) else err_rtn
    return _set_quantized(ref, index, w, w_q, err_rtn, err, t0)


def _calibrated_blocks(model: nn.Module, recipe: Recipe, plan: list[PlannedLayer], windows: torch.Tensor, *,
                       batch_size: int, progress: bool, budget: int, device: torch.device, dtype: torch.dtype,
                       ckpt=None) -> tuple[list[LayerReport], list[AwqGroupReport], list[AwqClipReport]]:
    """The block-by-block calibration loop (module docstring), with the hidden states between blocks in an
    :class:`~quantpredict.quantize.offload.ActivationStore` and each block's forwards on its compute copy. Returns
    the layers' reports and AWQ's (its groups and clips; empty without AWQ).

    ``ckpt`` (a :class:`~quantpredict.quantize.checkpoint.BlockCheckpoint`): each finished block is saved there;
    one opened with ``done = d`` blocks restores blocks ``0 .. d-1`` (weights, reports, activation fake-quant) and
    block ``d``'s saved inputs, and the loop starts at block ``d``. The keyword arguments of the blocks (mask,
    rotary tables) are captured from the FP model before any saved block is loaded, as in an uninterrupted run."""
    from tqdm.auto import tqdm

    from quantpredict.quantize.offload import ActivationStore, spill_to_disk, to_compute

    blocks = arch.blocks(model)
    on_disk = spill_to_disk(windows.shape[0], windows.shape[1], arch.hidden_size(model), dtype, budget)
    layers: list[LayerReport] = []
    awq_groups: list[AwqGroupReport] = []
    awq_clips: list[AwqClipReport] = []
    start = 0 if ckpt is None else ckpt.done
    inputs = outputs = ActivationStore(on_disk)  # closed on every exit, an interrupt included: no spilled files left
    try:
        with _embeddings_widened(model, dtype):
            # resuming: one batch for block 0's kwargs (the first batch's, as in a full pass), its hidden states unused
            kwargs = arch.capture_block_input_batches(
                model, windows if start == 0 else windows[:batch_size], batch_size,
                (lambda h: inputs.append(h.to(device=device, dtype=dtype))) if start == 0 else (lambda h: None))
        # keyword arguments that differ between blocks (Qwen-2, Gemma-2/3) come from one batch run through every
        # block in the model's own dtype: a bf16 model's blocks cannot take the widened hidden states
        kwargs |= {k: v for k, v in arch.capture_block_kwargs(model, windows[:batch_size]).items()
                   if isinstance(v, arch.PerBlock)}
        captured = min(batch_size, windows.shape[0])  # the batch the kwargs are shaped for
        if start:
            layers, awq_groups, awq_clips = _restore_blocks(model, recipe, plan, ckpt, inputs, device)
        bar = tqdm(range(start, len(blocks)), desc=f"quantize {recipe.label[:40]}", unit="block", initial=start,
                   total=len(blocks), disable=not progress)
        for index in bar:
            block = blocks[index]
            kw = {k: to_compute(v, device, dtype) for k, v in arch.block_kwargs(kwargs, index).items()}
            hessians, stats = _block_statistics(model, index, block, inputs, kw, device, dtype, captured)
            absmeans = {name: st.absmean for name, st in stats.items()} if recipe.awq else {}
            if recipe.smoothquant_alpha is not None:
                _smooth_block(model, index, recipe.smoothquant_alpha, stats, hessians, absmeans)
            block_plan = [p for p in plan if p.ref.block_index == index]
            baseline: dict[str, float] = {}  # AWQ: plain RTN's error of each layer before scaling
            reference: dict[str, torch.Tensor] = {}  # AWQ: the scaled FP weights, before clipping
            if recipe.awq:
                for p in block_plan:
                    w0 = p.ref.weight.detach().to(torch.float32)
                    baseline[p.ref.name] = relative_output_error(
                        w0, rtn_quantize(w0, p.weight_format, block_size=p.block_size),
                        hessians[p.ref.name].to(w0.device))
                result = awq_block(model, index, {p.ref.name: (p.weight_format, p.block_size) for p in block_plan},
                                   hessians, absmeans, clip=recipe.method == "rtn")
                awq_groups.extend(result.groups)
                awq_clips.extend(result.clips)
                reference = result.reference
            for p in block_plan:
                layers.append(_quantize_layer(p, index, recipe, hessians[p.ref.name].to(device),
                                              reference.get(p.ref.name), baseline.get(p.ref.name), device))
            if recipe.act_format is not None:
                install_act_quant_on([p.ref for p in block_plan], recipe.act_format, recipe.act_block_size)
            del hessians, stats
            if index + 1 < len(blocks):
                outputs = ActivationStore(on_disk)
                work = _compute_block(block, device, dtype)
                for h in inputs:
                    outputs.append(_run(work, h, kw, captured))
                inputs.close()
                inputs = outputs
            if ckpt is not None:
                ckpt.save(index, block, inputs if index + 1 < len(blocks) else None,
                          _reports_json(layers, awq_groups, awq_clips))
    finally:
        inputs.close()
        outputs.close()
    return layers, awq_groups, awq_clips


def _reports_json(layers: list[LayerReport], groups: list[AwqGroupReport],
                  clips: list[AwqClipReport]) -> dict[str, list[dict[str, Any]]]:
    """The finished blocks' reports as JSON for a checkpoint's manifest (floats round-trip exactly)."""
    return {"layers": [asdict(r) for r in layers], "awq": [asdict(g) for g in groups],
            "awq_clips": [asdict(c) for c in clips]}


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _restore_blocks(model: nn.Module, recipe: Recipe, plan: list[PlannedLayer], ckpt, inputs,
                    device: torch.device) -> tuple[list[LayerReport], list[AwqGroupReport], list[AwqClipReport]]:
    """Load a checkpoint's finished blocks ``0 .. done-1`` into ``model`` (their activation fake-quant installed
    as the loop would have) and block ``done``'s inputs into ``inputs``; returns the finished blocks' reports."""
    blocks = arch.blocks(model)
    for index in range(ckpt.done):
        ckpt.load_block(index, blocks[index])
        if recipe.act_format is not None:
            install_act_quant_on([p.ref for p in plan if p.ref.block_index == index], recipe.act_format,
                                 recipe.act_block_size)
    if ckpt.done < len(blocks):
        for h in ckpt.inputs(device):
            inputs.append(h)
    r = ckpt.reports or {}
    return ([LayerReport(**d) for d in r.get("layers", [])], [AwqGroupReport(**_tuples(d)) for d in r.get("awq", [])],
            [AwqClipReport(**d) for d in r.get("awq_clips", [])])


@contextlib.contextmanager
def _embeddings_widened(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The embeddings in ``dtype`` for the ``with`` when it is wider than theirs (a bf16 model calibrated in
    float32: block 0's inputs, mask and rotary tables are then those of the float32 model), cast back after (exact:
    a widening round trip). Never narrowed in place: a bf16 calibration of a float32 model casts block 0's inputs."""
    mods = arch.embedding_modules(model)
    old = [next(m.parameters()).dtype for m in mods]
    wider = [o for o in old if torch.empty((), dtype=o).element_size() < torch.empty((), dtype=dtype).element_size()]
    try:
        if wider:
            for m in mods:
                m.to(dtype)
        yield
    finally:
        if wider:
            for m, o in zip(mods, old):
                m.to(o)


def _compute_block(block: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from quantpredict.quantize.offload import compute_copy

    return compute_copy(block, device, dtype)


def _run(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], captured: int) -> torch.Tensor:
    """One batch ``[b, seq, hidden]`` through ``block`` (``kwargs`` captured for ``captured`` windows)."""
    out = block(hidden, **arch.batch_kwargs(kwargs, hidden.shape[0], captured))
    return out[0] if isinstance(out, tuple) else out


def _block_statistics(model: nn.Module, index: int, block: nn.Module, inputs, kwargs: dict[str, Any],
                      device: torch.device, dtype: torch.dtype, captured: int):
    """Each linear's input statistics (Hessian, per-channel max) over the calibration batches, measured on the
    block's compute copy: ``({name: H [in, in] float64}, {name: InputStats})``."""
    work = _compute_block(block, device, dtype)
    refs = arch.linears_of(model, index, work)
    with capture_linear_inputs(refs) as stats:
        for h in inputs:
            _run(work, h, kwargs, captured)
    return {name: s.hessian for name, s in stats.items()}, stats


def _smooth_block(model: nn.Module, index: int, alpha: float, stats, hessians: dict[str, torch.Tensor],
                  absmeans: dict[str, torch.Tensor] | None = None) -> None:
    """Fold SmoothQuant's scales into block ``index`` and rescale the affected Hessians (and AWQ's input means)
    exactly."""
    for pair in arch.smooth_pairs(model, index):
        absmax = stats[pair.linears[0].name].absmax
        s = smoothing_scales(absmax.to(pair.linears[0].weight.device), [r.weight for r in pair.linears], alpha)
        apply_smoothing(pair, s)
        inv = (1.0 / s).to(hessians[pair.linears[0].name].device)
        for r in pair.linears:
            hessians[r.name] = hessians[r.name] * inv.unsqueeze(0) * inv.unsqueeze(1)
            if absmeans and r.name in absmeans:
                absmeans[r.name] = absmeans[r.name] * inv.to(absmeans[r.name].device)


def _set_quantized(ref: LinearRef, index: int, w: torch.Tensor, w_q: torch.Tensor, err_rtn: float, err: float,
                   t0: float) -> LayerReport:
    """Write ``w_q`` into the layer and report it (relative weight error from ``w``, seconds since ``t0``)."""
    rel_w = relative_error(w, w_q)  # float32 rows, float64 sum: float64 copies took half of RTN's time
    ref.set_weight(w_q.to(ref.weight.dtype))
    return LayerReport(ref.name, index, ref.out_features, ref.in_features, rel_w, err_rtn, err,
                       time.perf_counter() - t0)


def _imatrix_importance(model: nn.Module, recipe: Recipe, plan: list[PlannedLayer], imatrix: Any,
                        calibrate: bool) -> dict[str, torch.Tensor]:
    """HF layer name -> [in] quant_weights of ``imatrix`` for the plan's llama.cpp-typed layers, after refusing
    what llama.cpp's imatrix quantization is not (GPTQ, AWQ, SmoothQuant, activation formats, other formats) and a
    calibration pass (output errors with an imatrix: not implemented)."""
    from quantpredict.errors import RecipeError
    from quantpredict.imatrix import check_imatrix_recipe, layer_importance

    formats = [(p.weight_format, p.block_size) for p in plan]
    check_imatrix_recipe(recipe, formats)
    if calibrate:
        raise RecipeError("an imatrix quantizes by data-free RTN here; output errors (a calibration pass) are not "
                          "measured with one: drop --output-errors")
    return layer_importance(model, [p.ref for p in plan], formats, imatrix)


def _quantize_rtn_data_free(model: nn.Module, recipe: Recipe, blocks, t_start: float, progress: bool,
                            importance: dict[str, torch.Tensor] | None = None) -> QuantReport:
    """RTN without a calibration pass: each weight rounded on its own (output errors not measured: NaN);
    ``importance``: HF layer name -> [in] imatrix weights of its llama.cpp format."""
    from tqdm.auto import tqdm

    from quantpredict.imatrix import importance_of

    nan = float("nan")
    layers: list[LayerReport] = []
    plan = layer_plan(model, recipe)
    for index in tqdm(range(len(blocks)), desc=f"quantize {recipe.label[:40]}", unit="block", disable=not progress):
        block_plan = [p for p in plan if p.ref.block_index == index]
        for p in block_plan:
            t0 = time.perf_counter()
            w = p.ref.weight.detach().to(torch.float32)
            w_q = rtn_quantize(w, p.weight_format, block_size=p.block_size,
                               importance=importance_of(importance, p.ref.name, p.weight_format))
            layers.append(_set_quantized(p.ref, index, w, w_q, nan, nan, t0))
        if recipe.act_format is not None:
            install_act_quant_on([p.ref for p in block_plan], recipe.act_format, recipe.act_block_size)
    size = size_report(model, recipe)
    return QuantReport(recipe_label=recipe.label, layers=tuple(layers), calibration_tokens=0,
                       total_seconds=time.perf_counter() - t_start, output_errors_measured=False, **size)


# ---- save / load ----------------------------------------------------------------------------------------------------


def code_version() -> str:
    """The build that writes a saved model: :func:`quantpredict.version.build_version` (this name is kept for
    callers; it is not the run-key version, :data:`quantpredict.version.MEASUREMENT_VERSION`)."""
    from quantpredict.version import build_version

    return build_version()


def save_quantized(
    model: nn.Module,
    recipe: Recipe,
    report: QuantReport | None,
    out_dir: str | Path,
    tokenizer=None,
    *,
    imatrix: str | None = None,
) -> Path:
    """Write ``model`` (safetensors, in its dtype), ``tokenizer`` (if given) and ``quantization.json`` to ``out_dir``.

    The directory is an ordinary Hugging Face model directory: ``quantpredict.models.load`` reads it, and re-installs
    activation fake-quant from ``quantization.json`` via :func:`apply_saved_quantization`. ``imatrix``: the label
    of the imatrix the weights were rounded with (:func:`quantpredict.imatrix.imatrix_label`), recorded as
    ``quantization.json``'s ``imatrix`` (absent without one).

    A new ``out_dir`` is written as a sibling ``<name>.partial-<pid>`` and renamed when whole, so an interrupted or
    failed save leaves nothing behind; an existing one has its files replaced. Every file gets the umask's mode
    (safetensors writes its own 0600).
    """
    from quantpredict.files import honour_umask, staged_dir
    from quantpredict.quantize.report import quantization_json, quantization_meta

    with staged_dir(out_dir) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        meta = quantization_meta(recipe, report, code_version(), imatrix)
        (stage / QUANT_CONFIG).write_text(quantization_json(meta))
        honour_umask(*stage.glob("*.safetensors"))
    return Path(out_dir)


@dataclass(frozen=True)
class SavedQuantization:
    recipe: Recipe
    report: dict[str, Any] | None = None
    code_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_quantization(path: str | Path) -> SavedQuantization | None:
    """The ``quantization.json`` of a model directory, or ``None`` when it has none (an unquantized model)."""
    from quantpredict.errors import ModelError

    f = Path(path) / QUANT_CONFIG
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
        recipe = Recipe.from_dict(meta["recipe"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{f} is not a valid quantization config ({exc}); re-run `quantpredict quantize` to "
                         "rewrite it or delete the file") from exc
    extra = {k: v for k, v in meta.items() if k not in ("recipe", "report", "code_version")}
    return SavedQuantization(recipe, meta.get("report"), meta.get("code_version"), extra)


def apply_saved_quantization(model: nn.Module, path: str | Path) -> SavedQuantization | None:
    """For a model just loaded from ``path``: install the activation fake-quant its ``quantization.json`` records.

    Returns the saved quantization (``None`` for a directory without one). Weights need nothing: they are stored
    already on the format's grid.
    """
    saved = read_quantization(path)
    if saved is not None:
        install_act_quant(model, saved.recipe)
    return saved
