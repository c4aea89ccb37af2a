"""Block-sparse masks and the sparse decode/prefill attention, held to dense SDPA with the equivalent bool mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantpredict.attention import (
    block_mask_to_token_mask,
    dense_decode_reference,
    dense_prefill_reference,
    span_block_index,
    spans_to_block_mask,
    sparse_decode_attention,
    sparse_prefill_attention,
    starts_to_block_mask,
    triton_kernel,
)
from quantpredict.attention.bench import bench_decode, md_table, pick_blocks, write_section
from quantpredict.errors import DataError


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _decode_inputs(B, H, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, D, generator=g), torch.randn(B, H, T, D, generator=g),
            torch.randn(B, H, T, D, generator=g), g)


# ----------------------------------------------------------------------------------------------------------- masks
def test_spans_to_block_mask_hand_case():
    # 10 positions, blocks of 4: query 9 attends [0, 2) and [5, 7) -> blocks 0 and 1, plus its own block 2
    spans = [[(0, q + 1)] for q in range(9)] + [[(0, 2), (5, 7)]]
    m = spans_to_block_mask(spans, 10, 4)
    assert m.blocks.shape == (10, 3)
    assert m.block_index(9).tolist() == [0, 1, 2]
    tok = m.token_mask()
    assert tok[9].tolist() == [True] * 10  # blocks 0..2 cover every key <= 9
    assert tok.tril().equal(tok)  # never a future key


def test_spans_clip_to_causal_past_and_density():
    # every query asks for everything, future included: rounded and clipped it is dense causal, density 1
    m = spans_to_block_mask([[(0, 100)] for _ in range(7)], 7, 3)
    assert m.token_mask().equal(torch.ones(7, 7, dtype=torch.bool).tril())
    assert m.density == pytest.approx(1.0)
    # only the query's own block: density = mean over q of (q % bs + 1) / (q + 1), by hand
    m = spans_to_block_mask([[] for _ in range(6)], 6, 2)
    want = sum((q % 2 + 1) / (q + 1) for q in range(6)) / 6
    assert m.density == pytest.approx(want)


def test_sink_blocks_and_single_query_index_agree_with_mask():
    g = torch.Generator().manual_seed(3)
    T, bs = 50, 8
    spans = []
    for q in range(T):
        s = int(torch.randint(0, q + 1, (1,), generator=g))
        spans.append([(s, s + 5)])
    m = spans_to_block_mask(spans, T, bs, sink_blocks=1)
    for q in range(T):
        assert span_block_index(spans[q], q, bs, sink_blocks=1).tolist() == m.block_index(q).tolist()
        assert m.blocks[q, 0]


def test_starts_to_block_mask_and_query_blocks():
    m = starts_to_block_mask([0, 0, 0, 0, 4, 4, 4, 4, 4, 6], 2, sink_blocks=0)
    assert m.block_index(9).tolist() == [3, 4]
    qb = m.query_blocks()
    assert qb.shape == (5, 5)
    assert qb[4].tolist() == [False, False, True, True, True]  # union of queries 8 (blocks 2..4) and 9


def test_bad_mask_inputs_raise():
    with pytest.raises(DataError, match="block_size"):
        spans_to_block_mask([[]], 1, 0)
    with pytest.raises(DataError, match="seq_len"):
        spans_to_block_mask([[]], 2, 4)


# ----------------------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("B,H,T,D,bs", [(1, 1, 16, 8, 4), (2, 3, 37, 16, 8), (3, 4, 130, 32, 16),
                                        (1, 8, 512, 64, 64), (2, 2, 1000, 64, 32)])
@pytest.mark.parametrize("density", [0.05, 0.25, 0.5, 1.0])
def test_sparse_decode_matches_sdpa(B, H, T, D, bs, density):
    q, k, v, g = _decode_inputs(B, H, T, D, seed=T + int(100 * density))
    nb = -(-T // bs)
    idx = pick_blocks(nb, density, g)
    out = sparse_decode_attention(q, k, v, idx, block_size=bs)
    ref = dense_decode_reference(q, k, v, idx, block_size=bs)
    assert out.shape == (B, H, D)
    assert rel_err(out, ref) < 1e-5


def test_decode_reference_is_independent_of_the_sparse_path():
    # the reference itself, against a float64 softmax written out by hand for one (b, h)
    q, k, v, _ = _decode_inputs(1, 1, 20, 4, seed=0)
    idx = torch.tensor([1, 3])  # blocks of 5: keys 5..9 and 15..19
    ref = dense_decode_reference(q, k, v, idx, block_size=5)[0, 0].double()
    keys = list(range(5, 10)) + list(range(15, 20))
    s = (k[0, 0, keys].double() @ q[0, 0].double()) / 2.0
    want = torch.softmax(s, 0) @ v[0, 0, keys].double()
    assert torch.allclose(ref, want, rtol=1e-5, atol=1e-6)
    assert rel_err(sparse_decode_attention(q, k, v, idx, block_size=5), ref.float()) < 1e-5


def test_decode_single_block_partial_last_block_and_kv_len():
    q, k, v, _ = _decode_inputs(2, 2, 45, 8, seed=1)
    # a query that attends a single block: equals plain softmax over those keys
    out = sparse_decode_attention(q, k, v, torch.tensor([2]), block_size=10)
    ref = F.scaled_dot_product_attention(q[:, :, None], k[:, :, 20:30], v[:, :, 20:30])[:, :, 0]
    assert rel_err(out, ref) < 1e-5
    # partial last block (45 = 4 * 10 + 5) and a cache filled only to 33 (the rest is garbage, must be ignored)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 33:] = 1e4
    v2[:, :, 33:] = -1e4
    idx = torch.tensor([0, 3])
    out = sparse_decode_attention(q, k2, v2, idx, block_size=10, kv_len=33)
    ref = dense_decode_reference(q, k, v, idx, block_size=10, kv_len=33)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5
    out = sparse_decode_attention(q, k, v, torch.tensor([4]), block_size=10)  # only the 5-key partial block
    ref = F.scaled_dot_product_attention(q[:, :, None], k[:, :, 40:], v[:, :, 40:])[:, :, 0]
    assert rel_err(out, ref) < 1e-5


def test_decode_per_row_block_index_with_padding_and_per_row_kv_len():
    q, k, v, _ = _decode_inputs(3, 2, 64, 16, seed=2)
    idx = torch.tensor([[0, 3, 7], [5, -1, -1], [1, 2, -1]])
    kv_len = torch.tensor([64, 47, 20])
    out = sparse_decode_attention(q, k, v, idx, block_size=8, kv_len=kv_len)
    ref = dense_decode_reference(q, k, v, idx, block_size=8, kv_len=kv_len)
    assert rel_err(out, ref) < 1e-5
    for b in range(3):  # each row alone, through the shared-index path
        row = idx[b][idx[b] >= 0]
        one = sparse_decode_attention(q[b: b + 1], k[b: b + 1], v[b: b + 1], row, block_size=8,
                                      kv_len=int(kv_len[b]))
        assert rel_err(one, out[b: b + 1]) < 1e-5


def test_decode_full_density_equals_unmasked_sdpa():
    q, k, v, _ = _decode_inputs(2, 4, 96, 32, seed=4)
    out = sparse_decode_attention(q, k, v, torch.arange(3), block_size=32)
    ref = F.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]
    assert rel_err(out, ref) < 1e-5


def test_decode_range_block_index_equals_tensor_index_and_reference():
    q, k, v, _ = _decode_inputs(2, 2, 100, 8, seed=5)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 71:] = 1e4  # past kv_len: garbage that must not be read
    v2[:, :, 71:] = -1e4
    for blocks, kv_len in [(range(3, 8), 71), (range(0, 1), 5), (range(7, 8), 71), (range(2, 10), None),
                           (range(4, 8), torch.tensor([71, 71]))]:
        out = sparse_decode_attention(q, k2 if kv_len is not None else k, v2 if kv_len is not None else v, blocks,
                                      block_size=10, kv_len=kv_len)
        ref = dense_decode_reference(q, k, v, torch.tensor(list(blocks)), block_size=10, kv_len=kv_len)
        via_tensor = sparse_decode_attention(q, k, v, torch.tensor(list(blocks)), block_size=10, kv_len=kv_len)
        assert rel_err(out, ref) < 1e-5
        assert rel_err(out, via_tensor) < 1e-6
    # per-row kv_len that differs falls back to the masked path
    kv = torch.tensor([71, 45])
    out = sparse_decode_attention(q, k, v, range(2, 8), block_size=10, kv_len=kv)
    assert rel_err(out, dense_decode_reference(q, k, v, range(2, 8), block_size=10, kv_len=kv)) < 1e-5
    with pytest.raises(DataError, match="step 1"):
        sparse_decode_attention(q, k, v, range(0, 8, 2), block_size=10)
    with pytest.raises(DataError, match="no valid key"):
        sparse_decode_attention(q, k, v, range(8, 9), block_size=10, kv_len=50)


def test_workspace_reuses_gather_buffers_and_changes_nothing():
    q, k, v, _ = _decode_inputs(2, 3, 96, 8, seed=6)
    ws: dict = {}
    for idx in (torch.tensor([0, 2, 5]), torch.tensor([1, 4, 5]), torch.tensor([[0, 3, 5], [2, 5, -1]]),
                torch.tensor([3, 5])):
        kv = torch.tensor([96, 90]) if idx.dim() == 2 else 96
        plain = sparse_decode_attention(q, k, v, idx, block_size=16, kv_len=kv)
        reused = sparse_decode_attention(q, k, v, idx, block_size=16, kv_len=kv, workspace=ws)
        assert torch.equal(plain, reused)
        assert rel_err(reused, dense_decode_reference(q, k, v, idx, block_size=16, kv_len=kv)) < 1e-5
    assert set(ws) == {"k", "v"}
    ptr = ws["k"].data_ptr()
    sparse_decode_attention(q, k, v, torch.tensor([1, 5]), block_size=16, workspace=ws)  # same shape: same buffer
    assert ws["k"].data_ptr() == ptr


def test_decode_shape_errors():
    q, k, v, _ = _decode_inputs(1, 1, 8, 4, seed=0)
    with pytest.raises(DataError, match="q \\[B, H, D\\]"):
        sparse_decode_attention(q[:, :, None], k, v, torch.tensor([0]), block_size=4)


# ----------------------------------------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("B,H,T,D,bs", [(1, 1, 9, 4, 4), (2, 3, 64, 16, 16), (1, 2, 100, 32, 32), (2, 2, 257, 8, 64)])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("causal", [True, False])
def test_sparse_prefill_matches_sdpa(B, H, T, D, bs, density, causal):
    g = torch.Generator().manual_seed(T + int(10 * density))
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    nb = -(-T // bs)
    bm = torch.rand(nb, nb, generator=g) < density
    bm |= torch.eye(nb, dtype=torch.bool)  # every query reads its own block, so no row is empty
    if causal:
        bm &= torch.ones(nb, nb, dtype=torch.bool).tril()
    out = sparse_prefill_attention(q, k, v, bm, block_size=bs, causal=causal)
    ref = dense_prefill_reference(q, k, v, bm, block_size=bs, causal=causal)
    assert rel_err(out, ref) < 1e-5


def test_prefill_from_spans_mask_and_full_mask_is_causal_sdpa():
    g = torch.Generator().manual_seed(0)
    B, H, T, D, bs = 2, 2, 70, 16, 8
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    full = torch.ones(-(-T // bs), -(-T // bs), dtype=torch.bool)
    out = sparse_prefill_attention(q, k, v, full, block_size=bs)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-5
    m = starts_to_block_mask([max(0, p - 20) for p in range(T)], bs, sink_blocks=1)
    qb = m.query_blocks()
    out = sparse_prefill_attention(q, k, v, qb, block_size=bs)
    tok = block_mask_to_token_mask(qb, bs, T, T)
    assert (tok | ~m.token_mask()).all()  # the block-level mask covers every query's own spans
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, attn_mask=tok)) < 1e-5


def test_prefill_bad_mask_shape():
    x = torch.zeros(1, 1, 10, 4)
    with pytest.raises(DataError, match="block_mask"):
        sparse_prefill_attention(x, x, x, torch.ones(2, 2, dtype=torch.bool), block_size=4)


# ----------------------------------------------------------------------------------------------------------- triton
def test_triton_module_imports_without_gpu():
    if not triton_kernel.available():
        with pytest.raises(RuntimeError, match="triton and a CUDA GPU"):
            triton_kernel.sparse_decode_attention_triton(*_decode_inputs(1, 1, 8, 4, 0)[:3], torch.tensor([0]),
                                                         block_size=4)


@pytest.mark.skipif(not triton_kernel.available(), reason="needs triton and a CUDA GPU")
def test_triton_matches_reference():  # pragma: no cover - GPU only
    q, k, v, g = _decode_inputs(2, 4, 1000, 64, seed=0)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    for density in (0.05, 0.5, 1.0):
        idx = pick_blocks(-(-1000 // 64), density, g).cuda()
        out = triton_kernel.sparse_decode_attention_triton(q, k, v, idx, block_size=64, kv_len=1000)
        ref = dense_decode_reference(q, k, v, idx, block_size=64, kv_len=1000)
        assert rel_err(out, ref) < 1e-5


# ----------------------------------------------------------------------------------------------------------- bench
def test_pick_blocks_density_and_last_block():
    g = torch.Generator().manual_seed(0)
    idx = pick_blocks(40, 0.25, g)
    assert idx.numel() == 10 and idx[-1] == 39 and (idx.diff() > 0).all()
    assert pick_blocks(40, 0.0, g).tolist() == [39]
    assert pick_blocks(5, 1.0, g).tolist() == [0, 1, 2, 3, 4]


def test_bench_decode_rows_and_report_section(tmp_path):
    df = bench_decode([64, 200], [0.25, 1.0], heads=2, head_dim=8, block_size=16, repeats=2, min_seconds=1e-4)
    assert len(df) == 4
    assert (df["dense_us"] > 0).all() and (df["sparse_us"] > 0).all()
    full = df[df["density_target"] == 1.0]
    assert (full["density"] == 1.0).all()
    assert df.loc[(df.context == 200) & (df.density_target == 0.25), "blocks"].item() == 3  # round(0.25 * 13)
    rep = tmp_path / "a.md"
    write_section(rep, "one", "first")
    write_section(rep, "two", "second")
    write_section(rep, "one", "again")
    text = rep.read_text()
    assert "again" in text and "first" not in text and text.index("again") < text.index("second")
    assert md_table(df[["context", "blocks"]]).splitlines()[2] == "| 64 | 1 |"
