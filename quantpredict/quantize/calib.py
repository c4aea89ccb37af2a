"""Calibration statistics of linear-layer inputs: the GPTQ Hessian ``H = 2/N sum x x^T``, per-channel max |x| and
mean |x| (AWQ's activation statistic).

:func:`capture_linear_inputs` hooks the inputs of a set of linear layers while the caller runs forward passes;
:func:`collect_hessians` does that for a whole (unquantized) model over calibration windows. Products ``x^T x`` are
computed in float32 per batch and accumulated in float64, so that ``N`` large does not lose precision. Inside
:func:`capture_linear_inputs` the product of one input tensor is computed once for all the linears that read it
(q/k/v, gate/up) into one float32 buffer per width, reused batch after batch: the same float32 product, added to the
same float64 sums, so the Hessians are bit for bit those of one fresh product per linear and batch, without the
fresh ``[in, in]`` float32 product and its float64 copy per batch (321 MB and 642 MB at a 1.5B model's 8960-wide
down projection: its statistics of a 256-token batch took 1.0-1.4 s, now 0.76 s, one thread; a whole Qwen2 block's
calibration statistics 1.1x faster, ``reports/benchmarks.md`` "ab-calib").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from quantpredict import arch
from quantpredict.arch import LinearRef


class InputStats:
    """Running statistics of one linear layer's input ``x`` (``[..., in]``)."""

    def __init__(self, in_features: int, *, hessian: bool = True):
        self.in_features = in_features
        self.tokens = 0
        self.absmax = torch.zeros(in_features, dtype=torch.float32)
        self.abssum = torch.zeros(in_features, dtype=torch.float64)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64) if hessian else None

    def add(self, x: torch.Tensor, products: InputProducts | None = None) -> None:
        """Take one batch of inputs ``x`` ``[..., in]``; ``products``: where its ``x^T x`` is computed (or found,
        when another linear read the same tensor), default a fresh product."""
        raw = x
        x = x.detach().reshape(-1, self.in_features).to(torch.float32)
        if self.absmax.device != x.device:  # first batch on an accelerator: keep the sums where the data is
            self.absmax = self.absmax.to(x.device)
            self.abssum = self.abssum.to(x.device)
            self.xtx = None if self.xtx is None else self.xtx.to(x.device)
        self.tokens += x.shape[0]
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        self.abssum += x.abs().sum(dim=0, dtype=torch.float64)
        if self.xtx is not None:
            # the float32 product added to the float64 sums (the conversion is exact: as ``+= (x.T @ x).double()``)
            self.xtx.add_(torch.mm(x.T, x) if products is None else products.of(raw, x))

    @property
    def absmean(self) -> torch.Tensor:
        """Per-channel mean ``|x|`` over the ``N`` tokens seen, ``[in]`` float64."""
        if self.tokens == 0:
            raise ValueError("no inputs were captured: run a forward pass inside capture_linear_inputs")
        return self.abssum / self.tokens

    @property
    def hessian(self) -> torch.Tensor:
        """``2/N sum x x^T`` over the ``N`` tokens seen, ``[in, in]`` float64."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without the Hessian (hessian=False)")
        if self.tokens == 0:
            raise ValueError("no inputs were captured: run a forward pass inside capture_linear_inputs")
        return self.xtx * (2.0 / self.tokens)


class InputProducts:
    """``x^T x`` (float32) of the input tensor last seen at each width, in one buffer per width: the linears that
    read one tensor (q/k/v, gate/up: their hooks see the same object, one after the other) share one product, and
    the buffer is reused batch after batch instead of a fresh ``[in, in]`` tensor each time."""

    def __init__(self) -> None:
        self._by_width: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def of(self, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The product of ``x`` ``[N, in]`` (float32), the input ``raw`` as the hook received it: reused when the
        last product of this width was of that very tensor, unchanged since (held, so its id cannot be reused)."""
        width = x.shape[1]
        held = self._by_width.get(width)
        if held is not None and held[0] is raw and held[1] == raw._version:
            return held[2]
        buffer = held[2] if held is not None and held[2].device == x.device else torch.empty(
            width, width, dtype=torch.float32, device=x.device)
        torch.mm(x.T, x, out=buffer)
        self._by_width[width] = (raw, raw._version, buffer)
        return buffer


