"""llama.cpp's activation formats (quantpredict.formats.ggml_act): hand-computed blocks, a numpy re-implementation,
and, when the pinned sdist and an AVX2 CPU are here, llama.cpp's own x86 quantizers byte for byte."""

from __future__ import annotations

import ggml_oracle
import numpy as np
import pytest
import torch

from quantpredict.errors import FormatError
from quantpredict.formats import fake_quantize, fit_params, get_format, quantize_with_params
from quantpredict.formats.ggml_act import Q8_K_BYTES, to_ggml_bytes


def _block(values: list[float], n: int) -> torch.Tensor:
    """One row of ``n``: ``values`` first, zeros after."""
    x = torch.zeros(1, n)
    x[0, : len(values)] = torch.tensor(values)
    return x


def test_hand_q8_k():
    # max = -127 (the first of largest |x|): iscale = -127 / -127 = 1, d = 1; codes round half to even
    x = _block([-127.0, 2.5, 3.5, -2.5, 0.5, 1.49, 127.0], 256)
    assert fake_quantize(x, "q8_k")[0, :7].tolist() == [-127.0, 2.0, 4.0, -2.0, 0.0, 1.0, 127.0]
    # max = +254: iscale = -0.5, d = -2; 5 -> -2.5 -> -2 -> 4, 7 -> -3.5 -> -4 -> 8, -254 -> 127 -> -254
    y = fake_quantize(_block([254.0, 5.0, 7.0, -254.0, 1.0], 256), "q8_k")
    assert y[0, :5].tolist() == [254.0, 4.0, 8.0, -254.0, 0.0]
    packed = to_ggml_bytes(_block([254.0, 5.0, 7.0, -254.0], 256), "q8_k")
    assert packed.shape == (1, Q8_K_BYTES)
    assert packed[0, :4].view(np.float32)[0] == -2.0  # float32 d, not fp16
    assert packed[0, 4:8].view(np.int8).tolist() == [-127, -2, -4, 127]
    assert packed[0, 260:262].view(np.int16)[0] == -127 - 2 - 4 + 127  # bsums[0]: the first 16 codes
    assert not fake_quantize(torch.zeros(2, 256), "q8_k").any()


def test_hand_q8_0_x86_rounds_half_even():
    # amax 63.5: id = 127 / 63.5 = 2, d = 0.5 (exact in fp16); 1.25 -> 2.5 -> 2 (the reference q8_0's roundf: 3)
    x = _block([63.5, 1.25, 1.75, -1.25, 0.25], 32)
    assert fake_quantize(x, "q8_0_x86")[0, :5].tolist() == [63.5, 1.0, 2.0, -1.0, 0.0]
    assert fake_quantize(x, "q8_0")[0, :5].tolist() == [63.5, 1.5, 2.0, -1.5, 0.5]
    packed = to_ggml_bytes(x, "q8_0_x86")
    assert packed.shape == (1, 34) and packed[0, :2].view(np.float16)[0] == 0.5
    assert packed[0, 2:7].view(np.int8).tolist() == [127, 2, 4, -2, 0]


