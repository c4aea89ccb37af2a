"""Attention spans -> block-sparse masks.

A *span* is a half-open key range ``(start, end)``; every query position attends to the union of its spans, clipped
to the causal past (keys ``<= query``). A block-sparse mask rounds that key set out to whole blocks of ``block_size``
keys, which is what a kernel that skips unattended blocks reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quantpredict.errors import DataError

Span = tuple[int, int]


@dataclass(frozen=True)
class BlockMask:
    """Per query position, which key blocks it attends.

    ``blocks``: bool ``[seq_len, n_blocks]``, row ``q`` = the key blocks query position ``q`` reads (never a block
    past the query's own block). ``density``: attended keys (after rounding to blocks and clipping to the causal past)
    over the causal keys, averaged over queries: the fraction of dense causal attention work the sparse path does.
    """

    blocks: torch.Tensor
    block_size: int
    seq_len: int

    @property
    def n_blocks(self) -> int:
        return self.blocks.shape[1]

    def token_mask(self) -> torch.Tensor:
        """The equivalent bool ``[seq_len, seq_len]`` mask (True = attend): blocks expanded, causal clipped."""
        keys = self.blocks.repeat_interleave(self.block_size, dim=1)[:, : self.seq_len]
        causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril()
        return keys & causal

    @property
    def density(self) -> float:
        attended = self.token_mask().sum(dim=1).double()
        causal = torch.arange(1, self.seq_len + 1, dtype=torch.float64)
        return float((attended / causal).mean())

    def block_index(self, query: int) -> torch.Tensor:
        """The attended block indices of query position ``query``, ascending: LongTensor ``[n_attended]``."""
        return torch.nonzero(self.blocks[query]).flatten()

    def query_blocks(self) -> torch.Tensor:
        """Block-level mask ``[n_blocks, n_blocks]`` for prefill: a query block reads the union of its queries'
        blocks (so its rows may see a few more keys than each query's own spans)."""
        nb = self.n_blocks
        pad = nb * self.block_size - self.seq_len
        rows = torch.cat([self.blocks, self.blocks.new_zeros(pad, nb)]) if pad else self.blocks
        return rows.view(nb, self.block_size, nb).any(dim=1)


def n_blocks(seq_len: int, block_size: int) -> int:
    return math.ceil(seq_len / block_size)


def spans_to_block_mask(spans: Sequence[Sequence[Span]], seq_len: int, block_size: int, *,
                        sink_blocks: int = 0) -> BlockMask:
    """Per query position ``q`` (``len(spans) == seq_len``), its key spans -> a :class:`BlockMask`.

    Each span ``(start, end)`` is clipped to ``[0, q + 1)``; ``sink_blocks`` leading blocks are attended by every
    query (attention sinks). The query's own key is always attended, so no row is empty.
    """
    if block_size < 1:
        raise DataError(f"spans_to_block_mask: block_size must be >= 1, got {block_size}")
    if len(spans) != seq_len:
        raise DataError(f"spans_to_block_mask: got spans for {len(spans)} queries but seq_len={seq_len}; "
                        "give one list of (start, end) ranges per query position")
    nb = n_blocks(seq_len, block_size)
    blocks = torch.zeros(seq_len, nb, dtype=torch.bool)
    for q, ranges in enumerate(spans):
        last = q // block_size
        blocks[q, last] = True
        if sink_blocks:
            blocks[q, : min(sink_blocks, last + 1)] = True
        for start, end in ranges:
            start, end = max(0, int(start)), min(int(end), q + 1)
            if start >= end:
                continue
            blocks[q, start // block_size: (end - 1) // block_size + 1] = True
    return BlockMask(blocks, block_size, seq_len)


def span_block_index(spans: Sequence[Span], query: int, block_size: int, *, sink_blocks: int = 0) -> torch.Tensor:
    """The attended key blocks of one query position (decode), ascending: LongTensor ``[n]``. Same rules as
    :func:`spans_to_block_mask` for a single row, without building the whole mask."""
    last = query // block_size
    chosen = {last, *range(min(sink_blocks, last + 1))}
    for start, end in spans:
        start, end = max(0, int(start)), min(int(end), query + 1)
        if start < end:
            chosen.update(range(start // block_size, (end - 1) // block_size + 1))
    return torch.tensor(sorted(chosen), dtype=torch.long)


def starts_to_block_mask(starts: Sequence[int], block_size: int, *, sink_blocks: int = 1) -> BlockMask:
    """A :class:`BlockMask` for one contiguous span per query, ``[starts[q], q]`` (the arithmetic task's shape)."""
    seq_len = len(starts)
    return spans_to_block_mask([[(s, q + 1)] for q, s in enumerate(starts)], seq_len, block_size,
                               sink_blocks=sink_blocks)