@contextmanager
def capture_linear_inputs(refs: Sequence[LinearRef], *, hessian: bool = True) -> Iterator[dict[str, InputStats]]:
    """Hook the inputs of ``refs``; forward passes run inside the ``with`` fill ``{name: InputStats}``.

    The hooks see the input as the module receives it (before any activation fake-quant hook registered later).
    """
    stats = {ref.name: InputStats(ref.in_features, hessian=hessian) for ref in refs}
    products = InputProducts()
    with arch.input_hooks(refs, lambda ref, x: stats[ref.name].add(x, products)):
        yield stats


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    names: Sequence[str] | None = None,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """``{linear name: H [in, in] (float64)}`` for the model's linear layers on ``windows`` ([n, seq_len] ids).

    ``H = 2/N sum_t x_t x_t^T`` over all ``N`` calibration tokens of the layer's input, measured on the model as it
    is (one full forward pass per batch). ``names`` restricts the layers (default: all of ``arch.linear_layers``).
    """
    if windows.dim() != 2 or windows.numel() == 0:
        from quantpredict.errors import DataError

        raise DataError(f"windows must be a non-empty [n, seq_len] tensor of token ids, got {tuple(windows.shape)}")
    refs = arch.linear_layers(model)
    if names is not None:
        wanted = set(names)
        unknown = wanted - {r.name for r in refs}
        if unknown:
            raise ValueError(f"unknown linear layer name(s) {sorted(unknown)}; see arch.linear_layers(model)")
        refs = [r for r in refs if r.name in wanted]
    with capture_linear_inputs(refs) as stats:
        for start in range(0, windows.shape[0], batch_size):
            model(windows[start : start + batch_size], use_cache=False)
    return {name: s.hessian for name, s in stats.items()}


def sample_calibration(
    tokenizer,
    n_samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    dataset: str = "wikitext2",
    split: str = "train",
    text_file: str | None = None,
) -> torch.Tensor:
    """``[n_samples, seq_len]`` calibration windows of ``dataset``/``split`` (WikiText-2 *train* by default).

    Tokenizing all of WikiText-2 train takes minutes on a busy 2-core machine, while calibration needs ~32k tokens:
    this draws ``n_samples`` character offsets uniformly (seeded), moves each to the next word boundary, and
    tokenizes only a chunk there, long enough for ``seq_len`` tokens. Same role as cutting 1-D ids at random offsets
    (:func:`quantpredict.data.calibration_windows`), at a fraction of the cost; pass the result as ``calib_ids``.

    The evaluation protocol holds here too (:func:`quantpredict.data.eval_protocol`): under a BOS protocol each
    window is the BOS token and ``seq_len - 1`` text tokens, and WikiText's literal ``<unk>`` stays text.
    ``text_file``: a user's UTF-8 text instead of the bundled split.
    """
    from quantpredict.data import eval_protocol, load_text, read_text_file
    from quantpredict.errors import DataError

    if n_samples < 1 or seq_len < 2:
        raise DataError(f"need at least 1 calibration window of at least 2 tokens (got {n_samples} x {seq_len})")
    text = read_text_file(text_file)[0] if text_file is not None else load_text(dataset, split)
    if text_file is not None:
        dataset, split = f"file {text_file}", "text"
    bos_id = eval_protocol(tokenizer).bos_id
    n_text = seq_len - (bos_id is not None)
    g = torch.Generator().manual_seed(seed)
    windows = []
    chars = 8 * seq_len
    for _ in range(n_samples):
        if len(text) < 2 * chars:
            raise DataError(f"{dataset}/{split} has {len(text)} characters, too few for calibration windows of "
                            f"{seq_len} tokens; use a shorter calib_seq_len")
        start = int(torch.randint(0, len(text) - chars, (1,), generator=g))
        while True:
            space = text.find(" ", start, start + 200)
            chunk = text[(space + 1 if space >= 0 else start) : start + chars]
            ids = tokenizer(chunk, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
            if len(ids) >= n_text or start + chars >= len(text):
                break
            chars *= 2  # a tokenizer with few characters per token: read longer chunks from now on
        if len(ids) < n_text:
            raise DataError(f"could not cut a window of {seq_len} tokens from {dataset}/{split} at offset {start}; "
                            "use a shorter calib_seq_len")
        head = [bos_id] if bos_id is not None else []
        windows.append(torch.tensor(head + ids[:n_text], dtype=torch.long))
    return torch.stack(windows)
