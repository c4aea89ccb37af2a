"""Batched forward passes that score windows: per-window sums of token statistics, accumulated in float64.

Logits are turned into log-probabilities in float32 one batch at a time, so memory stays at
``batch_size * seq_len * vocab`` floats whatever the number of windows; the comparison's KL divergence uses a
centred form that keeps float64 precision in float32 (see :func:`token_comparison`).

Where that batch of logits would be larger than ``chunk_bytes`` (``memory.LOGITS_CHUNK_BYTES``, 64 MiB: a 49k
vocabulary over 8 windows of 256 tokens is 400 MB), and for every half-precision model, the model body runs on the
batch and the head is applied to its last hidden state window by window in token chunks, in float32
(``lmhead.iter_logits``). The bound is then: the body's activations for one batch, plus per model one
``[chunk, vocab]`` float32 block (at most ``chunk_bytes``) and ``token_comparison``'s few temporaries of that size;
nothing held grows with the number of windows except the ``[n]`` float64 sums. The FP cache then keeps the FP
model's last hidden states (``hidden / vocab`` of the logits' size: 85x smaller for SmolLM2) instead of logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantpredict import lmhead
from quantpredict.arch import max_positions, model_device
from quantpredict.errors import DataError, ModelError
from quantpredict.evaluate.partial import PartialResults
from quantpredict.evaluate.windows import Windows
from quantpredict.memory import LOGITS_CHUNK_BYTES, logits_chunk_tokens


def check_model(model: nn.Module, windows: Windows, name: str = "model") -> None:
    """Raise a clear error before a forward pass would fail on a too-long window or an out-of-vocabulary id."""
    limit = max_positions(model)
    if limit is not None and windows.seq_len > limit:
        raise DataError(f"seq_len={windows.seq_len} is longer than the {name}'s {limit} positions; "
                        f"pass a seq_len of at most {limit}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and windows.n and int(windows.ids.max()) >= vocab:
        raise ModelError(f"the tokenizer produced id {int(windows.ids.max())}, outside the {name}'s vocabulary of "
                         f"{vocab}; evaluate the model with its own tokenizer")


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Dropout off and no autograd while scoring; each model's training flag is restored afterwards."""
    flags = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


def next_token_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[b, seq_len - 1, vocab]`` float32 logits; row ``j`` predicts token ``j + 1`` of each window."""
    out = model(input_ids=ids.to(model_device(model)), use_cache=False)
    return out.logits[:, :-1].float()


def scored_mask(windows: Windows) -> torch.Tensor:
    """``[n, seq_len - 1]`` bool: prediction row ``j`` (of token ``j + 1``) is scored."""
    rows = torch.arange(1, windows.seq_len)
    return rows.unsqueeze(0) >= windows.first_scored.unsqueeze(1)


def batches(windows: Windows, batch_size: int, *, desc: str, progress: bool | None) -> Iterator[Windows]:
    """The windows in consecutive batches, behind a tqdm bar counting windows (auto-hidden when not a TTY)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    disable = None if progress is None else not progress
    with tqdm(total=windows.n, desc=desc, unit="win", disable=disable, leave=False) as bar:
        for lo in range(0, windows.n, batch_size):
            batch = windows[lo : lo + batch_size]
            yield batch
            bar.update(batch.n)


