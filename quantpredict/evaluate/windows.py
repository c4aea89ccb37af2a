"""Cutting a token stream into evaluation windows.

A window is a row of ``seq_len`` consecutive token ids plus the index of its first *scored* position: position ``j``
of a window is scored by predicting ``ids[j]`` from ``ids[:j]``. Every window has the same length, so any set of
windows batches without padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantpredict.errors import DataError


@dataclass(frozen=True)
class Windows:
    """Evaluation windows.

    ``ids``: ``[n, seq_len]`` token ids. ``first_scored``: ``[n]`` index of the first scored position of each
    window (>= 1); positions ``first_scored[k] .. seq_len - 1`` of window ``k`` are scored.
    """

    ids: torch.Tensor
    first_scored: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def scored_counts(self) -> torch.Tensor:
        """``[n]`` number of scored positions per window."""
        return self.seq_len - self.first_scored

    @property
    def scored_tokens(self) -> int:
        return int(self.scored_counts.sum())

    def __getitem__(self, index) -> Windows:
        return Windows(self.ids[index], self.first_scored[index])


def make_windows(ids: torch.Tensor, seq_len: int, *, stride: int | None = None,
                 max_windows: int | None = None, source: str = "the token ids", bos_id: int | None = None,
                 scored_from: int | None = None) -> Windows:
    """Windows over a 1-D stream of ``N`` token ids.

    ``stride=None``: ``N // seq_len`` non-overlapping windows, the remainder dropped; each window scores its
    ``seq_len - 1`` next-token predictions (its first token has no context).

    ``stride=s`` (``1 <= s < seq_len``): sliding windows starting every ``s`` tokens; every token after the first is
    scored exactly once, with at least ``seq_len - s`` tokens of context (``seq_len - 1`` at most). The last window
    is moved back to end at the last token, so no window is shorter than ``seq_len``.

    ``max_windows`` keeps the first windows only (a fixed prefix of the stream). ``source`` names the data in errors.

    ``bos_id`` (the BOS protocol, :func:`quantpredict.data.eval_protocol`): every window is that token followed by
    ``seq_len - 1`` text tokens, windowed as above over the text alone; the first text token of the stream is then
    scored too (predicted from BOS), and later windows score exactly the text tokens they would without BOS.

    ``scored_from=k`` (non-overlapping windows only, ``1 <= k < seq_len``): every window scores its positions
    ``k .. seq_len - 1`` alone, the earlier ones being context. llama.cpp's ``llama-perplexity`` protocol is
    ``seq_len=512, scored_from=257``: chunks of ``n_ctx = 512`` tokens, of which it scores the predictions of tokens
    ``n_ctx / 2 + 1 .. n_ctx - 1`` (``first = n_ctx / 2`` in ``perplexity``/``kl_divergence`` of its
    tools/perplexity/perplexity.cpp: the logits at positions ``first .. n_ctx - 2``), 255 per chunk.
    """
    if scored_from is not None:
        if stride is not None:
            raise DataError("scored_from needs non-overlapping windows; omit stride")
        if not isinstance(scored_from, int) or not 1 <= scored_from < seq_len:
            raise DataError(f"scored_from must be a position between 1 and seq_len - 1 = {seq_len - 1}, "
                            f"got {scored_from!r}")
        w = make_windows(ids, seq_len, max_windows=max_windows, source=source, bos_id=bos_id)
        return Windows(w.ids, torch.clamp(w.first_scored, min=scored_from))
    if bos_id is not None:
        if seq_len < 3:
            raise DataError(f"seq_len must be at least 3 under the BOS protocol (BOS, one token of context and one to "
                            f"predict), got {seq_len}")
        text = make_windows(ids, seq_len - 1, stride=stride, max_windows=max_windows, source=source)
        bos = torch.full((text.n, 1), int(bos_id), dtype=torch.long)
        first = text.first_scored + 1
        if stride is None:
            first = torch.ones_like(first)  # with BOS in front, a window's first text token is scored as well
        else:
            first[0] = 1
        return Windows(torch.cat([bos, text.ids], dim=1), first)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise DataError(f"{source} must be a 1-D tensor of token ids, got {shape}")
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 (one token of context and one to predict), got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be at least 1 (leave it unset for all windows), got {max_windows}")
    n_tokens = int(ids.numel())
    if n_tokens == 0:
        raise DataError(f"{source} are empty: there is no text to evaluate")
    if n_tokens < seq_len:
        raise DataError(f"{source} have {n_tokens} tokens, fewer than one window of seq_len={seq_len}; "
                        f"pass a seq_len of at most {n_tokens}")
    ids = ids.long()
    if stride is None:
        n = n_tokens // seq_len
        if max_windows is not None:
            n = min(n, max_windows)
        windows = ids[: n * seq_len].view(n, seq_len)
        return Windows(windows, torch.ones(n, dtype=torch.long))
    if not 1 <= stride < seq_len:
        raise DataError(f"stride must be between 1 and seq_len - 1 = {seq_len - 1}, got {stride}; "
                        "omit it for non-overlapping windows")
    starts, firsts = [0], [1]
    prev_end = seq_len
    while prev_end < n_tokens and (max_windows is None or len(starts) < max_windows):
        end = min(prev_end + stride, n_tokens)
        start = end - seq_len
        starts.append(start)
        firsts.append(prev_end - start)
        prev_end = end
    index = torch.tensor(starts).unsqueeze(1) + torch.arange(seq_len)
    return Windows(ids[index], torch.tensor(firsts, dtype=torch.long))
