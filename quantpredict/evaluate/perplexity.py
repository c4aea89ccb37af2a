"""Perplexity of a causal LM on a bundled text split, with the standard error of its NLL over windows."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantpredict.evaluate.scoring import nll_sums
from quantpredict.evaluate.setting import check_text, windowing
from quantpredict.evaluate.stats import ratio_mean_se
from quantpredict.evaluate.windows import Windows, make_windows
from quantpredict.recipe import EvalSetting


class PerplexityResult(float):
    """A perplexity (the float value itself) that carries how it was measured and its uncertainty.

    ``nll``: mean NLL in nats per predicted token (``ppl = exp(nll)``); ``nll_se``: its standard error over windows
    (NaN with one window); ``ppl_se``: the delta-method standard error ``ppl * nll_se``; ``tokens``: predicted
    tokens scored; ``windows``, ``seq_len``, ``stride`` (None = non-overlapping), ``dataset``, ``split``, ``seconds``
    (wall time of the whole evaluation) of which ``tokenize_seconds`` went to tokenizing the split (0 when cached);
    ``bos``: whether every window started with the BOS token; ``source``: the text (``wikitext2:test``, ``file:...``).
    """

    _FIELDS = ("nll", "nll_se", "tokens", "windows", "seq_len", "stride", "dataset", "split", "seconds",
               "tokenize_seconds", "bos", "source")

    nll: float
    nll_se: float
    tokens: int
    windows: int
    seq_len: int
    stride: int | None
    dataset: str
    split: str
    seconds: float
    tokenize_seconds: float
    bos: bool
    source: str

    def __new__(cls, *, nll: float, nll_se: float, tokens: int, windows: int, seq_len: int, stride: int | None = None,
                dataset: str = "", split: str = "", seconds: float = 0.0, tokenize_seconds: float = 0.0,
                bos: bool = False, source: str = "", ppl: float | None = None) -> PerplexityResult:
        self = super().__new__(cls, math.exp(nll) if ppl is None else ppl)
        values = dict(nll=float(nll), nll_se=float(nll_se), tokens=int(tokens), windows=int(windows),
                      seq_len=int(seq_len), stride=stride, dataset=dataset, split=split, seconds=float(seconds),
                      tokenize_seconds=float(tokenize_seconds), bos=bool(bos), source=str(source))
        for k, v in values.items():
            object.__setattr__(self, k, v)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("PerplexityResult is immutable")

    @property
    def ppl(self) -> float:
        return float(self)

    @property
    def ppl_se(self) -> float:
        return float(self) * self.nll_se

    @property
    def tokens_per_second(self) -> float:
        """Scoring throughput: predicted tokens per second of model time (tokenization excluded)."""
        scoring = self.seconds - self.tokenize_seconds
        return self.tokens / scoring if scoring > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: ``ppl``, ``ppl_se``, then every field."""
        return {"ppl": self.ppl, "ppl_se": self.ppl_se, **{k: getattr(self, k) for k in self._FIELDS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerplexityResult:
        return cls(**{k: d[k] for k in cls._FIELDS if k in d}, ppl=d.get("ppl"))

    def __reduce__(self):  # pickles (e.g. across Dask workers) keep the fields
        return (PerplexityResult.from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        return (f"PerplexityResult(ppl={self.ppl:.4f}, nll={self.nll:.5f} ± {self.nll_se:.5f}, tokens={self.tokens}, "
                f"windows={self.windows}, seq_len={self.seq_len})")

    def __str__(self) -> str:
        return f"{self.ppl:.4f}"


def perplexity_of_windows(model: nn.Module, windows: Windows, *, batch_size: int = 8,
                          progress: bool | None = None, dataset: str = "", split: str = "") -> PerplexityResult:
    """Perplexity over given :class:`Windows` (see :func:`perplexity`)."""
    start = time.perf_counter()
    sums = nll_sums(model, windows, batch_size=batch_size, progress=progress)
    nll, se = ratio_mean_se(sums.numpy(), windows.scored_counts.numpy())
    return PerplexityResult(nll=nll, nll_se=se, tokens=windows.scored_tokens, windows=windows.n,
                            seq_len=windows.seq_len, dataset=dataset, split=split,
                            seconds=time.perf_counter() - start)


def perplexity_of_ids(model: nn.Module, ids: torch.Tensor, *, seq_len: int = 256, stride: int | None = None,
                      max_windows: int | None = None, batch_size: int = 8, progress: bool | None = None,
                      dataset: str = "", split: str = "", bos_id: int | None = None) -> PerplexityResult:
    """Perplexity of a 1-D stream of token ids ``[N]``, windowed as in :func:`perplexity` (``bos_id``: every window
    starts with that token)."""
    start = time.perf_counter()
    windows = make_windows(ids, seq_len, stride=stride, max_windows=max_windows,
                           source=f"{dataset} {split} tokens" if dataset else "the token ids", bos_id=bos_id)
    res = perplexity_of_windows(model, windows, batch_size=batch_size, progress=progress, dataset=dataset, split=split)
    return PerplexityResult.from_dict({**res.to_dict(), "stride": stride, "seconds": time.perf_counter() - start,
                                       "bos": bos_id is not None})


def perplexity(model: nn.Module, tokenizer, evaluation: EvalSetting | None = None, *, text: str | Path | None = None,
               dataset: str = "wikitext2", split: str = "test", stride: int | None = None, batch_size: int = 8,
               progress: bool | None = None, device: Any = None, **setting: Any) -> PerplexityResult:
    """Perplexity of a Hugging Face causal LM on a bundled text split.

    The split's text, verbatim, is tokenized once (``quantpredict.data.token_ids``, no special tokens) and cut into
    non-overlapping windows of ``seq_len`` tokens, the remainder dropped; each window scores its ``seq_len - 1``
    next-token predictions, and the result is ``exp(total NLL / total predicted tokens)`` accumulated in float64.
    ``stride`` switches to sliding windows (each token after the first scored once, with at least
    ``seq_len - stride`` tokens of context). ``max_windows`` keeps the first windows (a fixed prefix of the split).

    The protocol (:func:`quantpredict.data.eval_protocol`): when the tokenizer prepends a BOS token, every window
    starts with it (``bos`` forces it on or off); WikiText's literal ``<unk>`` stays text. ``text``: a UTF-8 file of
    the user's own text instead of the bundled split.

    Returns a :class:`PerplexityResult`: a float that also carries ``nll``, ``nll_se`` (standard error over windows),
    ``tokens``, ``windows``, ``seq_len``, ``seconds``, ``bos``, ``source``. Raises :class:`DataError` for an unknown
    or empty split, ``seq_len < 2``, or fewer tokens than one window.

    ``device``: where the forward passes run (``"cuda"``; default: where the model is); the model is moved there
    for the call and back. The compute dtype is the model's (load it in bf16 for bf16 forward passes; the head,
    softmax and sums stay float32/float64).

    ``evaluation``: the :class:`~quantpredict.recipe.EvalSetting` (``seq_len``, ``max_windows``, ``bos``, the
    user's text), or its fields as keywords (``seq_len=`` default 256, ``max_windows=``, ``bos=``), exactly as for
    :func:`quantpredict.evaluate.compare`.

    Eleven parameters counting ``**setting`` (the setting's fields as keywords), on purpose: as for
    :func:`~quantpredict.evaluate.compare`, the keyword-only options left are independent of the setting and of each
    other (which text, the window stride, batching, progress, the device) and none of them enters a run key.
    """
    from quantpredict.memory import placed

    w, stream, start, tokenize_seconds = setting_stream(tokenizer, evaluation, setting, fn="perplexity", text=text,
                                                        dataset=dataset, split=split)
    with placed([model], device):
        res = perplexity_of_ids(model, stream.ids, seq_len=w.seq_len, stride=stride, max_windows=w.max_windows,
                                batch_size=batch_size, progress=progress, dataset=dataset, split=split,
                                bos_id=stream.bos_id)
    return PerplexityResult.from_dict({**res.to_dict(), "seconds": time.perf_counter() - start,
                                       "tokenize_seconds": tokenize_seconds, "source": stream.source})


def setting_stream(tokenizer, evaluation: EvalSetting | None, setting: dict[str, Any], *, fn: str,
                   text: str | Path | None, dataset: str, split: str):
    """What :func:`perplexity` and :func:`~quantpredict.evaluate.compare` do before any forward pass: resolve the
    evaluation setting (``evaluation`` or its fields as keywords; ``fn`` names the caller in errors), check the
    user's text against the setting's hash before and after tokenizing it, and tokenize. Returns ``(windowing,
    stream, start, tokenize_seconds)``, ``start`` the ``perf_counter`` at which tokenizing began (the evaluation's
    wall time counts from it)."""
    w = windowing(evaluation, setting, fn=fn, text=text)
    check_text(w)
    start = time.perf_counter()
    stream = eval_stream(tokenizer, dataset, split, text=w.text_file, bos=w.bos)
    check_text(w, stream)
    return w, stream, start, time.perf_counter() - start


def eval_stream(tokenizer, dataset: str = "wikitext2", split: str = "test", *, text: str | Path | None = None,
                bos: bool | None = None):
    """The evaluation text as a :class:`quantpredict.data.TokenStream` under the tokenizer's protocol (``bos``
    forces BOS on or off; ``text`` is a user's file instead of the bundled split)."""
    from quantpredict.data import Protocol, eval_protocol, token_stream

    protocol = eval_protocol(tokenizer)
    if bos is not None:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos and bos_id is None:
            from quantpredict.errors import DataError

            raise DataError("bos=True, but the tokenizer has no BOS token; leave bos unset (the protocol decides)")
        protocol = Protocol(int(bos_id) if bos else None)
    return token_stream(tokenizer, dataset, split, text_file=text, protocol=protocol)