def chunked_head(model: nn.Module, batch_tokens: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> bool:
    """True when scoring should apply the head in token chunks on the body's hidden states: the batch's float32
    logits (``batch_tokens x vocab x 4`` bytes) exceed ``chunk_bytes``, or the model computes in half precision
    (its head then runs in float32). Only for heads that :func:`quantpredict.lmhead.supports_chunking`."""
    if not lmhead.supports_chunking(model):
        return False
    vocab = int(lmhead.head_weight(model).shape[0])
    half = lmhead.head_weight(model).dtype in (torch.float16, torch.bfloat16)
    return half or batch_tokens * vocab * 4 > chunk_bytes


def _head32(model: nn.Module) -> torch.Tensor:
    """The head's weight ``[vocab, hidden]`` in float32 (a copy for a half-precision model, once per call)."""
    w = lmhead.head_weight(model).detach()
    return w if w.dtype == torch.float32 else w.float()


def batch_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[b, seq_len - 1, hidden]``: the last hidden states that predict tokens ``1 ..`` of each window."""
    return lmhead.final_hidden(model, ids.to(model_device(model)))[:, :-1]


def nll_sums(model: nn.Module, windows: Windows, *, batch_size: int = 8, progress: bool | None = None,
             desc: str = "perplexity", chunk_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
    # the NLL itself is quantpredict.lmhead's (token_nll; chunked_cross_entropy for a large vocabulary), the one
    # the features differentiate: evaluation and features cannot disagree on what a token's loss is
    """``[n]`` float64 sum of next-token NLL (nats) over each window's scored positions (head in token chunks of at
    most ``chunk_bytes`` float32 logits where the vocabulary is large; see the module docstring)."""
    check_model(model, windows)
    out = torch.empty(windows.n, dtype=torch.float64)
    chunked = chunked_head(model, batch_size * (windows.seq_len - 1), chunk_bytes)
    head = _head32(model) if chunked else None
    with eval_mode(model):
        lo = 0
        for batch in batches(windows, batch_size, desc=desc, progress=progress):
            mask = scored_mask(batch)
            if chunked:
                hidden = batch_hidden(model, batch.ids)
                out[lo : lo + batch.n] = _chunked_nll(hidden, head, batch.ids[:, 1:].to(hidden.device), mask,
                                                      logits_chunk_tokens(head.shape[0], chunk_bytes))
            else:
                logits = next_token_logits(model, batch.ids)
                targets = batch.ids[:, 1:].to(logits.device)
                nll = lmhead.token_nll(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
                out[lo : lo + batch.n] = (nll.reshape(targets.shape).cpu().double() * mask).sum(dim=1)
            _check_finite(out[lo : lo + batch.n], lo, "model")
            lo += batch.n
    return out


def _chunked_nll(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                 chunk: int) -> torch.Tensor:
    """``[b]`` float64 NLL sums of ``hidden`` ``[b, s, d]`` under ``head`` ``[V, d]``, ``chunk`` tokens at a time."""
    sums = torch.zeros(hidden.shape[0], dtype=torch.float64)
    for i in range(hidden.shape[0]):
        keep = mask[i].to(hidden.device).bool()  # the scored positions only (mask is 0/1)
        sums[i] = float(lmhead.chunked_cross_entropy(hidden[i][keep], head, targets[i][keep], chunk))
    return sums


def window_nlls(model: nn.Module, windows: torch.Tensor | Windows, *, batch_size: int = 8,
                progress: bool | None = False) -> torch.Tensor:
    """Mean next-token NLL (nats/token) of each window: ``[n]`` float64.

    ``windows`` is a ``[n, seq_len]`` LongTensor of token ids (every position after the first is scored) or a
    :class:`Windows` (its ``first_scored`` respected). A building block for anyone scoring their own windows.
    """
    if isinstance(windows, torch.Tensor):
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise DataError(f"windows must be [n, seq_len >= 2] token ids, got shape {tuple(windows.shape)}")
        windows = Windows(windows.long(), torch.ones(windows.shape[0], dtype=torch.long))
    return nll_sums(model, windows, batch_size=batch_size, progress=progress) / windows.scored_counts.double()


def token_comparison(logits_fp: torch.Tensor, logits_q: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position statistics of a quantized model's next-token distribution against the FP one.

    ``logits_fp``, ``logits_q``: ``[..., vocab]`` float32 logits for the same positions; ``targets``: ``[...]`` the
    true next tokens. Returns ``[...]`` tensors ``nll_fp``, ``delta_nll`` (``nll_quant - nll_fp``), ``kld``
    (KL(P_fp || P_q), nats) and ``top1`` (1.0 where both argmaxes agree).

    KL and delta NLL are computed from the logit difference ``d = z_fp - z_q`` centred on its FP-weighted mean ``m``:
    ``KL = log1p(sum_v p_v expm1(-(d_v - m)))`` and ``delta_nll = (d_t - m) + KL``. Every term is as small as the
    quantization error, so float32 comes close to a float64 log-softmax (per-token error ~1e-8 nats at KL ~3e-5,
    where the plain float32 ``sum p (log p - log q)`` errs by ~5e-7). ``d`` is exact when the two models' logits are
    within a factor of 2 of each other (Sterbenz), as a quantized copy's are.
    Positions where ``expm1`` overflows (logits that differ by > 80) fall back to float64 log-softmax.
    """
    d = logits_fp - logits_q
    p = torch.softmax(logits_fp, dim=-1)
    m = (p * d).sum(dim=-1, keepdim=True)
    dc = d - m
    kld = torch.log1p((p * torch.expm1(-dc)).sum(dim=-1))
    t = targets.unsqueeze(-1)
    delta = dc.gather(-1, t).squeeze(-1) + kld
    nll_fp = torch.logsumexp(logits_fp, dim=-1) - logits_fp.gather(-1, t).squeeze(-1)
    bad = ~torch.isfinite(kld)
    if bool(bad.any()):
        lp = torch.log_softmax(logits_fp[bad].double(), dim=-1)
        lq = torch.log_softmax(logits_q[bad].double(), dim=-1)
        tb = t[bad]
        kld[bad] = (lp.exp() * (lp - lq)).sum(dim=-1).to(kld.dtype)
        delta[bad] = (lp.gather(-1, tb) - lq.gather(-1, tb)).squeeze(-1).to(delta.dtype)
    top1 = (logits_fp.argmax(dim=-1) == logits_q.argmax(dim=-1)).to(kld.dtype)
    return {"nll_fp": nll_fp, "delta_nll": delta, "kld": kld, "top1": top1}


