"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", 2023).

One function, :func:`gptq_quantize`, following the reference ``fasterquant`` of IST-DASLab/gptq step by step, with
every format of :mod:`quantpredict.formats` in place of the reference's asymmetric integer grid.

Choices made explicit (where the reference leaves room):

* **Precision.** The Hessian is damped, inverted and factorised in float64 (calibration Hessians are often
  ill-conditioned, and this ``O(in^3)`` work happens once per layer); the column loop, the lazy batch updates and the
  rounding run in float32, as in the reference. The result is returned in the weight's dtype.
* **Groups follow the format.** An MX block (or an INT group) is ``block_size`` consecutive columns of the *original*
  weight, since that is the layout the format stores. Its scale is fitted when the loop reaches the first of its
  columns in processing order, on the error-updated values of all its columns at that moment (exactly, including the
  updates still pending in the current lazy batch). Without ``act_order`` this is the reference's group rule; with
  ``act_order`` the reference instead groups consecutive columns of the *permuted* order, which no MX tensor can
  store, so we keep the format's groups and fit each when its first column comes up.
* **Per-channel formats** (INT/FP8 with ``block_size=None``): one scale per output row, fitted once on the whole row
  (after dead columns are zeroed) before the loop, as the reference does without groups.
* **Float formats** (``bf16``, ``fp16``) have no scale (``compute_scale`` gives ones): each column is cast as it
  comes.
"""

from __future__ import annotations

import torch

from quantpredict.errors import FormatError


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: str,
    *,
    block_size: int | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    num_threads: int | None = 1,
) -> torch.Tensor:
    """Quantize ``weight`` [out, in] with GPTQ against the layer Hessian ``hessian`` [in, in] (``2/N sum x x^T``).

    Args:
        weight: the layer's weight as ``[out, in]``.
        hessian: ``[in, in]`` symmetric positive semi-definite, ``2/N X X^T`` over calibration tokens.
        fmt: a format name of :mod:`quantpredict.formats`.
        block_size: elements per shared scale along ``in`` (``None``: the format's default; 32 for MX, per-channel
            for INT/FP8).
        blocksize: columns per lazy batch update (affects speed only, up to float rounding).
        percdamp: damping added to the Hessian's diagonal, as a fraction of its mean diagonal.
        act_order: process columns by descending Hessian diagonal (then put them back in place).
        num_threads: torch intra-op threads while this runs (restored after); ``None`` keeps torch's setting. The
            loop is thousands of small ops, for which thread hand-offs cost more than they save: with 2 threads on a
            loaded 2-core machine a 1024x1024 layer took 8.4 s, with 1 thread 0.8 s.

    Returns:
        The dequantized weight, ``[out, in]``, in ``weight``'s dtype; every value lies on the format's grid.
    """
    if num_threads is None:
        return _gptq(weight, hessian, fmt, block_size, blocksize, percdamp, act_order)
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _gptq(weight, hessian, fmt, block_size, blocksize, percdamp, act_order)
    finally:
        torch.set_num_threads(before)


def _gptq(weight, hessian, fmt, block_size, blocksize, percdamp, act_order) -> torch.Tensor:
    from quantpredict.formats import compute_scale, get_format, quantize_with_scale
    from quantpredict.formats.reference import round_to_element

    f = get_format(fmt)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(f"hessian must be [in, in] = [{columns}, {columns}], got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian holds NaN/Inf values; the calibration activations are not finite")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    group = f.default_block_size if block_size is None else int(block_size)
    if group is not None and group < 1:
        raise FormatError(f"block_size must be a positive integer or None, got {block_size}")

    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float64).clone()

    # Dead inputs (never active in calibration) carry no information: their weights are set to zero, and a unit
    # diagonal keeps H invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    row_scale = None
    if group is None:  # per channel (or no scale at all for bf16/fp16: compute_scale gives ones)
        row_scale = compute_scale(W, fmt, axis=-1, block_size=None)  # [out, 1]

    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(columns, device=W.device)
    position = torch.argsort(perm)  # position[c] = where original column c is processed

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=H.device)
    H[diag, diag] += damp
    # H^-1 = L^-T L^-1 from the Cholesky factor of H; then the upper Cholesky factor U of H^-1 (H^-1 = U^T U), whose
    # rows give each column's error-propagation coefficients over the columns not yet quantized.
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError(f"the damped Hessian is not positive definite (percdamp={percdamp}); increase percdamp "
                         "(e.g. 0.1) or use more calibration data")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)

    n_groups = 0 if group is None else -(-columns // group)
    group_scale: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_groups
    Q = torch.zeros_like(W)
    # the column loop runs once per input channel: keep Python-side lookups out of it
    element = None if f.family == "float" else f.element_format
    order = perm.tolist()
    hinv_diag = Hinv.diagonal().tolist()
    if row_scale is not None:
        row_scale = (row_scale, torch.where(row_scale == 0, torch.ones_like(row_scale), row_scale))

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            w = W1[:, i]
            d = hinv_diag[i1 + i]

            if group is None:
                scale = row_scale
            else:
                g = order[i1 + i] // group
                if group_scale[g] is None:
                    # first column of this group in processing order: fit its scale on the group's columns as they
                    # stand now, i.e. with the updates from every column quantized so far
                    cols = torch.arange(g * group, min((g + 1) * group, columns), device=W.device)
                    pos = position[cols]
                    current = torch.empty(rows, cols.numel(), dtype=W.dtype, device=W.device)
                    here = pos < i2
                    current[:, here] = W1[:, pos[here] - i1]
                    later = pos[~here]
                    if later.numel():  # pending lazy-batch updates from columns i1 .. i1+i-1
                        current[:, ~here] = W[:, later] - Err1[:, :i] @ Hinv[i1 : i1 + i, later]
                    s = compute_scale(current, fmt, axis=-1, block_size=cols.numel())
                    group_scale[g] = (s, torch.where(s == 0, torch.ones_like(s), s))
                scale = group_scale[g]
            if element is None:  # bf16 / fp16: a plain cast
                q = quantize_with_scale(w.unsqueeze(1), fmt, scale[0]).flatten()
            else:  # quantize_with_scale, inlined: x / s on the element grid, times s (a zero scale gives zeros)
                q = (round_to_element(w.unsqueeze(1) / scale[1], element) * scale[0]).flatten()

            Q1[:, i] = q
            err = (w - q) / d
            # optimal update of the not-yet-quantized columns of this lazy batch (OBS with the Cholesky rows)
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err

        Q[:, i1:i2] = Q1
        # lazy batch update: apply the whole batch's error to every later column at once
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    return Q[:, position].to(weight.dtype)


def layer_output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T)`` with ``dW = quantized - weight`` ([out, in]) and ``H`` [in, in], in float64.

    With ``H = 2/N X X^T`` this is ``2/N ||dW X||_F^2``: the squared output error GPTQ minimises, per token.
    """
    dw = (quantized.detach().double() - weight.detach().double())
    return float(((dw @ hessian.double()) * dw).sum())


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||dW X||^2 / ||W X||^2`` over the calibration tokens, i.e. ``tr(dW H dW^T) / tr(W H W^T)``."""
    w = weight.detach().double()
    ref = float(((w @ hessian.double()) * w).sum())
    err = layer_output_error(weight, quantized, hessian)
    return err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))
