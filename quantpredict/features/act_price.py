"""The price of a weight+activation recipe from weights alone: the weight change and the activation error together.

A recipe with ``act_format`` fake-quantizes the input of every quantized linear at run time
(:mod:`quantpredict.quantize.act`), optionally after SmoothQuant (:mod:`quantpredict.quantize.smoothquant`) has
divided the input of each norm -> linears pair by ``s`` [in] and multiplied the linears' columns by it. On token
``t`` one layer's output then changes by::

    dy_t = W'_q A(x_t / s) - W x_t = W'_q (A(x'_t) - x'_t) + (W'_q - W') x'_t,    x' = x / s,  W' = W * s

(``W x = W' x'``), with ``W'_q`` the recipe's weight quantization of ``W'`` (RTN, or GPTQ against the scaled
Hessian ``H / (s s^T)``) and ``A`` the activation fake-quantization exactly as the hooks apply it (along the hidden
axis, ``recipe.act_block`` per block). Priced token-wise like the weight-only ``token_gn_quad``
(:func:`quantpredict.features.fisher.token_quadratic`): ``0.5 mean_t (s_t^T dy_t)^2`` per layer, summed over the
quantized layers, from the profile's per-token FP inputs ``x_t`` and sampled output gradients ``s_t`` alone (no
forward pass). Without activation quantization and SmoothQuant this is ``token_gn_quad`` exactly.

Departures from what ``quantize_model`` does (stated, not hidden):

- SmoothQuant's per-channel ``max|x|`` comes from the profile's token inputs (its first 2 calibration windows of 256
  tokens, FP model, stored in bf16); ``quantize_model`` takes it over the recipe's 128 calibration windows, on the
  inputs of the already-quantized prefix (activation quantization of the earlier blocks included). A max over 64x
  fewer tokens is smaller, so ``s`` is somewhat smaller for ``alpha > 0``.
- ``x_t`` is the FP model's input of the layer (bf16-rounded); the sequential quantized model's inputs carry the
  earlier layers' errors. GPTQ is priced against an FP Hessian ``2A`` (the weight-only path's departure): the
  recipe's own calibration windows' when ``rank`` prices it (``hessians``), else the profile's.
- The price is block-diagonal over layers and second order, as ``token_gn_quad`` is.
- A runtime's activation rounding (``act_formats``, e.g. llama.cpp's Q8_0/Q8_K inputs, :mod:`quantpredict.runtime`)
  is applied to the bf16-stored profile inputs, where the runtime rounds float32 ones: exact halves are more common
  on bf16 values (llama.cpp's x86 Q8_0 rounds them to even), and a rounding to fp16 or bf16 (F16/BF16 weights)
  leaves bf16 values (nearly) unchanged, so it prices at (nearly) 0 where float32 inputs would lose up to 2^-11
  (fp16) or 2^-8 (bf16) of each value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from quantpredict import arch
from quantpredict.features.fisher import cross_layer_price, position_accumulator
from quantpredict.imatrix import importance_of


def profile_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-channel ``max|x|`` ``[in]`` float64 of token inputs ``x`` ``[T, in]`` (SmoothQuant's statistic)."""
    return x.abs().amax(dim=0).double()


