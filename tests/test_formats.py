"""Tests of quantpredict.formats against grids enumerated independently from the E/M bit definitions (float64),
hand-computed examples, and properties. The fused kernel is checked bit for bit against the torch reference."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantpredict.cli import main as cli_main
from quantpredict.errors import FormatError
from quantpredict.formats import (
    compute_scale,
    expand_scale,
    fake_quantize,
    fake_quantize_reference,
    get_format,
    list_formats,
    native,
    quantize_with_scale,
)

MX_FP = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1"]
MX_INT = [f"mxint{k}" for k in range(2, 9)]
INTS = [f"int{k}" for k in range(2, 9)]
FP8 = ["fp8_e4m3", "fp8_e5m2"]
SCALED = MX_FP + MX_INT + INTS + FP8
# the layouts shipped in checkpoints (tests/test_formats_shipped.py)
SHIPPED = ([f"uint{k}" for k in range(8, 1, -1)] + [f"uint{k}_pc" for k in range(8, 1, -1)]
           + ["nf4", "nf4_dq", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "iq4_nl",
              "iq4_xs"])
# one FP32 scale per tensor (tests/test_formats_tensor_scale.py)
PER_TENSOR = ["fp8_e4m3_pt", "nvfp4"]
# llama.cpp's activation formats (tests/test_formats_act.py)
ACT = ["q8_0_x86", "q8_k"]

# (ebits, mbits, reserved codes) straight from OCP MX v1.0 / OFP8: E4M3 keeps only S.1111.111 for NaN; E5M2
# reserves its top exponent for Inf/NaN; the FP6/FP4 elements reserve nothing.
FP_BITS = {
    "e4m3": (4, 3, lambda e, m: e == 15 and m == 7),
    "e5m2": (5, 2, lambda e, m: e == 31),
    "e3m2": (3, 2, lambda e, m: False),
    "e2m3": (2, 3, lambda e, m: False),
    "e2m1": (2, 1, lambda e, m: False),
}
ELEMENT_OF = {"mxfp8_e4m3": "e4m3", "mxfp8_e5m2": "e5m2", "mxfp6_e3m2": "e3m2", "mxfp6_e2m3": "e2m3",
              "mxfp4_e2m1": "e2m1", "fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}


def fp_codes(element: str) -> list[tuple[float, int]]:
    """(value, mantissa code) of every non-negative code of an FP element, from the bit definitions."""
    ebits, mbits, reserved = FP_BITS[element]
    bias = 2 ** (ebits - 1) - 1
    out = []
    for e in range(2**ebits):
        for m in range(2**mbits):
            if reserved(e, m):
                continue
            v = 2.0 ** (1 - bias) * m / 2**mbits if e == 0 else 2.0 ** (e - bias) * (1 + m / 2**mbits)
            out.append((v, m))
    return out


def grid(fmt: str) -> np.ndarray:
    """Every value of the format's element grid (in units of the scale), sorted, float64."""
    if fmt in ELEMENT_OF:
        pos = [v for v, _ in fp_codes(ELEMENT_OF[fmt])]
    else:
        k = int(fmt.removeprefix("mx").removeprefix("int"))
        step = 2.0 ** -(k - 2) if fmt.startswith("mx") else 1.0
        pos = [i * step for i in range(2 ** (k - 1))]
    return np.unique(np.array([-v for v in pos] + pos))


def nearest_even(v: np.ndarray, fmt: str) -> np.ndarray:
    """Brute force: the grid value nearest to each v (saturating), ties to the even code."""
    g = grid(fmt)
    if fmt in ELEMENT_OF:
        codes = {v: m for v, m in fp_codes(ELEMENT_OF[fmt])}
        even = np.array([codes[abs(x)] % 2 == 0 for x in g])
    else:
        step = g[1] - g[0]
        even = np.array([round(x / step) % 2 == 0 for x in g])
    d = np.abs(v[:, None] - g[None, :])
    best = d.min(1, keepdims=True)
    cand = d == best
    pick = np.where(cand.sum(1) > 1, np.argmax(cand & even[None, :], 1), np.argmax(cand, 1))
    return g[pick]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


