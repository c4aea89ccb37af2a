"""The language-model head in token chunks: logits of a large vocabulary never materialised for a whole batch.

A 49k-token vocabulary makes the logits of 8 windows of 256 tokens 400 MB in float32, and a Hessian-vector product
through them keeps several such tensors alive. Here the model body gives the final hidden states ``h`` ``[N, d]``
(small: ``d`` is the hidden size), and the head ``z = h W^T`` is applied ``chunk`` token rows at a time:

* :func:`chunked_cross_entropy` — ``sum_t CE(h_t W^T, y_t)``, differentiable twice in ``h`` by two custom autograd
  functions whose forward and backward passes recompute each chunk's logits (the retained graph holds ``h``,
  never the logits), so a double-backward Hessian-vector product costs one ``[chunk, vocab]`` block at a time;
* :func:`summed_cross_entropy` — the same loss on logits the model computed whole (small vocabularies), with a
  backward written in differentiable ops so that an HVP runs through one softmax;
* :func:`token_nll` — the per-token NLL both of the above and the evaluation's scoring are built on; this module
  is the package's one cross-entropy (features, evaluation and QAT's trajectories all reach it);
* :func:`iter_logits` — float32 logits chunk by chunk for scoring (evaluation, comparison);
* :func:`final_hidden` / :func:`head_weight` — the body's output and the head's ``[vocab, d]`` weight for the
  families ``arch`` supports (the head has no bias and no logit scaling in any of them).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def head_module(model: nn.Module) -> nn.Module:
    """The output projection (``lm_head``, GPT-NeoX's ``embed_out``)."""
    return model.get_output_embeddings()


def head_weight(model: nn.Module) -> torch.Tensor:
    """The head's weight ``[vocab, hidden]``."""
    return head_module(model).weight


def supports_chunking(model: nn.Module) -> bool:
    """True when the model's logits are exactly ``final_hidden(model, ids) @ head_weight(model).T`` (a bias-free
    linear head on the base model's last hidden state, with no hook on its input: a runtime's rounding of a
    quantized head's input, ``quantpredict.runtime``, runs in the head's forward, which chunking would skip), so
    the head can be applied in chunks."""
    head = head_module(model)
    return (isinstance(head, nn.Linear) and head.bias is None and getattr(model, "base_model", None) is not None
            and model.base_model is not model and not head._forward_pre_hooks)


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The base model's last hidden state ``[b, seq, hidden]`` (final norm applied), what the head reads."""
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


def token_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[N]`` next-token NLL (nats) of each row of ``logits`` ``[N, V]`` at ``target`` ``[N]``, in the logits'
    dtype (float32 logits: float32 NLLs; callers sum them in float64)."""
    return F.cross_entropy(logits, target, reduction="none")


class _SummedCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(z, target, reduction="sum")`` whose backward, ``(softmax(z) - onehot(target)) * g``, is
    written in differentiable ops: a Hessian-vector product then runs through one softmax instead of autograd's
    generic double backward of ``log_softmax`` (several full ``[tokens, vocab]`` temporaries; ~10% of an HVP here).
    Same value, same derivatives."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # z [N, V], target [N]
        ctx.save_for_backward(z, target)
        return F.cross_entropy(z, target, reduction="sum")

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        z, target = ctx.saved_tensors
        grad = torch.softmax(z, dim=-1).scatter_add(
            -1, target[:, None], torch.full_like(target[:, None], -1, dtype=z.dtype))
        return grad * g, None


def summed_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, target, reduction="sum")`` for ``logits`` ``[N, V]``, ``target`` ``[N]`` (0-d, in
    the logits' dtype), differentiable twice with the cheap Hessian-vector product of :class:`_SummedCrossEntropy`
    when ``logits`` requires grad."""
    if logits.requires_grad:
        return _SummedCrossEntropy.apply(logits, target)
    return F.cross_entropy(logits, target, reduction="sum")


class _ChunkedCE(torch.autograd.Function):
    """``sum_t CE(h_t W^T, y_t)`` with ``h`` ``[N, d]``, ``W`` ``[V, d]`` (no gradient), ``y`` ``[N]``."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(h, weight, target)
        ctx.chunk = chunk
        total = h.new_zeros((), dtype=torch.float64)  # token NLLs summed in float64: a loss difference keeps its digits
        for lo in range(0, h.shape[0], chunk):
            z = F.linear(h[lo : lo + chunk].to(weight.dtype), weight)
            total += token_nll(z, target[lo : lo + chunk]).double().sum()
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, weight, target = ctx.saved_tensors
        return _ChunkedCEGrad.apply(h, weight, target, ctx.chunk, g), None, None, None


class _ChunkedCEGrad(torch.autograd.Function):
    """The gradient ``g * (softmax(h W^T) - onehot(y)) W`` ``[N, d]``, itself differentiable once (in ``h`` and
    ``g``): a double-backward Hessian-vector product goes through here."""

    @staticmethod
    def forward(ctx, h, weight, target, chunk: int, g):
        ctx.save_for_backward(h, weight, target, g)
        ctx.chunk = chunk
        out = torch.empty(h.shape, dtype=weight.dtype, device=h.device)
        for lo in range(0, h.shape[0], chunk):
            p = torch.softmax(F.linear(h[lo : lo + chunk].to(weight.dtype), weight), dim=-1)
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, target[lo : lo + chunk]] -= 1.0
            out[lo : lo + chunk] = p @ weight
        return (out * g).to(h.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, u: torch.Tensor):
        # d/dh <grad_h, u> = g W^T (diag(p) - p p^T) W u_t per token; d/dg <grad_h, u> = sum_t (p . a_t - a_t[y_t])
        # with a_t = W u_t: both from the chunk's recomputed softmax
        h, weight, target, g = ctx.saved_tensors
        gh = torch.empty(h.shape, dtype=weight.dtype, device=h.device)
        gg = torch.zeros((), dtype=torch.float64, device=h.device)
        for lo in range(0, h.shape[0], ctx.chunk):
            p = torch.softmax(F.linear(h[lo : lo + ctx.chunk].to(weight.dtype), weight), dim=-1)
            a = F.linear(u[lo : lo + ctx.chunk].to(weight.dtype), weight)
            pa = (p * a).sum(dim=-1, keepdim=True)
            gh[lo : lo + ctx.chunk] = (p * (a - pa)) @ weight
            gg += (pa.squeeze(-1) - a.gather(-1, target[lo : lo + ctx.chunk, None]).squeeze(-1)).sum().double()
        return (gh * g).to(h.dtype), None, None, None, gg.to(g.dtype).reshape(g.shape)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, target, reduction="sum")`` computed ``chunk`` token rows at a time.

    ``hidden`` ``[N, d]`` (any float dtype; logits are taken in float32, float64 for float64 inputs), ``weight``
    ``[V, d]`` (treated as a constant: pass a detached tensor), ``target`` ``[N]``. Differentiable twice w.r.t.
    ``hidden`` (three times raises). The chunk sums are added in float64 and the 0-d loss is float64. Memory beyond
    the inputs: a few ``[chunk, V]`` float32 blocks.
    """
    if weight.requires_grad:
        raise ValueError("chunked_cross_entropy treats the head weight as a constant; pass weight.detach()")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 token, got {chunk}")
    compute = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for a float64 model
    return _ChunkedCE.apply(hidden, weight.to(compute), target, int(chunk))


def iter_logits(hidden: torch.Tensor, weight: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, float32 logits [<= chunk, V])`` of ``hidden`` ``[N, d]`` under ``weight`` ``[V, d]`` (float32
    head: pass ``weight.float()`` once for a half-precision model)."""
    for lo in range(0, hidden.shape[0], chunk):
        yield lo, F.linear(hidden[lo : lo + chunk].to(weight.dtype), weight).float()
