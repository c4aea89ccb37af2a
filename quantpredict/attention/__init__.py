"""Sparse attention: spans -> block-sparse masks, sparse decode/prefill attention, its benchmark, and the
arithmetic task whose model names its own spans (:mod:`quantpredict.attention.arith`)."""

from quantpredict.attention.kernels import (
    block_mask_to_token_mask,
    dense_decode_reference,
    dense_prefill_reference,
    gather_blocks,
    sparse_decode_attention,
    sparse_prefill_attention,
)
from quantpredict.attention.masks import BlockMask, span_block_index, spans_to_block_mask, starts_to_block_mask

__all__ = [
    "BlockMask",
    "block_mask_to_token_mask",
    "dense_decode_reference",
    "dense_prefill_reference",
    "gather_blocks",
    "span_block_index",
    "sparse_decode_attention",
    "sparse_prefill_attention",
    "spans_to_block_mask",
    "starts_to_block_mask",
]
