"""A Triton kernel for block-sparse decode attention (GPU only; never run in this repository's CI).

Same operation as :func:`quantpredict.attention.kernels.sparse_decode_attention` with a shared ``[n]`` block index:
one program per (batch, head) walks the attended blocks with an online softmax, so unattended blocks are never read.
It has NOT been run on a GPU (the sessions that wrote it had none); :func:`available` is False without triton and
CUDA, and :func:`sparse_decode_attention_triton` then raises. The check against the reference is
``tests/test_attention.py::test_triton_matches_reference`` (skipped without a GPU).
"""

from __future__ import annotations

import torch

try:  # triton is optional: the package must import (and CI pass) without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:  # pragma: no cover - needs a GPU

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, kv_len, n_sel, scale,
                       stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_ob, stride_oh,
                       H: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
        pid = tl.program_id(0)
        b, h = pid // H, pid % H
        d = tl.arange(0, D)
        t = tl.arange(0, BS)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32)
        m = tl.full((), float("-inf"), tl.float32)
        s_sum = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        base_k = k_ptr + b * stride_kb + h * stride_kh
        base_v = v_ptr + b * stride_kb + h * stride_kh
        for i in range(n_sel):
            blk = tl.load(idx_ptr + i)
            pos = blk * BS + t
            ok = pos < kv_len
            offs = pos[:, None] * stride_kt + d[None, :]
            k = tl.load(base_k + offs, mask=ok[:, None], other=0.0).to(tl.float32)
            v = tl.load(base_v + offs, mask=ok[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m - m_new)
            s_sum = s_sum * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m = m_new
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, acc / s_sum)


def sparse_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   block_index: torch.Tensor, *, block_size: int, kv_len: int | None = None,
                                   scale: float | None = None) -> torch.Tensor:
    """q ``[B, H, D]``, caches ``[B, H, T, D]`` (contiguous, on CUDA), block_index ``[n]`` ascending -> ``[B, H, D]``.
    ``D`` and ``block_size`` must be powers of two."""
    if not available():
        raise RuntimeError("sparse_decode_attention_triton needs triton and a CUDA GPU; "
                           "use quantpredict.attention.sparse_decode_attention on the CPU")
    B, H, T, D = k_cache.shape  # pragma: no cover - needs a GPU
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    out = torch.empty_like(q)
    idx = block_index.to(device=q.device, dtype=torch.int32).contiguous()
    _decode_kernel[(B * H,)](q, k_cache, v_cache, idx, out, T if kv_len is None else kv_len, idx.numel(),
                             scale if scale is not None else D ** -0.5,
                             q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                             out.stride(0), out.stride(1), H=H, BS=block_size, D=D)
    return out
