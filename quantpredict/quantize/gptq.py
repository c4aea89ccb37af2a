"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", 2023).

One function, :func:`gptq_quantize`, following the reference ``fasterquant`` of IST-DASLab/gptq step by step, with
every format of :mod:`quantpredict.formats` in place of the reference's asymmetric integer grid.
:func:`gptq_quantize_stacked` runs the same column loop (:func:`_column_loop`) for several layers of one shape at
once, each against its own Hessian factor, with bit for bit each layer's result alone (the weights-only price of a
GPTQ recipe uses it; ``quantize_model`` quantizes layer by layer).

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
* **Shipped layouts** (uintK, nf4, q8_0, k-quants; see :func:`quantpredict.formats.fit_params`): a group is the
  layout's block (``block_size`` columns for uintK/nf4, 32 for q8_0, a 256-column super-block for the k-quants), and
  all its parameters (scale and zero point; absmax; d, dmin, sub-block scales and mins found by llama.cpp's search)
  are fitted once, like a scale above, then each column is rounded with them. uintK_pc fits one scale and zero point
  per row before the loop. nf4_dq's tensor-level statistics (the mean of all absmaxes and each run of 256 absmaxes'
  second-level scale) are fitted once on the whole weight before the loop; each group's absmax is then refitted as
  it comes and stored through that second level, so the result is a valid nf4_dq tensor. Likewise the per-tensor
  scale of nvfp4 and fp8_e4m3_pt is fitted once on the whole weight; nvfp4's E4M3 block scales are then refitted per
  group of 16 as it comes.
"""

from __future__ import annotations

import torch

from quantpredict.errors import FormatError
from quantpredict.formats.params import QuantParams, fit_params, is_shipped, quantize_blocks
from quantpredict.threads import torch_threads


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
    return_params: bool = False,
    inverse_factor: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, QuantParams]:
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
        num_threads: torch intra-op threads while this runs (:func:`quantpredict.threads.torch_threads`: set for
            this call only, restored after); ``None`` keeps torch's setting. The
            loop is thousands of small ops, for which thread hand-offs cost more than they save: with 2 threads on a
            loaded 2-core machine a 1024x1024 layer took 8.4 s, with 1 thread 0.8 s.
        return_params: also return the parameters each element was rounded with, per element ([out, in] tensors in
            a :class:`~quantpredict.formats.QuantParams`; the scale for single-scale formats).
        inverse_factor: ``[in, in]``, what :func:`hessian_inverse_factor` gives for this ``hessian``, ``percdamp``
            and ``act_order`` (it depends on nothing else): a caller that quantizes one layer in several formats
            factorises its Hessian once. Not checked against ``hessian``.

    Returns:
        The dequantized weight, ``[out, in]``, in ``weight``'s dtype; every value lies on the format's grid (and,
        with ``return_params``, the parameters).
    """
    args = (weight, hessian, fmt, block_size, blocksize, percdamp, act_order, inverse_factor)
    with torch_threads(num_threads):  # restored after; thread-safe (see quantpredict.threads)
        q, params = _gptq(*args)
    return (q, params) if return_params else q