# ---------------------------------------------------------------------------------------------------- the table


def test_table_matches_bit_definitions():
    for fmt in MX_FP + FP8:
        f, g = get_format(fmt), grid(fmt)
        ebits, mbits, _ = FP_BITS[ELEMENT_OF[fmt]]
        assert (f.element, f.ebits, f.mbits, f.element_bits) == ("fp", ebits, mbits, 1 + ebits + mbits)
        assert f.max_normal == g.max()
        assert f.emax_elem == math.floor(math.log2(g.max()))
    expected_max = {"mxfp8_e4m3": 448, "mxfp8_e5m2": 57344, "mxfp6_e3m2": 28, "mxfp6_e2m3": 7.5, "mxfp4_e2m1": 6}
    for fmt, m in expected_max.items():
        assert get_format(fmt).max_normal == m
    # emax_elem of the OCP spec: 8, 15, 4, 2, 2 for the FP elements, 0 for MXINT
    assert [get_format(f).emax_elem for f in MX_FP] == [8, 15, 4, 2, 2]
    assert all(get_format(f).emax_elem == 0 for f in MX_INT)
    for k in range(2, 9):
        assert get_format(f"mxint{k}").max_normal == (2 ** (k - 1) - 1) * 2.0 ** -(k - 2)
        assert get_format(f"int{k}").max_normal == 2 ** (k - 1) - 1
        assert get_format(f"int{k}").element == "int" and get_format(f"int{k}").element_bits == k
    assert len(grid("mxfp8_e4m3")) == 2 * 127 - 1  # 128 codes minus NaN, +-0 merged
    assert len(grid("mxfp4_e2m1")) == 15


def test_list_and_get_format():
    names = list_formats()
    assert set(SCALED + SHIPPED + PER_TENSOR + ACT + ["bf16", "fp16"]) == set(names) and len(names) == len(set(names))
    f = get_format("mxfp4_e2m1")
    assert (f.family, f.default_block_size, f.scale_bits) == ("mx", 32, 8)
    assert (get_format("int4").family, get_format("int4").default_block_size, get_format("int4").scale_bits) == (
        "int", None, 16)
    assert get_format("fp8_e4m3").family == "fp8" and get_format("bf16").family == "float"
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.name = "x"  # type: ignore[misc]


def test_bits_per_element():
    assert get_format("mxfp4_e2m1").bits_per_element() == 4.25
    assert get_format("mxfp4_e2m1").bits_per_element(128) == 4 + 8 / 128
    assert get_format("mxfp8_e4m3").bits_per_element(32) == 8.25
    assert get_format("mxint8").bits_per_element() == 8.25
    assert get_format("mxfp4_e2m1").bits_per_element(32, row_length=40) == 4 + 2 * 8 / 40  # short last block
    assert get_format("int4").bits_per_element() == 4
    assert get_format("int4").bits_per_element(row_length=4096) == 4 + 16 / 4096
    assert get_format("int4").bits_per_element(128) == 4 + 16 / 128
    assert get_format("fp8_e4m3").bits_per_element(row_length=512) == 8 + 16 / 512
    assert get_format("bf16").bits_per_element() == 16 and get_format("fp16").bits_per_element(32) == 16
    with pytest.raises(FormatError):
        get_format("int4").bits_per_element(0)


# ------------------------------------------------------------------------------------------- grids and rounding


