"""The token embedding and the LM head, priced from their weights like the linear layers.

llama.cpp's files quantize both matrices (``token_embd``, ``output``; a recipe's ``embedding_format`` /
``head_format``, :mod:`quantpredict.quantize.embeddings`). Their change enters the same second-order KL as every
linear's, ``0.5 E_t[dz_t^T (diag p_t - p_t p_t^T) dz_t]`` (:mod:`quantpredict.features.fisher`), in two places:

- **The head** ``W`` [vocab, d] changes the logits directly: ``dz_t = softcap'(z_t) (W_q A(h_t) - W h_t)`` from the
  head's input ``h_t`` [d] (the final norm's output) alone, with ``A`` the runtime's rounding of that input (none by
  default; llama.cpp's CPU backend rounds a quantized head's input as a linear's,
  :func:`quantpredict.runtime.activation_format`) and ``softcap'`` the derivative of a Gemma-style ``cap tanh(z /
  cap)`` (1 without one). So the head's term is priced *exactly* in logit space, token by token, against the FP
  distribution ``p_t`` recomputed from ``h_t``: no sampled label and no ``[vocab, vocab]`` factor (a K-FAC output
  factor of a 49k-152k vocabulary does not fit in memory). Cost: two ``[T, d] x [d, vocab]`` products.
- **The embedding** ``E`` [vocab, d] changes one row of the residual stream per token: ``de_t = dE[id_t]`` (times the
  module's own scale, e.g. Gemma-3's ``sqrt(d)``: the change of the embedding module's output is taken by calling
  the module on ``dE``). Its price is token-wise as the linear layers' (``token_gn_quad``): ``0.5 / T sum_t (g_t .
  de_t)^2`` with ``g_t`` the gradient, at the embedding module's output, of the log-likelihood of labels sampled
  from the model itself. Only the rows of the tokens seen are quantized (exact for formats without a tensor-level
  statistic; the whole matrix otherwise).

A tied model's one matrix pays both terms. Both are in ``token_gn_quad``'s units and divide by the same ``T`` (every
position of the profile's token windows, the last of each window included as the linear layers' terms do), so
:func:`price_embedding_and_head` adds to it. As for the linear layers, cross-layer and cross-position terms are
dropped. Not modelled: llama-quantize's imatrix for the head (the measurement does not model it either).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from quantpredict import arch

__all__ = ["EmbeddingHeadStats", "embedding_quadratic", "head_quadratic", "measure_embedding_head",
           "price_embedding_and_head", "with_embedding_and_head"]


@dataclass(frozen=True)
class EmbeddingHeadStats:
    """What pricing the embedding and head reads, measured once per model on the profile's token windows.

    ``token_ids`` [T] (int64): every position's token; ``embedding_grads`` [T, d]: the sampled-label log-likelihood
    gradient at the embedding module's output; ``head_inputs`` [P, d]: the head's input at the ``P`` scored
    positions (by default all but each window's last); ``positions``: the terms' denominator (``T``, or the scored
    positions' count under ``scored_from``). Float32 (float64 for a float64 model)."""

    token_ids: torch.Tensor
    embedding_grads: torch.Tensor
    head_inputs: torch.Tensor
    positions: int

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name (the profile cache's file; ``positions`` as a one-element tensor)."""
        return {"token_ids": self.token_ids, "embedding_grads": self.embedding_grads,
                "head_inputs": self.head_inputs, "positions": torch.tensor([self.positions], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> EmbeddingHeadStats:
        return cls(tensors["token_ids"], tensors["embedding_grads"], tensors["head_inputs"],
                   int(tensors["positions"][0]))


def _float(model: nn.Module) -> torch.dtype:
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def measure_embedding_head(model: nn.Module, windows: torch.Tensor, *, seed: int = 0,
                           scored_from: int | None = None) -> EmbeddingHeadStats:
    """:class:`EmbeddingHeadStats` of ``model`` on ``windows`` ``[n, seq_len]``: one forward and one backward pass
    per window (labels drawn from the model's own next-token distribution with a generator seeded ``seed``, as
    :func:`~quantpredict.features.fisher.measure_profile` draws them). ``scored_from=k``: only positions ``k ..``
    of each window are scored (labels, head inputs; ``positions`` counts ``seq_len - k + 1`` per window, as
    :meth:`~quantpredict.features.fisher.SensitivityProfile.positions` does). The model is left as it was."""
    from quantpredict.features.fisher import first_scored_row

    n, seq_len = windows.shape
    first = first_scored_row(scored_from, seq_len)
    dtype = _float(model)
    emb, head = arch.embedding_modules(model)[0], arch.head(model)
    gen = torch.Generator().manual_seed(seed)
    leaf: list[torch.Tensor] = []
    head_in: list[torch.Tensor] = []
    grads, inputs = [], []

    def at_embedding(module, args, output):
        x = output.detach().requires_grad_(True)  # the graph's leaf: no weight gradient is computed
        leaf.append(x)
        return x

    def at_head(module, args):
        head_in.append(args[0].detach())

    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    handles = [emb.register_forward_hook(at_embedding), head.register_forward_pre_hook(at_head)]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for ids in windows.split(1):
            leaf.clear()
            head_in.clear()
            with torch.enable_grad():
                z = model(input_ids=ids, use_cache=False).logits[:, first:-1].to(dtype)
                logp = torch.log_softmax(z, dim=-1).reshape(-1, z.shape[-1])
                with torch.no_grad():
                    y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                logp.gather(-1, y).sum().backward()
            g = leaf[0].grad
            if g is None:
                raise RuntimeError("no gradient reached the token embedding's output; the model does not feed it "
                                   "to its blocks as Hugging Face decoders do")
            grads.append(g.reshape(-1, g.shape[-1]).to(dtype))
            h = head_in[-1]
            inputs.append(h[:, first:-1].reshape(-1, h.shape[-1]).to(dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
    ids = windows.reshape(-1).to(torch.int64)
    return EmbeddingHeadStats(ids, torch.cat(grads), torch.cat(inputs), n * (seq_len - first))


def _rows_delta(weight: torch.Tensor, fmt: str, rows: torch.Tensor) -> torch.Tensor:
    """``Q(W)[rows] - W[rows]`` ``[len(rows), d]`` float32 for the RTN of ``weight`` [vocab, d] in ``fmt`` (the rows
    alone where the format has no tensor-level statistic, so a row's rounding is its own)."""
    from quantpredict.formats import get_format
    from quantpredict.quantize.rtn import rtn_quantize

    w = weight.detach().float()
    if get_format(fmt).tensor_level:
        return (rtn_quantize(w, fmt) - w)[rows]
    sub = w[rows]
    return rtn_quantize(sub, fmt) - sub


def embedding_quadratic(model: nn.Module, stats: EmbeddingHeadStats, fmt: str,
                        delta: torch.Tensor | None = None) -> float:
    """``0.5 / T sum_t (g_t . de_t)^2``: the token-wise price of rounding the token embedding to ``fmt``.
    ``delta``: the whole matrix's ``Q(E) - E`` [vocab, d] where the caller has it (a tied head's)."""
    from torch.func import functional_call

    emb = arch.embedding_modules(model)[0]
    rows, index = torch.unique(stats.token_ids, return_inverse=True)
    d_rows = delta[rows].float() if delta is not None else _rows_delta(emb.weight, fmt, rows)
    # the module on its weight's change: its output's change (linear in the weight; a scaled embedding scales it).
    # A shallow copy without padding_idx: the rows are a subset, and the padding index (Qwen2's 151643) need not be in
    # it; padding_idx changes no output value, only gradients
    rows_module = copy.copy(emb)
    rows_module.padding_idx = None
    with torch.no_grad():
        de = functional_call(rows_module, {"weight": d_rows.to(emb.weight.dtype)}, (index.reshape(1, -1),))
        v = (stats.embedding_grads.float() * de.reshape(index.numel(), -1).float()).sum(1)
    return 0.5 * float(v.double().pow(2).sum()) / max(stats.positions, 1)


def head_quadratic(model: nn.Module, stats: EmbeddingHeadStats, delta: torch.Tensor,
                   act: tuple[str, int | None] | None = None, chunk: int = 128) -> float:
    """``0.5 / T sum_t dz_t^T (diag p_t - p_t p_t^T) dz_t`` for the head's weight change ``delta`` [vocab, d] (see
    the module docstring), with ``act = (format, block)`` the runtime's rounding of the head's input. Float32
    products in chunks of ``chunk`` positions, the quadratic in float64 per chunk against the centred ``dz``."""
    from quantpredict.formats import fake_quantize

    head = arch.head(model)
    w = head.weight.detach().float()
    d = delta.float()
    bias = getattr(head, "bias", None)
    cap = arch.logit_softcap(model)
    total = 0.0
    with torch.no_grad():
        for h in stats.head_inputs.split(chunk):
            h = h.float()
            z = h @ w.T
            if bias is not None:
                z = z + bias.float()
            if act is None:
                dz = h @ d.T
            else:
                hq = fake_quantize(h, act[0], axis=-1, block_size=act[1])
                dz = hq @ d.T + (hq - h) @ w.T  # (W + dW) A(h) - W h
            if cap is not None:
                t = torch.tanh(z / cap)
                z, dz = cap * t, dz * (1.0 - t * t)
            p = torch.softmax(z.double(), dim=-1)
            dz = dz.double()
            centred = dz - (p * dz).sum(-1, keepdim=True)
            total += float((p * centred * centred).sum())
    return 0.5 * total / max(stats.positions, 1)


def price_embedding_and_head(model: nn.Module, stats: EmbeddingHeadStats, recipe, *,
                             runtime: str | None = None) -> dict[str, float]:
    """``{"embedding_quad", "head_quad"}``: the price of the matrices ``recipe`` quantizes (its ``embedding_format``
    / ``head_format``; both 0 for a recipe that quantizes neither), rounded to nearest as
    :func:`~quantpredict.quantize.embeddings.quantize_embedding_and_head` rounds them. ``runtime``: the head's input
    rounded as that runtime rounds a matmul's input for the head's weight format."""
    from quantpredict.quantize.plan import embedding_and_head_plan
    from quantpredict.quantize.rtn import rtn_quantize

    out = {"embedding_quad": 0.0, "head_quad": 0.0}
    for planned in embedding_and_head_plan(model, recipe):
        fmt = planned.weight_format
        delta = None
        if planned.role != "embedding":
            w = planned.module.weight.detach().float()
            delta = rtn_quantize(w, fmt) - w
            act = None
            if runtime is not None:
                from quantpredict.runtime import activation_format

                act = activation_format(fmt, runtime)
            out["head_quad"] = head_quadratic(model, stats, delta, act)
        if planned.role != "head":
            out["embedding_quad"] = embedding_quadratic(model, stats, fmt, delta)
    return out


def with_embedding_and_head(feats: dict[str, float], terms: dict[str, float]) -> dict[str, float]:
    """The ``profile`` features ``feats`` of the linear layers with the two matrices' ``terms``
    (:func:`price_embedding_and_head`) as two more layers: ``terms`` plus ``token_gn_quad`` (their sum with the
    linears'), ``token_cross_quad`` (the linears' cross-layer price plus the two terms, added token-wise: their
    statistics come from their own windows, so their cross terms with the linears' are not priced) and
    ``kfac_max_layer_share`` (the largest of all as a share of ``token_gn_quad``)."""
    linear = float(feats["token_gn_quad"])
    extra = terms["embedding_quad"] + terms["head_quad"]
    total = linear + extra
    top = max(float(feats["kfac_max_layer_share"]) * linear, terms["embedding_quad"], terms["head_quad"])
    out = dict(terms) | {"token_gn_quad": total, "kfac_max_layer_share": top / total if total > 0 else 0.0}
    if "token_cross_quad" in feats:
        out["token_cross_quad"] = float(feats["token_cross_quad"]) + extra
    return out