class FPLogitsCache:
    """The FP model's logits, batch by batch, kept between comparisons of one FP model with many quantized copies.

    A sweep compares each FP model with dozens of recipes on the same windows; keeping the FP side's logits saves
    one of the two forward passes of every comparison after the first. One entry (FP model key x windows x batch
    size) is held at a time: in memory if its logits fit in ``max_bytes`` (float32: ``n x (seq_len - 1) x vocab x
    4`` bytes, 1 GiB for 256 windows of 256 tokens with a 4096-token vocabulary), else, with ``directory`` set, on
    disk as one memory-mapped float32 ``.npy`` file per batch (64 windows of a 49k vocabulary are 3.2 GB: they stay
    out of memory), else not at all. The caller names the FP model by ``key`` (e.g. its name and weights hash): a
    wrong key gives wrong results. The cache only ever deletes the files it wrote, and ``directory`` if it made it
    (as soon as it holds none of them: an interrupted process leaves no empty folder behind).

    Inside ``with cache.strict():`` every comparison must find each FP batch here (filled by
    :func:`fill_fp_cache`): a miss, or an entry the cache cannot keep, raises instead of running the "FP" model,
    which in a one-copy run is the quantized model itself.
    """

    def __init__(self, max_bytes: int = 2 * 2**30, directory: str | Path | None = None):
        self.max_bytes = int(max_bytes)
        self.directory = None if directory is None else Path(directory)
        self.entry: tuple | None = None
        self.logits: dict[int, torch.Tensor] = {}
        self.hits = 0
        self._on_disk = False
        self._written: list[Path] = []
        self._made_dir = False
        self.strict_mode = False

    @contextlib.contextmanager
    def strict(self) -> Iterator[FPLogitsCache]:
        """Strict mode for the ``with`` (see the class docstring); the previous mode is restored after."""
        old, self.strict_mode = self.strict_mode, True
        try:
            yield self
        finally:
            self.strict_mode = old

    def lookup(self, key: str, windows: Windows, batch_size: int, vocab: int, *, what: str = "logits") -> bool:
        """Select the entry for ``key`` on ``windows``; True if its logits may be kept (in memory or on disk).

        ``what="hidden"`` keeps the FP model's last hidden states instead (``vocab`` is then the hidden size): the
        comparison applies the head in chunks itself when the vocabulary is large."""
        ids = windows.ids.long()
        checksum = int((ids * torch.arange(1, ids.numel() + 1).view_as(ids)).sum())  # same windows, same order
        entry = (key, tuple(ids.shape), checksum, int(windows.first_scored.sum()), batch_size)
        if what != "logits":
            entry += (what,)
        nbytes = windows.n * (windows.seq_len - 1) * vocab * 4
        if entry != self.entry:
            self._drop()
            self.entry, self._on_disk = entry, nbytes > self.max_bytes
        return not self._on_disk or self.directory is not None

    def _path(self, batch: int) -> Path:
        import hashlib

        digest = hashlib.sha256(repr(self.entry).encode()).hexdigest()[:16]
        return self.directory / f"fp-logits-{digest}-b{batch}.npy"

    def get(self, batch: int) -> torch.Tensor | None:
        """The cached logits of batch ``batch`` of the current entry, or ``None``."""
        if batch in self.logits:
            self.hits += 1
            return self.logits[batch]
        if self._on_disk and self.directory is not None and self._path(batch) in self._written:
            import numpy as np

            self.hits += 1
            return torch.from_numpy(np.load(self._path(batch), mmap_mode="c"))
        return None

    def put(self, batch: int, logits: torch.Tensor) -> None:
        if not self._on_disk:
            self.logits[batch] = logits
            return
        import numpy as np

        if not self.directory.is_dir():
            self.directory.mkdir(parents=True)
            self._made_dir = True
        path = self._path(batch)
        tmp = path.with_suffix(".tmp.npy")
        try:
            np.save(tmp, logits.detach().cpu().float().numpy())
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)  # interrupted mid-write: no half file
        self._written.append(path)

    def _drop(self) -> None:
        self.logits = {}
        for path in self._written:
            path.unlink(missing_ok=True)
        self._written = []
        if self._made_dir and self.directory is not None:
            try:
                self.directory.rmdir()  # only when empty: another's files are never touched
                self._made_dir = False
            except OSError:
                pass

    def close(self) -> None:
        """Forget the entry and delete the files this cache wrote."""
        self._drop()
        self.entry = None