@pytest.mark.parametrize("fmt", SCALED)
def test_every_grid_value_round_trips(fmt):
    g = torch.tensor(grid(fmt), dtype=torch.float32)
    assert torch.equal(quantize_with_scale(g, fmt, torch.tensor(1.0)), g)
    # Through fake_quantize: one block holding the whole grid has max|x| = max_normal, so its scale is 1 (MX: the
    # E8M0 exponent floor(log2 max_normal) - emax_elem = 0; int/fp8: max_normal / max_normal).
    for shift in (0, -20, 7):  # and the grid times a power of two: the scale absorbs it exactly
        x = (g * 2.0**shift).reshape(1, -1)
        assert torch.equal(fake_quantize(x, fmt, block_size=x.shape[1]), x)
        assert torch.equal(fake_quantize_reference(x, fmt, block_size=x.shape[1]), x)
    if fmt.startswith("mx"):  # also in default blocks of 32 with the max in every block
        x = g.reshape(1, -1).repeat(1, 128)[:, : 32 * 4].reshape(4, 32)
        x[:, 0] = get_format(fmt).max_normal
        assert torch.equal(fake_quantize(x, fmt), x)


@pytest.mark.parametrize("fmt", MX_FP + MX_INT + ["int4", "int8"])
def test_midpoints_round_to_even(fmt):
    g = grid(fmt)
    pos = g[g >= 0]
    mids = (pos[:-1] + pos[1:]) / 2  # exactly representable in float32
    expected = nearest_even(mids, fmt)
    got = quantize_with_scale(torch.tensor(mids, dtype=torch.float32), fmt, torch.tensor(1.0)).double().numpy()
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(
        quantize_with_scale(torch.tensor(-mids, dtype=torch.float32), fmt, torch.tensor(1.0)).double().numpy(),
        -expected)
    # the fused kernel: the same midpoints inside a block whose scale is 2^-3 (max_normal sets it)
    x = torch.tensor(np.concatenate([[get_format(fmt).max_normal], mids]) * 2.0**-3, dtype=torch.float32)
    y = fake_quantize(x[None], fmt, block_size=x.numel())[0, 1:].double().numpy()
    np.testing.assert_array_equal(y, expected * 2.0**-3)


@pytest.mark.parametrize("fmt", MX_FP + MX_INT + ["int3", "int8"])
def test_rounds_to_nearest_against_brute_force(fmt):
    gen = torch.Generator().manual_seed(1)
    m = get_format(fmt).max_normal
    v = (torch.rand(4000, generator=gen, dtype=torch.float64) * 2.4 - 1.2) * m  # includes saturation
    v = torch.cat([v, v / 64]).float()  # and the subnormal range
    got = quantize_with_scale(v, fmt, torch.tensor(1.0)).double().numpy()
    np.testing.assert_array_equal(got, nearest_even(v.double().numpy(), fmt))


def test_saturation_values():
    # a block scaled to 1 (max in [2^emax, 2^(emax+1))) with values beyond max_normal but in the top binade
    cases = {"mxfp8_e4m3": (460.0, 448), "mxfp8_e5m2": (65000.0, 57344), "mxfp6_e3m2": (31.0, 28),
             "mxfp6_e2m3": (7.9, 7.5), "mxfp4_e2m1": (7.9, 6)}
    for fmt, (big, sat) in cases.items():
        x = torch.tensor([[big, -big, 1.0]])
        assert compute_scale(x, fmt).item() == 1.0
        assert fake_quantize(x, fmt).tolist() == [[sat, -sat, 1.0]]
    # E4M3: 464 is the midpoint of 448 and the NaN code's 480: still saturates to 448
    assert fake_quantize(torch.tensor([[464.0]]), "mxfp8_e4m3").item() == 448
    assert quantize_with_scale(torch.tensor([1e30]), "mxfp8_e4m3", torch.tensor(1.0)).item() == 448
    # MXINT8: max|x| = 1.999 -> scale 1 -> clamps to 127/64, not 128/64
    assert fake_quantize(torch.tensor([[1.999]]), "mxint8").item() == 127 / 64


