"""nvfp4 and fp8_e4m3_pt (quantpredict.formats.tensor_scale) against a float64 re-implementation of their definitions,
hand-computed values, gguf-py's NVFP4 dequantizer, and through GPTQ, the Recipe and quantize_model."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_model
from gguf import GGMLQuantizationType as GT

from quantpredict.errors import FormatError
from quantpredict.formats import (
    fake_quantize,
    fake_quantize_reference,
    fit_params,
    get_format,
    quantize_with_params,
    to_gguf_bytes,
)
from quantpredict.quantize.gptq import gptq_quantize, layer_output_error
from quantpredict.recipe import Recipe

FORMATS = ["nvfp4", "fp8_e4m3_pt"]
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # the FP4 E2M1 grid; code k has mantissa bit k & 1


def f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def e4m3(a) -> np.ndarray:
    """float32 values rounded to FP8 E4M3 (saturating: clamp to 448, then torch's float8_e4m3fn cast, which rounds
    to nearest, ties to even), in float64."""
    t = torch.from_numpy(np.clip(f32(a), -448.0, 448.0).astype(np.float32))
    return t.to(torch.float8_e4m3fn).to(torch.float64).numpy()


def e2m1(v) -> np.ndarray:
    """Nearest E2M1 value of float64 ``v`` by brute force over the grid, ties to the even code, saturating at 6."""
    v = np.asarray(v, dtype=np.float64)
    a = np.minimum(np.abs(v), 6.0)
    dist = np.abs(a[..., None] - E2M1)
    best = dist.min(-1, keepdims=True)
    tie_ok = (dist == best) & ((np.arange(8) % 2 == 0) | ((dist == best).sum(-1, keepdims=True) == 1))
    return np.copysign(E2M1[np.argmax(tie_ok, -1)], v)


def ref_nvfp4(x: np.ndarray) -> np.ndarray:
    """NVFP4 from the definition, every float32 operation emulated in float64 then rounded to float32 (exact for one
    +, -, *, / of float32 operands)."""
    rows, n = x.shape
    nb = -(-n // 16)
    xb = np.zeros((rows, nb * 16))
    xb[:, :n] = x
    xb = xb.reshape(rows, nb, 16)
    g = f32(np.abs(x).max() / (6.0 * 448.0))
    bamax = np.abs(xb).max(-1, keepdims=True)
    s = e4m3(f32(f32(bamax / 6.0) / g)) if g > 0 else np.zeros_like(bamax)
    s = np.where(bamax == 0, 1.0, s)
    d = f32(s * g)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d == 0, 0.0, e2m1(f32(xb / np.where(d == 0, 1.0, d))))
    return f32(q * d).reshape(rows, -1)[:, :n]


def ref_fp8_pt(x: np.ndarray) -> np.ndarray:
    g = f32(np.abs(x).max() / 448.0)
    if g == 0:
        return np.zeros_like(x)
    return f32(e4m3(f32(x / g)) * g)


REF = {"nvfp4": ref_nvfp4, "fp8_e4m3_pt": ref_fp8_pt}


def bits(t) -> np.ndarray:
    a = t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return a.astype(np.float32).view(np.uint32)


def _data():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(16, 256, generator=g) * torch.exp(torch.randn(16, 256, generator=g) * 2)  # blocks far apart
    rows = torch.randn(8, 96, generator=g) * torch.logspace(-6, 3, 8)[:, None]  # scales rounding to E4M3 subnormals
    odd = torch.randn(5, 40, generator=g)  # a shorter last block
    outlier = torch.randn(4, 64, generator=g)
    outlier[1, 7] = 1e4
    return [wide, rows, odd, outlier, torch.zeros(2, 32)]


DATA = _data()


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_float64_definition(fmt):
    for x in DATA:
        expected = REF[fmt](x.double().numpy())
        for fn in (fake_quantize, fake_quantize_reference):
            y = fn(x, fmt)
            assert np.array_equal(bits(y), bits(expected)), (fmt, tuple(x.shape))
        assert torch.equal(quantize_with_params(x, fit_params(x, fmt)), fake_quantize(x, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_grid_values_and_ties(fmt):
    # values placed on (and half-way between) grid points of a chosen scale, so that ties really occur
    g = torch.Generator().manual_seed(3)
    grid = torch.tensor(E2M1 if fmt == "nvfp4" else [0, 1, 1.0625, 1.125, 1.1875, 2.5, 448], dtype=torch.float32)
    x = grid[torch.randint(0, len(grid), (8, 64), generator=g)] * torch.where(torch.rand(8, 64, generator=g) < .5,
                                                                              -1.0, 1.0)
    x = x * 0.75 + 0.25 * grid.max() * (torch.rand(8, 64, generator=g) < 0.05)  # some blocks larger
    x[0, 0] = 2688.0 if fmt == "nvfp4" else 896.0
    assert np.array_equal(bits(fake_quantize(x, fmt)), bits(REF[fmt](x.double().numpy())))


def test_hand_nvfp4():
    # amax(tensor) = 2688 -> g = 1, so d = s (each block's E4M3 scale)
    x = torch.zeros(1, 64)
    # block 0: amax 2688 -> s = 448: 2688 -> 6; 1120 = 2.5 d (tie 2|3 -> 2); 112 = 0.25 d (tie 0|0.5 -> 0);
    # 336 = 0.75 d (tie 0.5|1 -> 1); -2240 = -5 d (tie 4|6 -> 4); -50 = -0.11 d -> -0
    x[0, :6] = torch.tensor([2688.0, 1120.0, 112.0, 336.0, -2240.0, -50.0])
    # block 1: all zero -> zeros (stored scale 1)
    # block 2: amax 3 -> s = 0.5: 3 -> 6; 1.3 = 2.6 d -> 3; 0.1 = 0.2 d -> 0
    x[0, 32:35] = torch.tensor([3.0, 1.3, 0.1])
    # block 3: amax 6.375 -> 6.375 / 6 = 1.0625, a tie between E4M3 1 and 1.125 -> s = 1; 6.375 saturates to 6;
    # 5 = 5 d (tie 4|6 -> 4); -1.25 (tie 1|1.5 -> 1)
    x[0, 48:52] = torch.tensor([6.375, 5.0, -1.25, 0.7])
    y = fake_quantize(x, "nvfp4")
    expected = torch.zeros(1, 64)
    expected[0, :6] = torch.tensor([2688.0, 896.0, 0.0, 448.0, -1792.0, -0.0])
    expected[0, 32:35] = torch.tensor([3.0, 1.5, 0.0])
    expected[0, 48:52] = torch.tensor([6.0, 4.0, -1.0, 0.5])
    assert np.array_equal(bits(y), bits(expected))
    p = fit_params(x, "nvfp4")
    assert p["tensor_scale"].unique().tolist() == [1.0]
    assert p["block_scale"][0, ::16].tolist() == [448.0, 1.0, 0.5, 1.0]


def test_hand_fp8_e4m3_pt():
    # amax 896 -> g = 2: 896 -> 448; 2.125 = 1.0625 g (tie 1|1.125 -> 1); 2.375 = 1.1875 g (tie 1.125|1.25 -> 1.25);
    # -2^-9 = -2^-10 g (tie 0|2^-9 -> -0); 3 * 2^-9 = 1.5 * 2^-9 g (tie 2^-9|2^-8 -> 2^-8); a second row of zeros
    x = torch.tensor([[896.0, 2.125, 2.375, -(2.0**-9), 3 * 2.0**-9, 0.0], [0.0] * 6])
    y = fake_quantize(x, "fp8_e4m3_pt")
    expected = torch.tensor([[896.0, 2.0, 2.5, -0.0, 2.0**-7, 0.0], [0.0] * 6])
    assert np.array_equal(bits(y), bits(expected))
    # one scale for the whole tensor, whatever the axis
    assert torch.equal(fake_quantize(x, "fp8_e4m3_pt", axis=0), y)
    # beyond the fitted range (a slice quantized with the whole tensor's scale): saturates at 448 g
    p = fit_params(x, "fp8_e4m3_pt")
    assert quantize_with_params(2 * x, p)[0, 0].item() == 896.0


def test_zero_tensor_and_tiny_blocks():
    assert torch.equal(fake_quantize(torch.zeros(3, 48), "nvfp4"), torch.zeros(3, 48))
    assert torch.equal(fake_quantize(torch.zeros(3, 5), "fp8_e4m3_pt"), torch.zeros(3, 5))
    # a block whose E4M3 scale rounds to 0 (amax below amax(tensor) / (448 * 2^10)) quantizes to zeros
    x = torch.zeros(1, 32)
    x[0, 0] = 2688.0
    x[0, 16:] = 1e-3
    y = fake_quantize(x, "nvfp4")
    assert y[0, 0].item() == 2688.0 and torch.equal(y[0, 16:], torch.zeros(16))


def test_axes_short_blocks_and_dtypes():
    x = torch.randn(3, 40, 5, generator=torch.Generator().manual_seed(4))
    for fmt in FORMATS:
        y = fake_quantize(x, fmt, axis=1)
        assert torch.equal(y, fake_quantize(x.movedim(1, -1).contiguous(), fmt).movedim(-1, 1))
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            z = fake_quantize(x.to(dtype), fmt)
            assert z.dtype == dtype and torch.equal(z, fake_quantize(x.to(dtype).float(), fmt).to(dtype))
    # a shorter last block is the zero-padded block
    w = torch.randn(4, 40, generator=torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(w, (0, 8))
    assert torch.equal(fake_quantize(w, "nvfp4"), fake_quantize(padded, "nvfp4")[:, :40])


def test_table_bits_and_errors():
    nv, pt = get_format("nvfp4"), get_format("fp8_e4m3_pt")
    assert (nv.family, nv.element_format, nv.default_block_size, nv.scale_bits, nv.scale_element) == (
        "tensor", "e2m1", 16, 8, "e4m3")
    assert (pt.family, pt.element_format, pt.default_block_size, pt.scale_bits) == ("tensor", "e4m3", None, 0)
    assert nv.tensor_scale_bits == pt.tensor_scale_bits == 32 and nv.tensor_level and pt.tensor_level
    assert nv.bits_per_element() == 4.5 and nv.bits_per_element(row_length=4096) == 4.5
    assert nv.bits_per_element(row_length=40) == 4 + 3 * 8 / 40  # a shorter last block still has its scale
    assert pt.bits_per_element() == 8.0 and pt.bits_per_element(row_length=4096) == 8.0
    with pytest.raises(FormatError, match="blocks of 16 elements by definition"):
        fake_quantize(torch.ones(2, 64), "nvfp4", block_size=32)
    with pytest.raises(FormatError, match="one scale per tensor by definition"):
        fake_quantize(torch.ones(2, 64), "fp8_e4m3_pt", block_size=32)
    with pytest.raises(FormatError, match="1 NaN and 1 Inf"):
        fake_quantize(torch.tensor([[1.0, math.nan, math.inf]]), "nvfp4")
    from quantpredict.formats import compute_scale

    with pytest.raises(FormatError, match="fit_params"):
        compute_scale(torch.ones(2, 64), "nvfp4")


def test_recipes_and_candidates_accept_them():
    from quantpredict.predict.allocate import _parse_candidates
    from quantpredict.predict.rank import DEFAULT_FORMATS

    for fmt in FORMATS:
        r = Recipe(fmt, method="gptq", act_format=fmt)
        assert Recipe.from_label(r.label) == r and r.label == f"{fmt}-gptq-a_{fmt}"
    assert Recipe("nvfp4", block_size=16) == Recipe("nvfp4")  # the default block: one recipe, one label
    assert _parse_candidates(["nvfp4", "fp8_e4m3_pt", "mxfp4_e2m1"]) == [
        ("nvfp4", None), ("fp8_e4m3_pt", None), ("mxfp4_e2m1", None)]
    assert not set(FORMATS) & set(DEFAULT_FORMATS)  # accepted, not in the shipped grid


# ------------------------------------------------------------------------------------------------------ GGUF


def _dequantize_gguf(packed: np.ndarray, shape) -> np.ndarray:
    return gguf.quants.dequantize(packed, GT.NVFP4).reshape(shape)


def test_gguf_layout_constants():
    assert GT.NVFP4 == 40 and gguf.GGML_QUANT_SIZES[GT.NVFP4] == (64, 36)


@pytest.mark.parametrize("shift", [0, -3])
def test_gguf_dequantizer_matches_where_layouts_meet(shift):
    # amax(tensor) = 2688 * 2^shift makes g = 2^shift: the per-tensor scale folds into the UE4M3 sub-scales exactly
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 192, generator=g) * torch.linspace(0.3, 1.0, 192)
    x[2, 64:80] = 0.0  # an all-zero block
    x = x / x.abs().max() * (2688.0 * 2.0**shift)
    y = fake_quantize(x, "nvfp4")
    packed = to_gguf_bytes(x, "nvfp4")
    assert packed.shape == (6, 192 // 64 * 36) and packed.dtype == np.uint8
    back = _dequantize_gguf(packed, x.shape)
    # bit for bit, up to the sign of zero (gguf reads code 0b1000 as +0)
    assert np.array_equal(bits(back), bits((y + 0.0).numpy()))
    # the stored codes and scales, read back by hand: 4 scale bytes then 4 x 8 bytes of nibbles per 64 elements
    blk = packed[0, :36]
    s0 = torch.tensor([blk[0]], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item()
    assert s0 == float(fit_params(x, "nvfp4")["scale"][0, 0])
    assert (blk[4] & 0xF) in range(16) and back[0, 8] == y[0, 8] + 0.0  # element 8 is the high nibble of byte 0


def test_gguf_hand_block():
    # the hand-computed block of test_hand_nvfp4 (g = 1) through gguf's dequantizer
    x = torch.zeros(1, 64)
    x[0, :6] = torch.tensor([2688.0, 1120.0, 112.0, 336.0, -2240.0, -50.0])
    x[0, 32:35] = torch.tensor([3.0, 1.3, 0.1])
    x[0, 48:52] = torch.tensor([6.375, 5.0, -1.25, 0.7])
    packed = to_gguf_bytes(x, "nvfp4")
    # sub-scales: E4M3 448 = 0x7E, block 1 unused (0), 0.5 = 0x30, 1.0 = 0x38
    assert packed[0, :4].tolist() == [0x7E, 0x00, 0x30, 0x38]
    # block 0 codes: 6 (7), 2 (4), 0 (0), 1 (2), -4 (8 + 6), -0 (8): bytes hold elements i and i + 8
    assert packed[0, 4:10].tolist() == [7, 4, 0, 2, 14, 8]
    assert np.array_equal(_dequantize_gguf(packed, x.shape), (fake_quantize(x, "nvfp4") + 0.0).numpy())


def test_gguf_where_layouts_do_not_meet():
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(8))  # g = amax / 2688: no power of two
    with pytest.raises(FormatError, match="cannot be folded"):
        to_gguf_bytes(x, "nvfp4")
    with pytest.raises(FormatError, match="cannot be folded"):  # g = 4: 448 * 4 is no E4M3 value
        to_gguf_bytes(x / x.abs().max() * 2688.0 * 4, "nvfp4")
    with pytest.raises(FormatError, match="multiple of 64"):
        to_gguf_bytes(torch.ones(2, 48), "nvfp4")
    with pytest.raises(ValueError, match="not a llama.cpp format"):
        to_gguf_bytes(torch.ones(2, 64), "fp8_e4m3_pt")


# ------------------------------------------------------------------------------------------------------ GPTQ


def _problem(rows=16, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(cols, 1024, generator=g) * torch.linspace(0.2, 3, cols)[:, None]
    x = x + 0.6 * x.roll(1, 0)
    return w, 2 * x @ x.T / x.shape[1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_gptq_keeps_the_tensor_scale_and_beats_rtn(fmt):
    w, h = _problem()
    q, p = gptq_quantize(w, h, fmt, return_params=True)
    # every weight on the grid of the parameters it was rounded with; the per-tensor scale is the whole weight's
    assert torch.equal(quantize_with_params(q, p), q)
    assert p["tensor_scale"].unique().tolist() == fit_params(w, fmt)["tensor_scale"].unique().tolist()
    assert layer_output_error(w, q, h) <= layer_output_error(w, fake_quantize(w, fmt), h)
    # with H = I nothing propagates: GPTQ is RTN
    assert torch.equal(gptq_quantize(w, torch.eye(w.shape[1]), fmt, percdamp=0.0), fake_quantize(w, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_model(fmt, token_windows):
    from quantpredict import arch
    from quantpredict.quantize import quantize_model

    model = tiny_model("llama")
    fp = [r.weight.detach().clone() for r in arch.linear_layers(model)]
    report = quantize_model(model, Recipe(fmt), token_windows, progress=False)
    for w, r in zip(fp, arch.linear_layers(model)):
        assert torch.equal(r.weight, fake_quantize(w, fmt))  # RTN: each weight with its own per-tensor scale
    assert report.effective_bits_per_param == get_format(fmt).bits_per_element()  # 4.5 / 8: no per-row scales
    # not a projection: requantizing refits g on the quantized weight, whose amax moved by an ulp or so
    y = fake_quantize(fp[0], "nvfp4")
    assert (fake_quantize(y, "nvfp4") != y).float().mean() < 0.05