def pair_sums(model_fp: nn.Module, model_q: nn.Module, windows: Windows, *, batch_size: int = 8,
              progress: bool | None = None, desc: str = "compare", fp_cache: FPLogitsCache | None = None,
              fp_key: str | None = None, chunk_bytes: int | None = None,
              partial: PartialResults | None = None) -> dict[str, torch.Tensor]:
    """Per-window float64 sums, over scored positions, of the statistics ``compare`` reports.

    Returns ``{"nll_fp", "delta_nll", "kld", "top1"}``, each ``[n]`` (see :func:`token_comparison`): the FP NLL, the
    quantized-minus-FP NLL, KL(P_fp || P_q) in nats, and the count of positions whose most likely next token agrees.
    ``fp_cache`` with ``fp_key`` (naming ``model_fp``) reuses the FP logits of an earlier call on the same windows
    (or of :func:`fill_fp_cache`); a cache in strict mode (:meth:`FPLogitsCache.strict`) must hold every batch, and
    ``model_fp`` is then read for its head alone. Where the vocabulary is large (or a model is half precision)
    both heads run in token chunks of at most ``chunk_bytes`` (default ``LOGITS_CHUNK_BYTES``, read at call time)
    float32 logits on the models' hidden states (see the module docstring for the bound).

    ``partial`` (:class:`~quantpredict.evaluate.partial.PartialResults`): the sums of the windows done so far are
    saved there after every batch, and the batches a previous call on the same entry finished are taken from it
    instead of being scored again (neither model runs on them): the result is the uninterrupted one, bit for bit.
    """
    chunk_bytes = LOGITS_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    check_model(model_fp, windows, "FP model")
    check_model(model_q, windows, "quantized model")
    keys = ("nll_fp", "delta_nll", "kld", "top1")
    out = {k: torch.empty(windows.n, dtype=torch.float64) for k in keys}

    chunked = _chunked_pair(model_fp, model_q, batch_size * (windows.seq_len - 1), chunk_bytes)
    entry = None if partial is None else partial.entry(windows, batch_size, chunked)
    done, saved = (0, {}) if partial is None else partial.load(entry)
    for k, v in saved.items():
        out[k][: len(v)] = v
    heads = (_head32(model_fp), _head32(model_q)) if chunked else None
    if heads is not None and heads[0].shape != heads[1].shape:
        _vocab_mismatch(heads[0].shape[0], heads[1].shape[0])
    with eval_mode(model_fp, model_q):
        lo = done * batch_size  # every batch but the last is full
        for b, (batch, first) in enumerate(_fp_side(model_fp, windows, batch_size=batch_size, chunked=chunked,
                                                    fp_cache=fp_cache, fp_key=fp_key, desc=desc, progress=progress,
                                                    skip=done), start=done):
            if chunked:  # hidden states (maybe read back from disk): to the device of the FP head
                first = first.to(heads[0].device)
            second = batch_hidden(model_q, batch.ids) if chunked else next_token_logits(model_q, batch.ids)
            second = second.to(first.device)
            if heads is None and first.shape != second.shape:
                _vocab_mismatch(first.shape[-1], second.shape[-1])
            targets = batch.ids[:, 1:].to(first.device)
            mask = scored_mask(batch)
            for i in range(batch.n):  # one window at a time bounds the temporaries to seq_len x vocab
                for k, v in _window_stats(first[i], second[i], targets[i], mask[i], heads, chunk_bytes).items():
                    out[k][lo + i] = v
            _check_finite(out["nll_fp"][lo : lo + batch.n], lo, "FP model")
            _check_finite(out["delta_nll"][lo : lo + batch.n], lo, "quantized model")
            lo += batch.n
            if partial is not None:
                partial.save(entry, b + 1, {k: v[:lo] for k, v in out.items()})
    return out