def test_e8m0_exponent_clamp():
    # max|x| = 2^-140: floor(log2) - emax = -148 for E4M3, clamped to -127, so the scale is 2^-127.
    x = torch.tensor([[2.0**-140, 2.0**-141]])
    assert compute_scale(x, "mxfp8_e4m3").item() == 2.0**-127
    # x / 2^-127 = 2^-13 and 2^-14: below half of E4M3's smallest subnormal 2^-9 -> both flush to zero,
    assert fake_quantize(x, "mxfp8_e4m3").tolist() == [[0.0, 0.0]]
    # but E5M2's subnormals reach 2^-16, so there the same values survive exactly.
    assert fake_quantize(x, "mxfp8_e5m2").tolist() == [[2.0**-140, 2.0**-141]]
    assert bits_equal(fake_quantize(x, "mxfp8_e4m3"), fake_quantize_reference(x, "mxfp8_e4m3"))
    # the top: max|x| = 1.5 * 2^127 for MXINT (emax 0) needs exponent 127, the largest E8M0 scale
    big = torch.tensor([[1.5 * 2.0**127, 2.0**120]])
    assert compute_scale(big, "mxint8").item() == 2.0**127
    assert fake_quantize(big, "mxint8").tolist() == [[1.5 * 2.0**127, 0.0]]  # 2^-7 rounds to 0 at step 2^-6


# --------------------------------------------------------------------------------------- hand-computed examples

X = torch.tensor([[1.0, 0.3, -5.1, 100.0]])


def test_hand_mxfp8_e4m3():
    # amax 100: floor(log2 100) = 6, scale 2^(6-8) = 1/4. x/s = 4, 1.2, -20.4, 400.
    # E4M3 (3 mantissa bits): 4 -> 4; 1.2 in [1,2) step 1/8: 9.6 -> 10 -> 1.25; 20.4 in [16,32) step 2: 10.2 -> 20;
    # 400 in [256,512) step 32: 12.5 -> tie -> 12 -> 384. Times 1/4: 1, 0.3125, -5, 96.
    assert fake_quantize(X, "mxfp8_e4m3").tolist() == [[1.0, 0.3125, -5.0, 96.0]]


def test_hand_mxfp8_e5m2():
    # scale 2^(6-15) = 2^-9, x/s = 512, 153.6, -2611.2, 51200. E5M2 (2 mantissa bits): 512; 153.6 in [128,256) step
    # 32: 4.8 -> 5 -> 160; 2611.2 in [2048,4096) step 512: 5.1 -> 5 -> 2560; 51200 in [32768,65536) step 8192:
    # 6.25 -> 6 -> 49152. Times 2^-9: 1, 0.3125, -5, 96.
    assert fake_quantize(X, "mxfp8_e5m2").tolist() == [[1.0, 0.3125, -5.0, 96.0]]
    x = torch.tensor([[1.0, 0.21, 0.0]])
    # scale 2^(0-15): 0.21 * 2^15 = 6881.28 in [4096,8192) step 1024: 6.72 -> 7 -> 7168 -> 0.21875
    assert fake_quantize(x, "mxfp8_e5m2").tolist() == [[1.0, 0.21875, 0.0]]


def test_hand_mxfp6_e3m2():
    # scale 2^(6-4) = 4, x/s = 0.25, 0.075, -1.275, 25. E3M2: emin -2, subnormal step 2^-4. 0.25 = 2^-2 stays;
    # 0.075 / 0.0625 = 1.2 -> 1 -> 0.0625 (subnormal); 1.275 in [1,2) step 1/4: 5.1 -> 5 -> 1.25; 25 in [16,32)
    # step 4: 6.25 -> 6 -> 24. Times 4: 1, 0.25, -5, 96.
    assert fake_quantize(X, "mxfp6_e3m2").tolist() == [[1.0, 0.25, -5.0, 96.0]]


def test_hand_mxfp6_e2m3():
    # scale 2^(6-2) = 16, x/s = 0.0625, 0.01875, -0.31875, 6.25. E2M3: emin 0, subnormal step 1/8. 0.0625 is half a
    # step: tie -> 0 (even); 0.01875 -> 0; 0.31875 * 8 = 2.55 -> 3 -> 0.375; 6.25 in [4,8) step 1/2: 12.5 -> tie ->
    # 12 -> 6. Times 16: 0, 0, -6, 96.
    assert fake_quantize(X, "mxfp6_e2m3").tolist() == [[0.0, 0.0, -6.0, 96.0]]


