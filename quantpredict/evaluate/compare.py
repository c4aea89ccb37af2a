"""The quantization-quality report: a quantized model against its FP original on the same windows."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantpredict.evaluate.partial import PartialResults
from quantpredict.evaluate.scoring import FPLogitsCache, pair_sums
from quantpredict.evaluate.setting import windowing
from quantpredict.evaluate.stats import influence, se_from_influence
from quantpredict.evaluate.windows import Windows, make_windows
from quantpredict.recipe import EvalSetting


@dataclass(frozen=True)
class Comparison:
    """A quantized model against its FP original, measured on the same windows.

    NLLs and KL divergence are in nats per predicted token. Standard errors (``*_se``) are over windows; the deltas'
    are paired (window by window), so they are far smaller than the two perplexities' own errors. ``delta_ppl_se``
    comes from the delta method on ``exp(nll_quant) - exp(nll_fp)``. ``kld`` is the mean KL(P_fp || P_quant) of the
    next-token distributions; ``top1_agreement_pct`` the percentage of positions where both models' most likely next
    token is the same. Every standard error is NaN when there is only one window. ``seconds`` is the wall time of
    the whole comparison, of which ``tokenize_seconds`` went to tokenizing the split (0 when cached).
    ``window_delta_nll`` holds each window's own mean delta NLL (``[windows]``, in window order) and
    ``window_tokens`` its scored-token count, ``window_kld`` / ``window_top1`` its mean KL divergence and top-1
    agreement (a fraction): what a cheaper estimate on a subsample of the windows would see.
    ``bos``: every window started with the BOS token (the protocol); ``source``: the text (``wikitext2:test``, or
    ``file:<name>#<sha256 prefix>`` for a user's file); ``scored_from``: the first scored position of every window
    (``None``: all positions after the first; llama.cpp's protocol scores the second half, see
    :func:`~quantpredict.evaluate.windows.make_windows`).
    """

    ppl_fp: float
    ppl_quant: float
    nll_fp: float
    nll_fp_se: float
    nll_quant: float
    nll_quant_se: float
    delta_nll: float
    delta_nll_se: float
    delta_ppl: float
    delta_ppl_se: float
    kld: float
    kld_se: float
    top1_agreement_pct: float
    top1_agreement_pct_se: float
    eval_tokens: int
    windows: int
    seq_len: int
    dataset: str
    split: str
    seconds: float
    stride: int | None = None
    tokenize_seconds: float = 0.0
    window_delta_nll: tuple[float, ...] = field(default=(), repr=False)
    window_tokens: tuple[int, ...] = field(default=(), repr=False)
    window_kld: tuple[float, ...] = field(default=(), repr=False)
    window_top1: tuple[float, ...] = field(default=(), repr=False)
    bos: bool = False
    source: str = ""
    scored_from: int | None = None

    @property
    def ppl_fp_se(self) -> float:
        return self.ppl_fp * self.nll_fp_se

    @property
    def ppl_quant_se(self) -> float:
        return self.ppl_quant * self.nll_quant_se

    @property
    def delta_ppl_pct(self) -> float:
        """Perplexity increase in percent of the FP perplexity."""
        return 100.0 * self.delta_ppl / self.ppl_fp

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the per-window tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def compare_windows(model_fp: nn.Module, model_q: nn.Module, windows: Windows, *, batch_size: int = 8,
                    progress: bool | None = None, dataset: str = "", split: str = "",
                    fp_cache: FPLogitsCache | None = None, fp_key: str | None = None,
                    partial: PartialResults | None = None) -> Comparison:
    """:func:`compare` on given :class:`Windows` (``partial`` as in :func:`compare`)."""
    start = time.perf_counter()
    sums = {k: v.numpy() for k, v in pair_sums(model_fp, model_q, windows, batch_size=batch_size,
                                                  progress=progress, fp_cache=fp_cache, fp_key=fp_key,
                                                  partial=partial).items()}
    counts = windows.scored_counts.numpy()
    nll_fp, u_fp = influence(sums["nll_fp"], counts)
    delta, u_delta = influence(sums["delta_nll"], counts)
    nll_q, u_q = influence(sums["nll_fp"] + sums["delta_nll"], counts)
    kld, u_kld = influence(sums["kld"], counts)
    top1, u_top1 = influence(sums["top1"], counts)
    ppl_fp, ppl_q = math.exp(nll_fp), math.exp(nll_q)
    delta_ppl = ppl_fp * math.expm1(delta)
    return Comparison(
        ppl_fp=ppl_fp, ppl_quant=ppl_q,
        nll_fp=nll_fp, nll_fp_se=se_from_influence(u_fp),
        nll_quant=nll_q, nll_quant_se=se_from_influence(u_q),
        # accumulated from per-token differences (not nll_quant - nll_fp) for precision at ~1e-5 nats
        delta_nll=delta, delta_nll_se=se_from_influence(u_delta),
        # delta method on exp(nll_fp + delta) - exp(nll_fp): gradient (delta_ppl, ppl_q) on (nll_fp, delta)
        delta_ppl=delta_ppl, delta_ppl_se=se_from_influence(delta_ppl * u_fp + ppl_q * u_delta),
        kld=kld, kld_se=se_from_influence(u_kld),
        top1_agreement_pct=100.0 * top1, top1_agreement_pct_se=100.0 * se_from_influence(u_top1),
        eval_tokens=int(np.sum(counts)), windows=windows.n, seq_len=windows.seq_len, dataset=dataset, split=split,
        seconds=time.perf_counter() - start,
        window_delta_nll=tuple(float(x) for x in sums["delta_nll"] / np.maximum(counts, 1)),
        window_tokens=tuple(int(c) for c in counts),
        window_kld=tuple(float(x) for x in sums["kld"] / np.maximum(counts, 1)),
        window_top1=tuple(float(x) for x in sums["top1"] / np.maximum(counts, 1)),
    )


def compare_ids(model_fp: nn.Module, model_q: nn.Module, ids: torch.Tensor, evaluation: EvalSetting | None = None,
                *, stride: int | None = None, batch_size: int = 8, progress: bool | None = None, dataset: str = "",
                split: str = "", fp_cache: FPLogitsCache | None = None, fp_key: str | None = None,
                bos_id: int | None = None, partial: PartialResults | None = None, scored_from: int | None = None,
                **setting: Any) -> Comparison:
    """:func:`compare` on a 1-D stream of token ids ``[N]``, windowed as in :func:`compare` (``bos_id``: every
    window starts with that token). ``evaluation`` / ``seq_len=`` / ``max_windows=`` / ``partial`` as in
    :func:`compare`; the setting's ``bos`` and ``text`` are not read here (the ids are already the text, ``bos_id``
    the protocol).

    More than ten parameters, on purpose: past the evaluation setting, the keyword-only options are independent
    (window layout, batching, the names the result carries, the FP cache, the BOS token id, the partial results)."""
    windows = _id_windows(ids, evaluation, setting, stride=stride, dataset=dataset, split=split, bos_id=bos_id,
                          scored_from=scored_from)
    res = compare_windows(model_fp, model_q, windows, batch_size=batch_size, progress=progress,
                          dataset=dataset, split=split, fp_cache=fp_cache, fp_key=fp_key, partial=partial)
    return Comparison(**{**res.to_dict(), "stride": stride, "bos": bos_id is not None, "scored_from": scored_from})


def _id_windows(ids: torch.Tensor, evaluation: EvalSetting | None, setting: dict[str, Any], *, stride: int | None,
                dataset: str, split: str, bos_id: int | None, scored_from: int | None = None) -> Windows:
    """The windows :func:`compare_ids` scores (and :func:`fill_fp_cache` fills the FP side of)."""
    w = windowing(evaluation, setting, fn="compare_ids", allowed=("seq_len", "max_windows"))
    return make_windows(ids, w.seq_len, stride=stride, max_windows=w.max_windows,
                        source=f"{dataset} {split} tokens" if dataset else "the token ids", bos_id=bos_id,
                        scored_from=scored_from)


def fill_fp_cache(model_fp: nn.Module, tokenizer, evaluation: EvalSetting | None = None, *,
                  fp_cache: FPLogitsCache, fp_key: str, text: str | Path | None = None, dataset: str = "wikitext2",
                  split: str = "test", stride: int | None = None, batch_size: int = 8,
                  progress: bool | None = None, device: Any = None, partial: PartialResults | None = None,
                  scored_from: int | None = None, **setting: Any) -> bool:
    """Run only the FP side of :func:`compare` (the same arguments, the same windows and batches) and keep it in
    ``fp_cache`` under ``fp_key``, so that the FP model can be quantized in place and then compared with the cache in
    strict mode, the quantized model standing in for ``model_fp`` (whose head alone the comparison still reads)::

        fill_fp_cache(model, tok, setting, fp_cache=cache, fp_key=key)
        quantize_model(model, recipe, calib)          # in place: head and embeddings untouched
        with cache.strict():
            cmp = compare(model, model, tok, setting, fp_cache=cache, fp_key=key)

    That is right only when quantizing leaves the head as it was. Returns False, computing nothing, when the cache
    cannot keep the entry (too large for memory, no directory): compare with a copy of the FP model then. Memory:
    the model, one batch's activations and the cache (on disk above its ``max_bytes``). ``partial``: the
    :class:`~quantpredict.evaluate.partial.PartialResults` the comparison will be given; the windows it already
    holds (an interrupted comparison's) are skipped here too.
    """
    from quantpredict.evaluate.perplexity import setting_stream
    from quantpredict.evaluate.scoring import fill_fp_cache as fill_windows
    from quantpredict.memory import placed

    w, stream, _, _ = setting_stream(tokenizer, evaluation, setting, fn="compare", text=text, dataset=dataset,
                                     split=split)
    windows = _id_windows(stream.ids, None, {"seq_len": w.seq_len, "max_windows": w.max_windows}, stride=stride,
                          dataset=dataset, split=split, bos_id=stream.bos_id, scored_from=scored_from)
    with placed([model_fp], device):
        return fill_windows(model_fp, windows, fp_cache, fp_key, batch_size=batch_size, progress=progress,
                            partial=partial)


def compare(model_fp: nn.Module, model_q: nn.Module, tokenizer, evaluation: EvalSetting | None = None, *,
            text: str | Path | None = None, dataset: str = "wikitext2", split: str = "test", stride: int | None = None,
            batch_size: int = 8, progress: bool | None = None, fp_cache: FPLogitsCache | None = None,
            fp_key: str | None = None, device: Any = None, partial: PartialResults | None = None,
            scored_from: int | None = None, **setting: Any) -> Comparison:
    """Quantized model ``model_q`` against its FP original ``model_fp`` on the same windows of a text split.

    ``evaluation``: the :class:`~quantpredict.recipe.EvalSetting` (window length, number of windows, BOS, the user's
    text), the very object a run spec carries; or its fields as keywords, ``seq_len=`` (default 256),
    ``max_windows=`` and ``bos=`` (``compare(fp, q, tok, max_windows=64)``; with ``evaluation`` too they replace its
    fields). Without a setting the tokenizer's protocol decides BOS (``bos`` forces it); a setting's ``bos`` is
    used as it says. A setting naming a user's text (``text``, the sha256 prefix, as
    :meth:`~quantpredict.recipe.EvalSetting.with_text_file` makes it) reads its ``text_file`` (or the ``text``
    path given here) and checks that the file still hashes to it (:class:`~quantpredict.errors.DataError` if not).

    Windows as in :func:`quantpredict.evaluate.perplexity` (non-overlapping, ``seq_len`` tokens, the first
    ``max_windows``; ``stride`` for sliding windows). Both models run batch by batch; log-softmax is taken in
    float32 per batch, and per-window sums are accumulated in float64. Returns a :class:`Comparison` (delta NLL and
    perplexity with paired standard errors, mean KL divergence, top-1 agreement). ``fp_cache`` and ``fp_key``
    (a :class:`~quantpredict.evaluate.FPLogitsCache` and a name for ``model_fp``) skip the FP forward passes when
    the same FP model was compared on the same windows before, as in a sweep. ``text``: a UTF-8 file of the user's
    own text instead of the bundled split, as for :func:`quantpredict.evaluate.perplexity`.
    ``device``: where both models run (default: where they are); they are moved there for the call and back. Where
    the vocabulary is large the heads run in 64 MiB token chunks (``evaluate.scoring``), so memory beyond the
    models is one batch's activations plus a few such chunks, whatever ``max_windows`` is.
    ``partial`` (:class:`~quantpredict.evaluate.partial.PartialResults`, a file and a key naming the model pair and
    setting): the finished windows' sums are saved there after every batch, and a call after an interruption
    scores only the windows not yet done; totals and standard errors are the uninterrupted ones exactly (a file
    of another key, setting or windows is ignored and overwritten). The caller deletes the file when done.
    ``scored_from``: score only positions ``scored_from ..`` of every (non-overlapping) window, the earlier ones
    being context: ``seq_len=512, scored_from=257`` is llama.cpp's ``llama-perplexity`` protocol
    (:func:`~quantpredict.evaluate.windows.make_windows`).

    More than ten parameters, on purpose: the evaluation setting is one (``evaluation``, or its fields as
    keywords); the keyword-only options left are independent of it and of each other (which text, the window
    stride, batching, progress, the FP cache and its key, the device, the partial results) and none of them
    enters a run key.
    """
    from quantpredict.evaluate.perplexity import setting_stream
    from quantpredict.memory import placed

    w, stream, start, tokenize_seconds = setting_stream(tokenizer, evaluation, setting, fn="compare", text=text,
                                                        dataset=dataset, split=split)
    with placed([model_fp, model_q], device):
        res = compare_ids(model_fp, model_q, stream.ids, seq_len=w.seq_len, stride=stride, max_windows=w.max_windows,
                          batch_size=batch_size, progress=progress, dataset=dataset, split=split,
                          fp_cache=fp_cache, fp_key=fp_key, bos_id=stream.bos_id, partial=partial,
                          scored_from=scored_from)
    return Comparison(**{**res.to_dict(), "seconds": time.perf_counter() - start,
                         "tokenize_seconds": tokenize_seconds, "source": stream.source})
