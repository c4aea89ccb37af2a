"""Block-sparse attention on the CPU (PyTorch): gather the attended K/V blocks, then attend.

The dense reference is ``torch.nn.functional.scaled_dot_product_attention`` with the equivalent boolean mask
(:func:`dense_decode_reference`, :func:`dense_prefill_reference`); the tests hold the sparse paths to it.
Shapes: ``B`` batch, ``H`` heads, ``T`` cached keys, ``D`` head dim, ``bs`` block size, ``n`` attended blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantpredict.errors import DataError


def _as_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, H, nb, bs, D]``; a ``T`` that is not a block multiple is zero-padded (a copy, so
    callers on the hot path allocate caches in whole blocks)."""
    B, H, T, D = x.shape
    pad = -T % block_size
    if pad:
        x = torch.cat([x, x.new_zeros(B, H, pad, D)], dim=2)
    return x.view(B, H, (T + pad) // block_size, block_size, D)


def _buffer(workspace: dict[str, torch.Tensor] | None, key: str, shape: tuple[int, ...],
            like: torch.Tensor) -> torch.Tensor | None:
    """A buffer of ``shape`` kept in ``workspace`` under ``key`` (made or remade on a change of shape), or None."""
    if workspace is None:
        return None
    buf = workspace.get(key)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = workspace[key] = like.new_empty(shape)
    return buf


def gather_blocks(cache: torch.Tensor, block_index: torch.Tensor, block_size: int, *,
                  workspace: dict[str, torch.Tensor] | None = None, key: str = "blocks") -> torch.Tensor:
    """The attended blocks of a ``[B, H, T, D]`` cache, concatenated: ``[B, H, n * bs, D]``.

    ``block_index``: ``[n]`` (shared by the batch) or ``[B, n]``; entries ``< 0`` are padding (block 0 is read in
    their place and must be masked by the caller). A shared index that is one ascending run of blocks (a contiguous
    span, the common case) is returned as a view of the cache, without a copy. ``workspace``: a dict the caller keeps
    between calls; the copy is written into a buffer kept there under ``key`` instead of a fresh allocation (a
    gather of megabytes otherwise pays the allocator's page faults on every call, several times the copy itself).
    The result then aliases that buffer until the next call with the same key.
    """
    B, H, T, D = cache.shape
    if block_index.dim() == 1 and block_index.numel() and int(block_index[0]) >= 0:
        first, n = int(block_index[0]), block_index.numel()
        end = (first + n) * block_size
        if end <= T and int(block_index[-1]) == first + n - 1 and bool((block_index.diff() == 1).all()):
            return cache[:, :, first * block_size: end]
    blocks = _as_blocks(cache, block_size)
    nb, bs = blocks.shape[2], blocks.shape[3]
    idx = block_index.clamp(min=0)
    if idx.dim() == 1:
        # index_select along a leading dim of a [B*H, nb, bs*D] view: several times faster than along dim 2 of 5-D
        buf = _buffer(workspace, key, (B * H, idx.numel(), bs * D), cache)
        src = blocks.reshape(B * H, nb, bs * D)
        out = src.index_select(1, idx) if buf is None else torch.index_select(src, 1, idx, out=buf)
    else:
        buf = _buffer(workspace, key, (B, H, idx.shape[1], bs * D), cache)
        where = idx[:, None, :, None].expand(B, H, idx.shape[1], bs * D)
        src = blocks.reshape(B, H, nb, bs * D)
        out = torch.gather(src, 2, where) if buf is None else torch.gather(src, 2, where, out=buf)
    return out.reshape(B, H, -1, D)


def _key_positions(block_index: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache positions of the gathered keys: ``[..., n * bs]`` (padding blocks map to -1)."""
    offs = torch.arange(block_size, device=block_index.device)
    pos = block_index[..., :, None] * block_size + offs
    pos = torch.where(block_index[..., :, None] < 0, torch.full_like(pos, -1), pos)
    return pos.flatten(-2)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_index: torch.Tensor | range, *, block_size: int,
                            kv_len: int | torch.Tensor | None = None, scale: float | None = None,
                            workspace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One decoding step of attention that reads only the attended K/V blocks.

    q: ``[B, H, D]``; k_cache, v_cache: ``[B, H, T, D]`` (``T`` the cache capacity); block_index: ``[n]`` or
    ``[B, n]`` attended block ids (``-1`` = padding, for rows that attend fewer blocks), or a ``range`` of block ids
    shared by the batch (one contiguous span, read as a view of the cache with no per-call tensor bookkeeping: the
    decoder's common case); kv_len: the number of valid cached keys (int or ``[B]``; default ``T``): keys at or past
    it (the unfilled part of the last block) are masked. Every row must attend at least one valid key.
    ``workspace``: a dict kept between calls (e.g. one per layer) to reuse the gather buffers, see
    :func:`gather_blocks`. Returns ``[B, H, D]``.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise DataError(f"sparse_decode_attention: want q [B, H, D] and caches [B, H, T, D], got q {tuple(q.shape)}, "
                        f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    B, H, T, D = k_cache.shape
    if isinstance(block_index, range):
        return _contiguous_decode(q, k_cache, v_cache, block_index, block_size, kv_len, scale, workspace)
    k = gather_blocks(k_cache, block_index, block_size, workspace=workspace, key="k")
    v = gather_blocks(v_cache, block_index, block_size, workspace=workspace, key="v")
    pos = _key_positions(block_index, block_size)  # [n*bs] or [B, n*bs]
    limit = T if kv_len is None else kv_len
    limit_t = torch.as_tensor(limit, device=q.device).reshape(-1, 1) if torch.is_tensor(limit) else limit
    valid = (pos >= 0) & (pos < limit_t)
    if valid.dim() == 1:
        valid = valid.expand(B, -1)
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale)
    return out[:, :, 0, :]


def _contiguous_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: range,
                       block_size: int, kv_len: int | torch.Tensor | None, scale: float | None,
                       workspace: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """:func:`sparse_decode_attention` for one ascending run of blocks shared by the batch: SDPA over a cache slice."""
    T = k_cache.shape[2]
    if blocks.step != 1 or len(blocks) == 0 or blocks.start < 0:
        raise DataError(f"sparse_decode_attention: a range block_index must be a non-empty run of block ids with "
                        f"step 1, got {blocks}")
    if torch.is_tensor(kv_len):
        if kv_len.numel() > 1 and bool((kv_len != kv_len.flatten()[0]).any()):
            return sparse_decode_attention(q, k_cache, v_cache, torch.tensor(blocks), block_size=block_size,
                                           kv_len=kv_len, scale=scale, workspace=workspace)
        kv_len = int(kv_len.flatten()[0])
    start, end = blocks.start * block_size, min(blocks.stop * block_size, T if kv_len is None else kv_len)
    if end <= start:
        raise DataError(f"sparse_decode_attention: blocks {blocks} hold no valid key (kv_len={kv_len})")
    out = F.scaled_dot_product_attention(q[:, :, None, :], k_cache[:, :, start:end], v_cache[:, :, start:end],
                                         scale=scale)
    return out[:, :, 0, :]


def dense_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_index: torch.Tensor | range, *, block_size: int,
                           kv_len: int | torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """What :func:`sparse_decode_attention` computes, by dense SDPA over the whole cache with the equivalent bool
    mask. Same arguments and result shape."""
    B, H, T, D = k_cache.shape
    if isinstance(block_index, range):
        block_index = torch.tensor(list(block_index), dtype=torch.long)
    idx = block_index if block_index.dim() == 2 else block_index.expand(B, -1)
    key_block = torch.arange(T, device=q.device) // block_size
    attended = (key_block[None, :, None] == idx[:, None, :]).any(dim=2)  # [B, T]
    limit = T if kv_len is None else kv_len
    limit_t = torch.as_tensor(limit, device=q.device).reshape(-1, 1)
    attended &= torch.arange(T, device=q.device)[None, :] < limit_t
    out = F.scaled_dot_product_attention(q[:, :, None, :], k_cache, v_cache, attn_mask=attended[:, None, None, :],
                                         scale=scale)
    return out[:, :, 0, :]


def block_mask_to_token_mask(block_mask: torch.Tensor, block_size: int, q_len: int, kv_len: int,
                             causal: bool = True) -> torch.Tensor:
    """Block-level ``[n_qb, n_kb]`` -> token-level bool ``[q_len, kv_len]`` (queries and keys both from position 0),
    causally clipped unless ``causal=False``."""
    m = block_mask.repeat_interleave(block_size, 0)[:q_len].repeat_interleave(block_size, 1)[:, :kv_len]
    if causal:
        m = m & torch.ones(q_len, kv_len, dtype=torch.bool, device=m.device).tril()
    return m


def sparse_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, *,
                             block_size: int, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Prefill attention under a block mask: each query block reads only its attended key blocks.

    q, k, v: ``[B, H, T, D]`` (queries and keys at the same positions); block_mask: bool ``[n_qb, n_kb]`` shared
    by batch and heads (``n_qb = n_kb = ceil(T / bs)``). With ``causal``, a key after its query is never read (the
    diagonal block is masked inside). Every query must attend at least one key (with ``causal``, make the diagonal
    block attended). Returns ``[B, H, T, D]``.
    """
    B, H, T, D = q.shape
    nb = -(-T // block_size)
    if block_mask.shape != (nb, nb):
        raise DataError(f"sparse_prefill_attention: block_mask must be [{nb}, {nb}] for T={T}, "
                        f"block_size={block_size}; got {tuple(block_mask.shape)}")
    out = torch.empty_like(q)
    offs = torch.arange(block_size, device=q.device)
    for qb in range(nb):
        q0, q1 = qb * block_size, min((qb + 1) * block_size, T)
        idx = torch.nonzero(block_mask[qb]).flatten()
        if causal:
            idx = idx[idx <= qb]
        kpos = (idx[:, None] * block_size + offs).flatten()
        keep = kpos < T
        kg = gather_blocks(k, idx, block_size)
        vg = gather_blocks(v, idx, block_size)
        qpos = torch.arange(q0, q1, device=q.device)
        mask = keep[None, :] & ((kpos[None, :] <= qpos[:, None]) if causal else True)
        full = bool(mask.all())
        out[:, :, q0:q1] = F.scaled_dot_product_attention(q[:, :, q0:q1], kg, vg, attn_mask=None if full else mask,
                                                          scale=scale)
    return out


def dense_prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, *,
                            block_size: int, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """:func:`sparse_prefill_attention` by dense SDPA with the equivalent bool ``[T, T]`` mask."""
    T = q.shape[2]
    mask = block_mask_to_token_mask(block_mask, block_size, T, T, causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