def test_hand_mxfp4_e2m1():
    # scale 16 as above; E2M1 subnormal step 1/2: 0.0625 -> 0; 0.01875 -> 0; 0.31875 * 2 = 0.6375 -> 1 -> 0.5;
    # 6.25 in [4,8) step 2: 3.125 -> 3 -> 6. Times 16: 0, 0, -8, 96.
    assert fake_quantize(X, "mxfp4_e2m1").tolist() == [[0.0, 0.0, -8.0, 96.0]]
    # the full E2M1 magnitude grid at scale 1: 0 0.5 1 1.5 2 3 4 6
    assert grid("mxfp4_e2m1")[7:].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_hand_mxint():
    # MXINT8: scale 2^(6-0) = 64, step 2^-6: x/s/step = x = 1, 0.3, -5.1, 100 -> 1, 0, -5, 100; times 64 * 2^-6.
    assert fake_quantize(X, "mxint8").tolist() == [[1.0, 0.0, -5.0, 100.0]]
    # MXINT4: step 2^-2, clamp 7: x/64*4 = x/16 = 0.0625, 0.019, -0.319, 6.25 -> 0, 0, 0, 6 -> times 16: 96.
    assert fake_quantize(X, "mxint4").tolist() == [[0.0, 0.0, 0.0, 96.0]]
    # MXINT2: step 1, clamp 1: x/64 = ..., 1.5625 -> 2 -> clamp 1 -> 64.
    assert fake_quantize(X, "mxint2").tolist() == [[0.0, 0.0, 0.0, 64.0]]


W = torch.tensor([[0.7, -2.1, 0.35, 1.0]])


def test_hand_int_per_channel():
    # int4: scale 2.1/7 = 0.3; x/s = 2.33, -7, 1.17, 3.33 -> 2, -7, 1, 3 -> 0.6, -2.1, 0.3, 0.9
    torch.testing.assert_close(fake_quantize(W, "int4"), torch.tensor([[0.6, -2.1, 0.3, 0.9]]))
    # int8: scale 2.1/127; x/s = 42.33, -127, 21.17, 60.48 -> 42, -127, 21, 60
    torch.testing.assert_close(fake_quantize(W, "int8"), torch.tensor([[42, -127, 21, 60]]) * 2.1 / 127)
    # int2: scale 2.1; x/s = 0.33, -1, 0.17, 0.48 -> 0, -1, 0, 0
    torch.testing.assert_close(fake_quantize(W, "int2"), torch.tensor([[0.0, -2.1, 0.0, 0.0]]))
    # one scale per row: the second row (10x) scales independently
    two = torch.cat([W, 10 * W])
    torch.testing.assert_close(fake_quantize(two, "int4"), torch.tensor([[0.6, -2.1, 0.3, 0.9], [6, -21, 3, 9.0]]))


def test_hand_int_per_group():
    # int4, groups of 2: [0.7, -2.1] scale 0.3 -> 0.6, -2.1; [0.35, 1.0] scale 1/7 -> 2.45 -> 2 -> 2/7, 7 -> 1.0
    torch.testing.assert_close(fake_quantize(W, "int4", block_size=2), torch.tensor([[0.6, -2.1, 2 / 7, 1.0]]))


def test_hand_fp8_per_channel():
    # fp8_e4m3: scale 2.1/448; x/s = 149.33, -448, 74.67, 213.33. E4M3: 149.33 in [128,256) step 16 -> 9.33 -> 144;
    # 74.67 in [64,128) step 8 -> 72; 213.33 -> 13.33 -> 208. Times 2.1/448: 0.675, -2.1, 0.3375, 0.975.
    torch.testing.assert_close(fake_quantize(W, "fp8_e4m3"), torch.tensor([[0.675, -2.1, 0.3375, 0.975]]))
    # fp8_e5m2: scale 2.1/57344; 19114.7 in [16384,32768) step 4096 -> 4.67 -> 5 -> 20480 -> 0.75; 9557.3 in
    # [8192,16384) step 2048 -> 5 -> 10240 -> 0.375; 27306.7 -> 6.67 -> 7 -> 28672 -> 1.05.
    torch.testing.assert_close(fake_quantize(W, "fp8_e5m2"), torch.tensor([[0.75, -2.1, 0.375, 1.05]]))