def smoothing_scales_of(model: nn.Module, token_inputs: Mapping[str, torch.Tensor], alpha: float, *,
                        blocks: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """``{linear name: s [in] float64}`` for every linear of a norm -> linears pair of ``blocks`` (default: all)
    (SmoothQuant's scales, :func:`~quantpredict.quantize.smoothquant.smoothing_scales`, from the max of the profile's
    token inputs ``[T, in]`` of the pair's first linear over its token windows); linears in no pair are absent
    (``s = 1``)."""
    from quantpredict.quantize.smoothquant import smoothing_scales

    out: dict[str, torch.Tensor] = {}
    for index in range(len(arch.blocks(model))) if blocks is None else blocks:
        for pair in arch.smooth_pairs(model, index):
            x = token_inputs[pair.linears[0].name]
            s = smoothing_scales(profile_absmax(x), [r.weight for r in pair.linears], alpha)
            out |= {r.name: s for r in pair.linears}
    return out


def act_quadratic(w_q: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                  scale: torch.Tensor | None, act_format: str | None, act_block: int | None,
                  chunk: int = 512, positions: int | None = None, into: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> tuple[float, float, float]:
    """``(total, weight part, activation part)`` of one layer's token-wise price, each ``0.5 / T sum_t (s_t^T v_t)^2``:
    ``v = W'_q (A(x') - x') + dW' x'`` (total), ``dW' x'`` (weight part), ``W'_q (A(x') - x')`` (activation part).

    ``w_q`` ``[out, in]``: the quantized (smoothed) weight ``W'_q``; ``delta`` ``[out, in]``: ``W'_q - W'``;
    ``x`` ``[T, in]`` the FP inputs, ``s`` ``[T, out]`` the sampled output gradients; ``scale`` ``[in]`` SmoothQuant's
    ``s`` (``None``: 1); ``act_format`` ``None``: no activation quantization (then total = weight part). Chunks of
    :func:`~quantpredict.features.fisher.token_terms` (products in ``dtype``, default
    :func:`~quantpredict.features.fisher.price_dtype`), float64 sums. ``positions``: the denominator ``T``
    (default ``x``'s rows; :meth:`~quantpredict.features.fisher.SensitivityProfile.positions` for a profile that
    scores part of each window). ``into`` ``[T]`` float64: each token's total term ``s_t^T v_t`` is added to it (the
    cross-layer sum of :func:`~quantpredict.features.fisher.cross_layer_quadratic`)."""
    from quantpredict.features.fisher import price_dtype, token_terms
    from quantpredict.formats import fake_quantize

    dtype = price_dtype(delta.device.type) if dtype is None else dtype
    wq, d = w_q.to(dtype), delta.to(dtype)
    inv = None if scale is None else (1.0 / scale).float()
    sums = [0.0, 0.0, 0.0]
    for lo in range(0, x.shape[0], chunk):
        xs = x[lo: lo + chunk].float()
        if inv is not None:
            xs = xs * inv
        g = s[lo: lo + chunk]
        vw = token_terms(g, d, xs, dtype)
        va = torch.zeros_like(vw)
        if act_format is not None:
            err = fake_quantize(xs, act_format, axis=-1, block_size=act_block) - xs
            va = token_terms(g, wq, err, dtype)
        for k, v in enumerate((vw + va, vw, va)):
            sums[k] += float(v.pow(2).sum())
        if into is not None:
            into[lo: lo + chunk] += vw + va
    n = max(x.shape[0] if positions is None else positions, 1)
    return 0.5 * sums[0] / n, 0.5 * sums[1] / n, 0.5 * sums[2] / n


def smoothed_quantized(w: torch.Tensor, scale: torch.Tensor | None, fmt: tuple[str, int | None], method: str,
                       hessian: torch.Tensor | None, gptq_options: Mapping | None = None,
                       importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W'_q, W'_q - W')`` ``[out, in]`` float32 for ``W`` ``[out, in]``: ``W' = W * scale`` (columns), quantized to
    ``fmt`` by RTN or by GPTQ against ``hessian / (scale scale^T)`` (``hessian`` ``[in, in]``, the FP one).
    ``importance`` [in]: RTN with an imatrix's quant_weights (llama.cpp formats, no smoothing: a ``ValueError``
    otherwise, as neither is llama.cpp's)."""
    if importance is not None and (scale is not None or method == "gptq"):
        raise ValueError("an imatrix applies to llama.cpp's RTN of unsmoothed weights only")
    from quantpredict.quantize.gptq import gptq_quantize
    from quantpredict.quantize.rtn import rtn_quantize

    w = w.detach().float()
    if scale is not None:
        w = (w.double() * scale.double().unsqueeze(0)).float()
    if method == "gptq":
        h = hessian.double()
        if scale is not None:
            inv = 1.0 / scale.double()
            h = h * inv.unsqueeze(0) * inv.unsqueeze(1)
        w_q = gptq_quantize(w.clone(), h, fmt[0], block_size=fmt[1], **dict(gptq_options or {}))
    else:
        w_q = rtn_quantize(w, fmt[0], block_size=fmt[1], importance=importance)
    return w_q, w_q - w


def price_act_recipe(model: nn.Module, profile, refs: Sequence[arch.LinearRef],
                     formats: Sequence[tuple[str, int | None] | None], method: str, *,
                     act_format: str | None, act_block: int | None, smoothquant_alpha: float | None,
                     gptq_options: Mapping | None = None, token_inputs: Mapping[str, torch.Tensor] | None = None,
                     smoothing_inputs: Mapping[str, torch.Tensor] | None = None,
                     act_formats: Sequence[tuple[str, int | None] | None] | None = None,
                     importance: Mapping[str, torch.Tensor] | None = None,
                     hessians: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """The ``profile`` group's token-wise features of a (weight+activation, optionally SmoothQuant) recipe:
    ``token_gn_quad`` (the total price of the module docstring), its ``act_weight_quad`` and ``act_input_quad`` parts
    (without their cross term) and ``kfac_max_layer_share`` (the largest layer's share of the total). ``formats``:
    one ``(format, block size)`` per ref, ``None`` for layers left in full precision (neither weights nor inputs
    quantized). ``token_inputs`` (``{name: [T, in]}``, default the profile's) are the inputs priced;
    ``smoothing_inputs`` (``{name: [T', in]}``, default ``token_inputs``) give SmoothQuant's per-channel max.

    ``act_formats``: one activation ``(format, block size)`` per ref, or ``None`` for a layer whose input is not
    quantized (a runtime's per-layer formats, :func:`quantpredict.runtime.activation_formats`), in place of the one
    ``act_format``/``act_block`` of every quantized layer (then ``act_format`` must be ``None``); layers whose
    ``formats`` entry is ``None`` stay unpriced either way. ``importance``: HF layer name -> [in] imatrix weights for
    the RTN of llama.cpp formats (:func:`~quantpredict.features.fisher.profile_deltas`). ``hessians``
    (``{name: [in, in]}``): the FP Hessians GPTQ rounds against, in place of the profile's ``2A``
    (:func:`~quantpredict.features.fisher.iter_profile_deltas`)."""
    if act_formats is not None:
        if act_format is not None:
            raise ValueError("give act_format (one format for every quantized layer) or act_formats (one per layer), "
                             "not both")
        if len(act_formats) != len(refs):
            raise ValueError(f"act_formats has {len(act_formats)} entries for {len(refs)} layers: give one per ref")
    xs = profile.token_inputs if token_inputs is None else token_inputs
    scales = ({} if smoothquant_alpha is None else
              smoothing_scales_of(model, xs if smoothing_inputs is None else smoothing_inputs, smoothquant_alpha))
    totals = [0.0, 0.0, 0.0]
    per_layer = []
    across = position_accumulator(xs)  # each position's terms summed over the layers
    with torch.no_grad():
        per_ref = [(act_format, act_block)] * len(refs) if act_formats is None else act_formats
        for ref, fb, ab in zip(refs, formats, per_ref, strict=True):
            if fb is None:
                continue
            a_fmt, a_block = (None, None) if ab is None else ab
            scale = scales.get(ref.name)
            h = None if method != "gptq" else (profile.hessian(ref.name) if hessians is None else hessians[ref.name])
            w_q, delta = smoothed_quantized(ref.weight, scale, fb, method, h, gptq_options,
                                            importance_of(importance, ref.name, fb[0]))
            x = xs[ref.name]
            parts = act_quadratic(w_q, delta, x, profile.token_grads[ref.name], scale, a_fmt, a_block,
                                  positions=profile.positions(x.shape[0]), into=across)
            totals = [a + b for a, b in zip(totals, parts)]
            per_layer.append(parts[0])
    total = sum(per_layer)
    top = max(per_layer) / total if per_layer and total > 0 else 0.0
    return {"token_gn_quad": totals[0], "act_weight_quad": totals[1], "act_input_quad": totals[2],
            "token_cross_quad": cross_layer_price(profile, across),
            "kfac_max_layer_share": top, "kfac_quad": float("nan"), "kfac_quad_diag": float("nan")}