def _q8_k_numpy(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K_ref then d * q, in numpy float32 step by step (an independent re-implementation)."""
    out = np.zeros_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 256):
            blk = x[r, b: b + 256]
            mx = blk[int(np.argmax(np.abs(blk)))]
            if mx == 0:
                continue
            iscale = np.float32(-127.0) / np.float32(mx)
            q = np.minimum(127, np.rint((iscale * blk).astype(np.float32)))  # rint: half to even
            out[r, b: b + 256] = q.astype(np.float32) * (np.float32(1.0) / iscale)
    return out


def test_q8_k_numpy_and_params():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 1024, generator=g) * torch.exp(torch.randn(16, 1, generator=g))
    x[3, :256] = 0.0
    y = fake_quantize(x, "q8_k")
    np.testing.assert_array_equal(y.numpy(), _q8_k_numpy(x.numpy()))
    assert torch.equal(quantize_with_params(x, fit_params(x, "q8_k")), y)
    # along the last axis of a [batch, tokens, hidden] activation, and bf16 in, bf16 out
    x3 = x.reshape(2, 8, 1024)
    assert torch.equal(fake_quantize(x3, "q8_k"), y.reshape(2, 8, 1024))
    assert fake_quantize(x.bfloat16(), "q8_0_x86").dtype == torch.bfloat16


def test_act_formats_table():
    k, x86 = get_format("q8_k"), get_format("q8_0_x86")
    assert (k.family, k.default_block_size, k.bits_per_element()) == ("ggml_act", 256, Q8_K_BYTES * 8 / 256)
    assert (x86.family, x86.default_block_size, x86.bits_per_element()) == ("ggml_act", 32, 8.5)
    with pytest.raises(FormatError, match="multiple of 256"):
        fake_quantize(torch.ones(2, 96), "q8_k")
    with pytest.raises(FormatError, match="blocks of 32"):
        fake_quantize(torch.ones(2, 64), "q8_0_x86", block_size=64)


_NO_CPU_ORACLE = ggml_oracle.why_cpu_unavailable()


def _oracle_data() -> list[np.ndarray]:
    """Normal values with per-row scales, bf16-valued ones (exact halves are common: where the SIMD and reference
    Q8_0 differ), integers, and zero blocks."""
    rng = np.random.default_rng(30)
    normal = rng.standard_normal((512, 1024)).astype(np.float32) * np.exp(rng.standard_normal((512, 1))).astype(
        np.float32)
    bf16 = (rng.standard_normal((512, 1024)).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    ints = rng.integers(-300, 300, (128, 1024)).astype(np.float32)
    zeros = np.zeros((2, 1024), np.float32)
    zeros[1, 300] = -2.0
    return [normal, bf16, ints, zeros]


@pytest.mark.llama_cpp
@pytest.mark.skipif(_NO_CPU_ORACLE is not None, reason=str(_NO_CPU_ORACLE))
def test_llama_cpp_cpu_quantizers():
    # the CPU backend's own from_float of Q8_0 (= Q8_1's codes and d) and Q8_K, x86 SIMD build: identical bytes;
    # and the reference q8_0 really differs from the SIMD one on bf16-valued inputs (why q8_0_x86 exists)
    lib = ggml_oracle.cpu_library()
    differs = 0
    for i, x in enumerate(_oracle_data()):
        t = torch.from_numpy(x)
        want = ggml_oracle.quantize_row(lib, "quantize_row_q8_0", x, 32, 34)
        assert np.array_equal(to_ggml_bytes(t, "q8_0_x86"), want), f"q8_0_x86 data {i}"
        q8_1 = ggml_oracle.quantize_row(lib, "quantize_row_q8_1", x, 32, 36).reshape(-1, 36)
        w = want.reshape(-1, 34)
        assert np.array_equal(q8_1[:, 4:], w[:, 2:]) and np.array_equal(q8_1[:, :2], w[:, :2]), f"q8_1 data {i}"
        want_k = ggml_oracle.quantize_row(lib, "quantize_row_q8_K", x, 256, Q8_K_BYTES)
        assert np.array_equal(to_ggml_bytes(t, "q8_k"), want_k), f"q8_k data {i}"
        assert np.array_equal(want_k, ggml_oracle.quantize_row(lib, "quantize_row_q8_K_ref", x, 256, Q8_K_BYTES))
        differs += int((ggml_oracle.quantize_row(lib, "quantize_row_q8_0_ref", x, 32, 34) != want).sum())
        # the values the dot product reads: q * fp16(d) (dequantize_row_q8_0 of the bytes)
        y = ggml_oracle.dequantize(lib, "q8_0", want, x.shape[1])
        np.testing.assert_array_equal(fake_quantize(t, "q8_0_x86").numpy().view(np.uint32), y.view(np.uint32))
    assert differs > 0