def test_hand_bf16_fp16():
    # bf16 keeps 7 mantissa bits: 1 + 2^-8 is the midpoint of 1 and 1 + 2^-7 -> even -> 1; 1 + 3 * 2^-8 is the
    # midpoint of 1 + 2^-7 (odd code) and 1 + 2^-6 (even) -> 1 + 2^-6.
    x = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.0])
    assert fake_quantize(x, "bf16").tolist() == [1.0, 1 + 2.0**-6, 3.0]
    # fp16 keeps 10: 1 + 2^-11 -> 1; 65504 is its largest normal; a plain cast overflows to inf beyond it
    assert fake_quantize(torch.tensor([1 + 2.0**-11, 65504.0, 1e5]), "fp16").tolist() == [1.0, 65504.0, math.inf]
    assert fake_quantize(x, "bf16").dtype == torch.float32


# ------------------------------------------------------------------------------------------------- properties


def _data(shape, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * torch.exp(torch.randn(*shape, generator=gen) * 2)
    return x


@pytest.mark.parametrize("fmt", SCALED + ["bf16", "fp16"])
def test_idempotent_and_on_grid(fmt):
    x = _data((8, 100))
    y = fake_quantize(x, fmt)
    assert y.shape == x.shape and y.dtype == x.dtype
    yy = fake_quantize(y, fmt)
    f = get_format(fmt)
    if f.family in ("mx", "float"):
        assert torch.equal(yy, y)  # MX keeps its power-of-two scale: exactly idempotent
    else:
        torch.testing.assert_close(yy, y, rtol=1e-6, atol=0)  # max|y| = max|x| up to an ulp, so the scale too
    if f.family != "float":
        block = f.default_block_size or 100
        s = expand_scale(compute_scale(x, fmt), block_size=block, length=100).double()
        scaled = (y.double() / torch.where(s == 0, 1, s)).numpy()
        g = grid(fmt)
        if f.family == "mx":
            assert np.isin(scaled, g).all()
        else:  # float scale: on the grid up to float32 rounding of y = q * scale
            near = g[np.abs(scaled[..., None] - g).argmin(-1)]
            np.testing.assert_allclose(scaled, near, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxint8", "int4", "fp8_e4m3"])
def test_axes_and_3d(fmt):
    x = _data((6, 70, 5), seed=2)
    for axis in (0, 1, 2, -1, -2):
        y = fake_quantize(x, fmt, axis=axis, block_size=16)
        expected = fake_quantize(x.movedim(axis, -1).contiguous(), fmt, block_size=16).movedim(-1, axis)
        assert torch.equal(y, expected)
        assert bits_equal(y, fake_quantize_reference(x, fmt, axis=axis, block_size=16))
    w = _data((64, 48), seed=3)
    assert torch.equal(fake_quantize(w, fmt, axis=0), fake_quantize(w.t(), fmt, axis=-1).t())
    assert fake_quantize(torch.tensor(3.3), fmt).shape == ()
    assert fake_quantize(torch.empty(0, 4), fmt).shape == (0, 4)


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp8_e4m3", "mxint4", "int4"])
def test_partial_last_block_and_zero_block(fmt):
    x = _data((3, 70), seed=4)
    y = fake_quantize(x, fmt, block_size=32)
    # blocks [0,32), [32,64), [64,70): the short last block is quantized on its own
    assert torch.equal(y[:, 64:], fake_quantize(x[:, 64:].contiguous(), fmt, block_size=32))
    assert torch.equal(y[:, :32], fake_quantize(x[:, :32].contiguous(), fmt, block_size=32))
    assert compute_scale(x, fmt, block_size=32).shape == (3, 3)
    assert compute_scale(x, fmt, axis=0, block_size=2).shape == (2, 70)
    x[1, 32:64] = 0
    y = fake_quantize(x, fmt, block_size=32)
    assert torch.equal(y[1, 32:64], torch.zeros(32)) and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1", "mxint8", "int4", "fp8_e5m2", "bf16", "fp16"])
def test_half_inputs(dtype, fmt):
    x = _data((4, 64), seed=5).clamp(-1000, 1000).to(dtype)
    y = fake_quantize(x, fmt)
    assert y.dtype == dtype and y.shape == x.shape
    expected = fake_quantize(x.float(), fmt)
    if fmt.startswith("mx") and not (dtype == torch.float16 and fmt == "mxint8"):
        assert torch.equal(y.float(), expected)  # the MX grid points of a half input are representable in it
    else:
        assert torch.equal(y, expected.to(dtype))
    assert fake_quantize(x.double(), fmt).dtype == torch.float64


@pytest.mark.parametrize("fmt", SCALED)
def test_scale_api_matches_fake_quantize(fmt):
    f = get_format(fmt)
    for width in (32, 20):
        x = _data((16, width), seed=6)
        s = compute_scale(x, fmt, block_size=width)
        assert s.shape == (16, 1) and s.dtype == torch.float32
        assert torch.equal(fake_quantize(x, fmt, block_size=width), quantize_with_scale(x, fmt, s))
    if f.default_block_size is None:  # per-channel: the default needs no block size
        x = _data((16, 50), seed=7)
        assert torch.equal(fake_quantize(x, fmt), quantize_with_scale(x, fmt, compute_scale(x, fmt)))
    # several blocks at once through expand_scale
    x = _data((5, 70), seed=8)
    s = expand_scale(compute_scale(x, fmt, block_size=32), block_size=32, length=70)
    assert torch.equal(fake_quantize(x, fmt, block_size=32), quantize_with_scale(x, fmt, s))
    # an all-zero block has a zero scale (int/fp8) or a tiny one (MX); either way it stays zero, and a zero scale
    # zeroes whatever it is applied to
    z = torch.zeros(3, 32)
    assert torch.equal(quantize_with_scale(z, fmt, compute_scale(z, fmt, block_size=32)), z)
    assert torch.equal(quantize_with_scale(torch.randn(3, 32), fmt, torch.zeros(3, 1)), z)


def test_scale_api_gptq_style_columns():
    # GPTQ: scales fitted once on W[:, a:a+B], then each column quantized with them
    w = _data((8, 64), seed=9)
    for fmt in ("int4", "mxfp4_e2m1"):
        s = compute_scale(w[:, 32:64], fmt, block_size=32)
        cols = torch.cat([quantize_with_scale(w[:, 32 + j: 33 + j], fmt, s) for j in range(32)], dim=1)
        assert torch.equal(cols, fake_quantize(w, fmt, block_size=32)[:, 32:64])
    assert torch.equal(compute_scale(w, "bf16"), torch.ones(8, 1))


# ------------------------------------------------------------------------------------- fused kernel vs reference

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: the torch path is the only path")


def _adversarial(seed: int, rows: int, n: int) -> torch.Tensor:
    """Random data plus exact midpoints, subnormal-sized and huge blocks, zeros and signed zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = _data((rows, n), seed=seed)
    x[0] = torch.randint(-64, 65, (n,), generator=gen).float() / 8 + 1 / 16  # many ties at several steps
    if rows > 2:
        x[1] *= 2.0**-135
        x[2] = 0
        x[2, ::3] = -0.0
    if rows > 3:
        x[3] *= 2.0**100
    return x


@needs_native
@pytest.mark.parametrize("fmt", SCALED)
def test_native_bit_exact(fmt):
    for seed, (rows, n), block in [(0, (9, 96), None), (1, (5, 77), 32), (2, (4, 33), 7), (3, (7, 1000), 128),
                                   (4, (6, 10), 1)]:
        x = _adversarial(seed, rows, n)
        assert bits_equal(fake_quantize(x, fmt, block_size=block), fake_quantize_reference(x, fmt, block_size=block))


@needs_native
@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(SCALED),
    values=st.lists(st.floats(-(2.0**127), 2.0**127, allow_nan=False, allow_infinity=False, width=32),
                    min_size=1, max_size=80),
    block=st.sampled_from([None, 1, 3, 32]),
    scale_exp=st.integers(-140, 100),
)
def test_native_bit_exact_hypothesis(fmt, values, block, scale_exp):
    x = torch.tensor(values, dtype=torch.float32) * 2.0 ** max(scale_exp, -20)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    if scale_exp < -20:  # tiny magnitudes: exercise the E8M0 lower clamp and element subnormals
        x = x.clamp(-1, 1) * 2.0**scale_exp
    x = x.reshape(1, -1)
    assert bits_equal(fake_quantize(x, fmt, block_size=block), fake_quantize_reference(x, fmt, block_size=block))


def test_torch_backend_switch_and_compiler_fallback(monkeypatch):
    x = _data((4, 64), seed=10)
    expected = fake_quantize_reference(x, "mxfp4_e2m1")
    monkeypatch.setenv("QUANTPREDICT_FORMATS_BACKEND", "torch")
    assert not native.available()
    assert bits_equal(fake_quantize(x, "mxfp4_e2m1"), expected)
    monkeypatch.delenv("QUANTPREDICT_FORMATS_BACKEND")
    # no compiler: a warning, then the torch path
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="fused kernel unavailable"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bits_equal(fake_quantize(x, "mxfp4_e2m1"), expected)


# -------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "int4", "fp8_e4m3", "bf16"])
def test_non_finite_input(fmt):
    x = torch.ones(4, 40)
    x[0, 3] = math.nan
    x[2, 39] = math.inf
    x[3, 0] = -math.inf
    with pytest.raises(FormatError, match="1 NaN and 2 Inf") as info:
        fake_quantize(x, fmt)
    assert isinstance(info.value, ValueError)
    with pytest.raises(FormatError, match="1 NaN and 2 Inf"):
        fake_quantize_reference(x, fmt)
    with pytest.raises(FormatError, match="NaN"):
        compute_scale(x, fmt)


def test_bad_arguments():
    with pytest.raises(FormatError, match="unknown format 'mxfp3'.*mxfp4_e2m1.*int8.*bf16") as info:
        fake_quantize(torch.ones(3), "mxfp3")
    assert isinstance(info.value, ValueError)
    with pytest.raises(FormatError, match="valid formats"):
        get_format("nope")
    with pytest.raises(FormatError, match="floating-point"):
        fake_quantize(torch.ones(3, dtype=torch.int32), "int8")
    with pytest.raises(FormatError, match="axis 2"):
        fake_quantize(torch.ones(3, 4), "mxint8", axis=2)
    with pytest.raises(FormatError, match="block_size"):
        fake_quantize(torch.ones(3, 4), "mxint8", block_size=0)


def test_cli_formats(capsys):
    assert cli_main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in list_formats():
        assert name in out
    assert "4.2500" in out and "4.0625" in out  # mxfp4 at 32 and at 128
    assert cli_main(["formats", "--json", "--block-size", "64"]) == 0
    assert '"bits/elem (block 64)": 4.125' in capsys.readouterr().out


@needs_native
def test_native_after_fork():
    # a forked child must not reuse the parent's (threadless) pool: it would hang
    import multiprocessing as mp

    x = _data((600, 512), seed=11)  # large enough for the threaded path
    fake_quantize(x, "mxfp4_e2m1")
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:  # numpy across the pipe: torch's shared-memory tensor pickling is not under test
        y = pool.apply_async(_fq_numpy, (x.numpy(), "mxfp4_e2m1")).get(timeout=120)
    assert bits_equal(torch.from_numpy(y), fake_quantize_reference(x, "mxfp4_e2m1"))


def _fq_numpy(x: np.ndarray, fmt: str) -> np.ndarray:
    return fake_quantize(torch.from_numpy(x), fmt).numpy()