def fill_fp_cache(model_fp: nn.Module, windows: Windows, fp_cache: FPLogitsCache, fp_key: str, *,
                  batch_size: int = 8, progress: bool | None = None, desc: str = "FP side",
                  chunk_bytes: int | None = None, partial: PartialResults | None = None) -> bool:
    """Put the FP side of a later :func:`pair_sums` (same windows, ``batch_size`` and ``fp_key``) into ``fp_cache``:
    the FP model's forward passes alone, batch by batch, exactly as :func:`pair_sums` would run them (the same
    batches, and the same choice between logits and hidden states, for a quantized model whose head is the FP
    model's). Batches already cached are not recomputed. Returns False, computing nothing, when the cache cannot
    keep this entry (too large for memory and no directory): the caller must then keep the FP model for the
    comparison. The memory is ``model_fp``, one batch's activations and the cache (on disk above ``max_bytes``).
    ``partial``: the :class:`~quantpredict.evaluate.partial.PartialResults` the later :func:`pair_sums` will be given;
    the batches it already holds (of an interrupted comparison of the same entry) are neither run nor cached.
    """
    chunk_bytes = LOGITS_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    check_model(model_fp, windows, "FP model")
    chunked = _chunked_pair(model_fp, model_fp, batch_size * (windows.seq_len - 1), chunk_bytes)
    if not _fp_entry(model_fp, windows, batch_size, chunked, fp_cache, fp_key):
        return False
    done = 0 if partial is None else partial.load(partial.entry(windows, batch_size, chunked))[0]
    with eval_mode(model_fp):
        for _ in _fp_side(model_fp, windows, batch_size=batch_size, chunked=chunked, fp_cache=fp_cache,
                          fp_key=fp_key, desc=desc, progress=progress, skip=done):
            pass
    return True


def _chunked_pair(model_fp: nn.Module, model_q: nn.Module, tokens: int, chunk_bytes: int) -> bool:
    """Whether :func:`pair_sums` applies both heads in token chunks (hidden states cached) or compares logits."""
    return (lmhead.supports_chunking(model_fp) and lmhead.supports_chunking(model_q)
            and (chunked_head(model_fp, tokens, chunk_bytes) or chunked_head(model_q, tokens, chunk_bytes)))