def hessian_inverse_factor(hessian: torch.Tensor, percdamp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """The ``[in, in]`` float32 factor :func:`gptq_quantize` propagates errors with (the upper Cholesky factor of the
    damped inverse of ``hessian`` [in, in], dead inputs given a unit diagonal, in processing order): a function of
    the Hessian, ``percdamp`` and ``act_order`` alone, so one factorisation serves every format of a layer."""
    # one working copy of H, handed over to _inverse_factor, which frees each stage as it goes: the caller's H,
    # the copy and one factor (3 x 642 MB for a 1.5B model's 8960-wide down_proj), not six [in, in] at once
    if act_order:
        perm = _order(_dead_fixed_diagonal(hessian), act_order)
        return _inverse_factor(hessian.detach().to(torch.float64)[perm][:, perm], percdamp)
    return _inverse_factor(hessian.detach().to(torch.float64, copy=True), percdamp)


def _gptq(weight, hessian, fmt, block_size, blocksize, percdamp, act_order,
          inverse_factor=None) -> tuple[torch.Tensor, QuantParams]:
    from quantpredict.formats import get_format

    f = get_format(fmt)
    if is_shipped(f):
        return _gptq_shipped(weight, hessian, f, block_size, blocksize, percdamp, act_order, inverse_factor)
    group = _check_inputs(weight, hessian, f, block_size, blocksize)
    W = _dead_zeroed(weight, hessian)
    W, perm, position = _ordered(W, hessian, act_order)
    Hinv = hessian_inverse_factor(hessian, percdamp, act_order) if inverse_factor is None else inverse_factor
    Q, used_scale = _column_loop(W.unsqueeze(0), Hinv.unsqueeze(0), f, group, blocksize, perm.tolist(), position)
    return Q[0][:, position].to(weight.dtype), QuantParams(f.name, {"scale": used_scale[0]})


def gptq_quantize_stacked(weights: torch.Tensor, hessian_diagonals: torch.Tensor, inverse_factors: torch.Tensor,
                          fmt: str, *, block_size: int | None = None, blocksize: int = 128,
                          num_threads: int | None = None) -> torch.Tensor:
    """:func:`gptq_quantize` of ``B`` layers of one shape at once, without ``act_order``: ``weights``
    ``[B, out, in]``, each layer's Hessian diagonal ``[B, in]`` (its dead inputs) and its
    :func:`hessian_inverse_factor` ``[B, in, in]`` (the damping is in the factor). Returns ``[B, out, in]`` in
    ``weights``' dtype, each layer's slice **bit for bit** :func:`gptq_quantize` of that layer alone: the column loop
    is the same, its element-wise steps run on the stack, and its matrix products run layer by layer (the same 2-D
    products as alone). The loop's Python cost is paid once for the ``B`` layers: the weights-only price of a GPTQ
    recipe stacks the same layer of every block (:func:`quantpredict.features.fisher.iter_profile_deltas`).
    Single-scale formats (MX, int, fp8, float) only: a shipped layout (uintK, nf4, ggml) raises a ``ValueError``."""
    from quantpredict.formats import get_format

    f = get_format(fmt)
    if is_shipped(f):
        raise ValueError(f"gptq_quantize_stacked runs single-scale formats only, not {f.name}; use gptq_quantize")
    if weights.dim() != 3 or tuple(hessian_diagonals.shape) != (weights.shape[0], weights.shape[2]) \
            or tuple(inverse_factors.shape) != (weights.shape[0], weights.shape[2], weights.shape[2]):
        raise ValueError(f"weights [B, out, in], hessian_diagonals [B, in] and inverse_factors [B, in, in] must "
                         f"agree; got {tuple(weights.shape)}, {tuple(hessian_diagonals.shape)} and "
                         f"{tuple(inverse_factors.shape)}")
    if not torch.isfinite(hessian_diagonals).all():
        raise ValueError("hessian_diagonals hold NaN/Inf values; the calibration activations are not finite")
    # the layout alone: a full [in, in] to hand _check_inputs would cost 642 MB for an 8960-wide layer
    group = _check_layout(f, weights.shape[2], block_size, blocksize)
    W = weights.detach().to(torch.float32).clone()
    W.masked_fill_((hessian_diagonals == 0).unsqueeze(1), 0.0)  # dead inputs, as _dead_zeroed
    columns = W.shape[2]
    with torch_threads(num_threads):
        Q, _ = _column_loop(W, inverse_factors.to(torch.float32), f, group, blocksize, list(range(columns)),
                            torch.arange(columns))
    return Q.to(weights.dtype)


def _column_loop(W, Hinv, f, group, blocksize, order, position) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop over a stack of layers: ``W`` ``[B, out, in]`` (float32, dead inputs zeroed, in processing
    order, overwritten), ``Hinv`` ``[B, in, in]`` the factors in processing order, ``order`` the original column of
    each processed one and ``position`` its inverse (shared by the stack: one processing order). Returns the rounded
    weights and the scale each element was rounded with (``[B, out, in]`` each, processing order). Element-wise steps
    run on the whole stack; matrix products layer by layer, as for one layer alone."""
    from quantpredict.formats import compute_scale, quantize_with_scale
    from quantpredict.formats.reference import round_to_element

    B, rows, columns = W.shape
    row_scale = None
    if group is None:  # per channel (or no scale at all for bf16/fp16: compute_scale gives ones)
        row_scale = compute_scale(W, f, axis=-1, block_size=None)  # [B, out, 1]
    n_groups = 0 if group is None else -(-columns // group)
    group_scale: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_groups
    Q = torch.empty_like(W)  # every column is written (as are Q1's and Err1's rows, before they are read)
    # the column loop runs once per input channel: keep Python-side lookups out of it
    element = None if f.family == "float" else f.element_format
    hinv_diag = Hinv.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # [B, in, 1]: the same float32 values per layer
    if row_scale is not None:
        used_scale = row_scale.expand(B, rows, columns)
        row_scale = (row_scale, torch.where(row_scale == 0, torch.ones_like(row_scale), row_scale))
    else:
        used_scale = torch.empty(B, rows, columns, device=W.device)

    # the lazy batch is held transposed, [B, count, out]: each column is a contiguous row, and the rank-1 update of
    # the later columns runs over contiguous memory into one preallocated buffer (the update alone 3-4x faster than
    # the [B, out, count] strided one with a fresh temporary per column; with the in-place updates below, the whole
    # loop 1.8-2.1x, one thread, on SmolLM2's shapes stacked 30 deep: reports/benchmarks.md "ab-gptq"). The products
    # and differences are element for element the same, so the results are bit for bit those of the untransposed loop.
    buf = torch.empty(B, blocksize, rows, dtype=W.dtype, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, :, i1:i2].transpose(1, 2).contiguous()  # [B, count, out]
        Q1 = torch.empty_like(W1)
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2].unsqueeze(-1)  # [B, count, count, 1]

        for i in range(count):
            w = W1[:, i]  # [B, out]
            d = hinv_diag[:, i1 + i]  # [B, 1]

            if group is None:
                scale = row_scale
            else:
                g = order[i1 + i] // group
                if group_scale[g] is None:
                    # first column of this group in processing order: fit its scale on the group's columns as they
                    # stand now, i.e. with the updates from every column quantized so far
                    c0, c1 = g * group, min((g + 1) * group, columns)
                    current = _stacked_group_columns(W, W1, Err1, Hinv, position, i1, i, i2, c0, c1)
                    s = compute_scale(current, f, axis=-1, block_size=c1 - c0)  # [B, out, 1]
                    group_scale[g] = (s, torch.where(s == 0, torch.ones_like(s), s))
                    used_scale[:, :, c0:c1] = s
                scale = group_scale[g]
            if element is None:  # bf16 / fp16: a plain cast
                q = quantize_with_scale(w.unsqueeze(-1), f, scale[0]).squeeze(-1)
            else:  # quantize_with_scale, inlined: x / s on the element grid, times s (a zero scale gives zeros)
                q = (round_to_element(w.unsqueeze(-1) / scale[1], element) * scale[0]).squeeze(-1)

            Q1[:, i] = q
            err = (w - q) / d
            # optimal update of the not-yet-quantized columns of this lazy batch (OBS with the Cholesky rows); an
            # outer product (one multiply per element, as the reference's rank-1 matmul)
            # (sub_ on the view: `W1[:, i:] -= x` would also copy the view back onto itself, a third of the loop)
            W1[:, i:].sub_(torch.mul(Hinv1[:, i, i:], err.unsqueeze(1), out=buf[:, : count - i]))
            Err1[:, i] = err

        Q[:, :, i1:i2] = Q1.transpose(1, 2)
        # lazy batch update: apply the whole batch's error to every later column at once (layer by layer: the same
        # 2-D product of an [out, count] error, and so the same rounding, as one layer alone)
        Err1 = Err1.transpose(1, 2).contiguous()
        for b in range(B):
            W[b, :, i2:].sub_(Err1[b].matmul(Hinv[b, i1:i2, i2:]))

    return Q, used_scale


def _check_inputs(weight, hessian, f, block_size, blocksize) -> int | None:
    """Validate the arguments; the group length along ``in`` (None: per channel)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(f"hessian must be [in, in] = [{columns}, {columns}], got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian holds NaN/Inf values; the calibration activations are not finite")
    return _check_layout(f, columns, block_size, blocksize)


def _check_layout(f, columns, block_size, blocksize) -> int | None:
    """Validate the format's layout for rows of ``columns`` and ``blocksize``; the group length along ``in``."""
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if is_shipped(f):
        f.check_row_length(columns)
        return f.check_block(None if block_size is None else int(block_size))
    group = f.default_block_size if block_size is None else int(block_size)
    if group is not None and group < 1:
        raise FormatError(f"block_size must be a positive integer (or unset: the format's default), got {block_size}")
    return group


def _dead_zeroed(weight, hessian) -> torch.Tensor:
    """float32 W with dead inputs (never active in calibration: a zero Hessian diagonal) zeroed; they carry no
    information, and :func:`_inverse_factor` gives them a unit diagonal in H, which keeps H invertible."""
    W = weight.detach().to(torch.float32).clone()
    W[:, torch.diag(hessian) == 0] = 0.0
    return W


def _dead_fixed_diagonal(hessian) -> torch.Tensor:
    """H's diagonal (float64) with 1 at the dead inputs: the diagonal of the H that is factorised."""
    d = torch.diag(hessian).to(torch.float64).clone()
    d[d == 0] = 1.0
    return d


def _order(diagonal, act_order) -> torch.Tensor:
    """The processing order of the columns: by descending Hessian diagonal with ``act_order``, else as they are."""
    if act_order:
        return torch.argsort(diagonal, descending=True)
    return torch.arange(diagonal.shape[0], device=diagonal.device)


def _ordered(W, hessian, act_order):
    """W in processing order, the permutation, and position[c] = where original column c is processed."""
    perm = _order(_dead_fixed_diagonal(hessian), act_order)
    if act_order:
        W = W[:, perm]
    return W, perm, torch.argsort(perm)


def _inverse_factor(H, percdamp) -> torch.Tensor:
    """The upper Cholesky factor U of the damped H^-1 (H^-1 = U^T U), float32: its rows give each column's
    error-propagation coefficients over the columns not yet quantized. ``H`` (float64) is a working copy the caller
    hands over: it is overwritten, and each stage's input is released as the next is made (only the caller's own
    reference keeps one alive). The dead inputs (zero diagonal) get a unit diagonal first."""
    diag = H.diagonal()
    diag[diag == 0] = 1.0
    diag += percdamp * torch.mean(diag)
    # H^-1 = L^-T L^-1 from the Cholesky factor of H
    L, info = torch.linalg.cholesky_ex(H)
    del H, diag
    if info.item() != 0:
        raise ValueError(f"the damped Hessian is not positive definite (percdamp={percdamp}); increase percdamp "
                         "(e.g. 0.1) or use more calibration data")
    inverse = torch.cholesky_inverse(L)
    del L
    U = torch.linalg.cholesky(inverse, upper=True)
    del inverse
    return U.to(torch.float32)


def _stacked_group_columns(W, W1, Err1, Hinv, position, i1, i, i2, c0, c1) -> torch.Tensor:
    """:func:`_group_columns` for the stacked loop: the current values ``[B, out, c1 - c0]`` of original columns
    ``c0 .. c1-1``, with ``W1`` and ``Err1`` the lazy batch held transposed (``[B, count, out]``). Columns inside the
    batch are gathered for the whole stack at once (a copy: the same values); pending updates of later ones are one
    product per layer, as for one layer alone."""
    pos = position[c0:c1]
    if bool((pos < i2).all()):  # the whole group in this lazy batch (always so without act_order: blocks tile groups)
        return W1[:, pos - i1].transpose(1, 2)
    return torch.stack([_group_columns(W[b], W1[b].T, Err1[b].T, Hinv[b], position, i1, i, i2,
                                       torch.arange(c0, c1, device=W.device)) for b in range(W.shape[0])])


def _group_columns(W, W1, Err1, Hinv, position, i1, i, i2, cols) -> torch.Tensor:
    """The current values [rows, len(cols)] of original columns ``cols``: W1 for those in this lazy batch, W minus
    the updates still pending from columns i1 .. i1+i-1 for later ones."""
    pos = position[cols]
    current = torch.empty(W.shape[0], cols.numel(), dtype=W.dtype, device=W.device)
    here = pos < i2
    current[:, here] = W1[:, pos[here] - i1]
    later = pos[~here]
    if later.numel():  # pending lazy-batch updates from columns i1 .. i1+i-1
        # a dense copy of the batch's errors: the stacked loop passes a transposed view, and the product should see
        # the same row-major operand as ever
        current[:, ~here] = W[:, later] - Err1[:, :i].contiguous() @ Hinv[i1 : i1 + i, later]
    return current


def _gptq_shipped(weight, hessian, f, block_size, blocksize, percdamp, act_order, inverse_factor=None):
    """GPTQ for the shipped layouts: each group's parameters from :func:`fit_params` on its current values."""
    group = _check_inputs(weight, hessian, f, block_size, blocksize)
    rows, columns = weight.shape
    W = _dead_zeroed(weight, hessian)
    # per channel: the row's parameters; nf4_dq, nvfp4, fp8_e4m3_pt: the tensor-level ones (second level, per-tensor
    # scale); both fitted on the whole weight
    full = fit_params(W, f, block_size=group) if group is None or f.tensor_level else None
    W, perm, position = _ordered(W, hessian, act_order)
    Hinv = hessian_inverse_factor(hessian, percdamp, act_order) if inverse_factor is None else inverse_factor
    order = perm.tolist()
    hinv_diag = Hinv.diagonal().tolist()
    n_groups = 0 if group is None else -(-columns // group)
    group_params: list[dict[str, torch.Tensor] | None] = [None] * n_groups
    used: dict[str, torch.Tensor] = {}  # per element: the parameters each weight was rounded with
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = order[i1 + i]
            if group is None:
                p = {k: v[:, c : c + 1] for k, v in full.tensors.items()}
            else:
                g = c // group
                if group_params[g] is None:
                    cols = torch.arange(g * group, min((g + 1) * group, columns), device=W.device)
                    current = _group_columns(W, W1, Err1, Hinv, position, i1, i, i2, cols)
                    stats = full.narrow(-1, g * group, cols.numel()) if full is not None else None
                    group_params[g] = dict(fit_params(current, f, block_size=group, stats_from=stats).tensors)
                    for k, v in group_params[g].items():
                        used.setdefault(k, torch.empty(rows, columns, device=W.device))[:, cols] = v
                p = {k: v[:, c - g * group : c - g * group + 1] for k, v in group_params[g].items()}
            w = W1[:, i]
            q = quantize_blocks(w.unsqueeze(1), f, p).flatten()
            Q1[:, i] = q
            err = (w - q) / hinv_diag[i1 + i]
            W1[:, i:].sub_(err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0)))
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:].sub_(Err1.matmul(Hinv[i1:i2, i2:]))
    if group is None:
        used = dict(full.tensors)
    return Q[:, position].to(weight.dtype), QuantParams(f.name, used)


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