def _fp_entry(model_fp: nn.Module, windows: Windows, batch_size: int, chunked: bool,
              fp_cache: FPLogitsCache | None, fp_key: str | None) -> bool:
    """Select the cache entry of ``model_fp`` on ``windows``; True when its batches can be kept."""
    if fp_cache is None or fp_key is None:
        return False
    width = arch_width(model_fp) if chunked else int(getattr(model_fp.config, "vocab_size", 0) or 0)
    return width > 0 and fp_cache.lookup(fp_key, windows, batch_size, width, what="hidden" if chunked else "logits")


def _fp_side(model_fp: nn.Module, windows: Windows, *, batch_size: int, chunked: bool,
             fp_cache: FPLogitsCache | None, fp_key: str | None, desc: str, progress: bool | None,
             skip: int = 0) -> Iterator[tuple[Windows, torch.Tensor]]:
    """``(batch, FP logits or hidden states)`` per batch after the first ``skip`` (those are neither computed nor
    looked up): from the cache, or computed by ``model_fp`` (in eval mode, the caller's) and put there. A cache in
    strict mode raises on an entry it cannot keep or a missing batch instead of running ``model_fp``, which may then
    be a quantized model that shares the FP head."""
    strict = fp_cache is not None and fp_cache.strict_mode
    if strict and fp_key is None:
        raise ModelError("a strict FP cache needs fp_key naming the FP model")
    keep = _fp_entry(model_fp, windows, batch_size, chunked, fp_cache, fp_key)
    if strict and not keep:
        raise ModelError(f"the strict FP cache cannot hold the FP side of {fp_key!r} on these windows (too large "
                         "for memory and no directory); fill it first or compare with the FP model itself")
    for b, batch in enumerate(batches(windows, batch_size, desc=desc, progress=progress)):
        if b < skip:
            continue
        first = fp_cache.get(b) if keep else None
        if first is None:
            if strict:
                raise ModelError(f"the strict FP cache misses batch {b} of {fp_key!r} "
                                 f"({'hidden states' if chunked else 'logits'}, batch size {batch_size}); fill it "
                                 "with evaluate.fill_fp_cache on the same windows and FP model first")
            first = batch_hidden(model_fp, batch.ids) if chunked else next_token_logits(model_fp, batch.ids)
            if keep:
                fp_cache.put(b, first)
        yield batch, first


def _vocab_mismatch(v_fp: int, v_q: int) -> None:
    raise ModelError(f"the FP and quantized models disagree on the vocabulary ({v_fp} vs {v_q} logits); compare a "
                     "model only with its own quantized copy")


def arch_width(model: nn.Module) -> int:
    """The hidden size the head reads (the width of the FP cache's hidden states)."""
    return int(lmhead.head_weight(model).shape[1])


def _window_stats(first: torch.Tensor, second: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  heads: tuple[torch.Tensor, torch.Tensor] | None, chunk_bytes: int) -> dict[str, float]:
    """One window's float64 sums of :func:`token_comparison` over its scored positions: from the two models'
    logits ``[s, V]``, or (``heads`` given) from their hidden states ``[s, d]``, ``chunk`` token rows at a time."""
    if heads is None:
        stats = token_comparison(first, second, targets)
        return {k: float((v.cpu().double() * mask).sum()) for k, v in stats.items()}

    chunk = logits_chunk_tokens(heads[0].shape[0], chunk_bytes)
    sums = dict.fromkeys(("nll_fp", "delta_nll", "kld", "top1"), 0.0)
    for lo, z_fp in lmhead.iter_logits(first, heads[0], chunk):
        hi = lo + z_fp.shape[0]
        z_q = F.linear(second[lo:hi].to(heads[1].dtype), heads[1]).float()
        for k, v in token_comparison(z_fp, z_q, targets[lo:hi]).items():
            sums[k] += float((v.cpu().double() * mask[lo:hi]).sum())
    return sums


def _check_finite(sums: torch.Tensor, offset: int, name: str) -> None:
    bad = (~torch.isfinite(sums)).nonzero()
    if len(bad):
        raise ModelError(f"the {name} produced non-finite logits (NaN/Inf) on window {offset + int(bad[0])}; its "
                         "weights or activations overflowed (check them with quantpredict.arch.check_finite)")
