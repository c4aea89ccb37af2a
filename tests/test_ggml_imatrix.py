"""llama.cpp's quantizers with an importance matrix (quantpredict.formats.ggml_imatrix): byte-identical to
``quantize_<t>(src, dst, nrow, n_per_row, quant_weights)`` of ggml-quants.c (the oracle of tests/ggml_oracle.py,
optional), dequantized as gguf-py does, and the API's checks."""

from __future__ import annotations

import ggml_oracle
import gguf
import numpy as np
import pytest
import torch

from quantpredict.errors import FormatError
from quantpredict.formats import fake_quantize, ggml
from quantpredict.formats.ggml_imatrix import fake_quantize_weighted, to_gguf_bytes

GGML = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"]
N = 512
_NO_ORACLE = ggml_oracle.why_unavailable()


def gguf_type(fmt: str) -> gguf.GGMLQuantizationType:
    return getattr(gguf.GGMLQuantizationType, fmt.upper())


def data() -> dict[str, torch.Tensor]:
    """Gaussian rows with per-row scales, heavy-tailed values, and edge rows: zero rows and blocks, constant blocks,
    one non-zero value, values below GROUP_MAX_EPS, one sign, half-integers, a large and a small scale."""
    g = torch.Generator().manual_seed(30)
    gauss = torch.randn(32, N, generator=g) * torch.exp(torch.randn(32, 1, generator=g))
    heavy = torch.randn(32, N, generator=g) * torch.exp(2 * torch.randn(32, N, generator=g))
    edge = torch.randn(14, N, generator=g)
    edge[0] = 0
    edge[1, :256] = 0
    edge[2, 32:64] = 1.5
    edge[3, 256:512] = -2.0
    edge[4] *= 1e-20
    edge[5] = -edge[5].abs()
    edge[6] = edge[6].abs()
    edge[7] = 0
    edge[7, 5] = 3.0
    edge[8, :32] = 1e-16
    edge[9] = torch.round(edge[9] * 2) / 2
    edge[10, 256:] = 0
    edge[11] *= 1e-3
    edge[12] *= 1e3
    edge[13, 16:48] = 0.25
    return {"gaussian": gauss, "heavy-tailed": heavy, "edge rows": edge}


def imatrices() -> dict[str, torch.Tensor]:
    """Uniform, log-normal, zeros in some columns (every third, a block, a whole super-block), very skewed (two
    columns dominate by 9-12 orders of magnitude), sparse, constant, and all zero."""
    g = torch.Generator().manual_seed(31)
    zeros = torch.rand(N, generator=g)
    zeros[::3] = 0
    zeros[64:96] = 0
    zeros[256:512] = 0
    skewed = torch.full((N,), 1e-6)
    skewed[7] = 1e6
    skewed[300] = 1e3
    return {"uniform": torch.rand(N, generator=g), "log-normal": torch.exp(4 * torch.randn(N, generator=g)),
            "zero columns": zeros, "skewed": skewed,
            "sparse": (torch.rand(N, generator=g) < 0.05).float() * 10, "ones": torch.ones(N),
            "all zero": torch.zeros(N)}


def zoo_tensor() -> torch.Tensor:
    """llama-s's ``layers.0.mlp.down_proj`` [96, 256] (rows of 256: every type here)."""
    from quantpredict.models import load

    model, _ = load("llama-s")
    return model.model.layers[0].mlp.down_proj.weight.detach().clone()


def assert_oracle_bytes(lib, fmt: str, x: torch.Tensor, qw: torch.Tensor, what: str) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[gguf_type(fmt)]
    want = ggml_oracle.quantize_weighted(lib, fmt, x.numpy(), block, size, qw.numpy())
    got = to_gguf_bytes(x, fmt, qw)
    assert got.shape == want.shape
    same = (got.reshape(-1, size) == want.reshape(-1, size)).all(1)
    assert same.all(), f"{fmt}, {what}: {int((~same).sum())} of {same.size} blocks differ from llama.cpp"
    return want


def assert_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()
    differ = a.view(torch.int32) != b.view(torch.int32)
    assert not bool(differ.any()), f"{what}: {int(differ.sum())} values differ"


# ------------------------------------------------------------------------------------------ against llama.cpp


@pytest.mark.llama_cpp
@pytest.mark.skipif(_NO_ORACLE is not None, reason=str(_NO_ORACLE))
@pytest.mark.parametrize("fmt", GGML)
def test_llama_cpp_weighted(fmt):
    # every data set with every importance matrix: identical bytes, and fake_quantize_weighted is gguf-py's
    # dequantization of llama.cpp's bytes
    lib = ggml_oracle.library()
    for dname, x in data().items():
        for iname, qw in imatrices().items():
            want = assert_oracle_bytes(lib, fmt, x, qw, f"{dname} with a {iname} imatrix")
            ref = torch.from_numpy(gguf.quants.dequantize(want, gguf_type(fmt)).astype(np.float32))
            assert_bits(fake_quantize_weighted(x, fmt, qw), ref.reshape(x.shape), f"{fmt}, {dname}, {iname}")


@pytest.mark.llama_cpp
@pytest.mark.skipif(_NO_ORACLE is not None, reason=str(_NO_ORACLE))
def test_llama_cpp_weighted_zoo_tensor():
    # a trained weight (llama-s's first down_proj) with a skewed importance like a real imatrix's (a few columns
    # carry most of the squared activations)
    lib = ggml_oracle.library()
    x = zoo_tensor()
    g = torch.Generator().manual_seed(32)
    qw = torch.exp(3 * torch.randn(x.shape[1], generator=g))
    for fmt in GGML:
        assert_oracle_bytes(lib, fmt, x, qw, "llama-s down_proj")


@pytest.mark.llama_cpp
@pytest.mark.skipif(_NO_ORACLE is not None, reason=str(_NO_ORACLE))
@pytest.mark.parametrize("fmt", GGML)
def test_constant_imatrix_is_another_algorithm(fmt):
    # llama.cpp: quant_weights of ones is not NULL; every type but Q8_0 then runs its weighted search, whose bytes
    # differ from the reference quantizer's; Q8_0 ignores quant_weights. The project does what the C code does.
    lib = ggml_oracle.library()
    x = data()["gaussian"]
    block, size = gguf.GGML_QUANT_SIZES[gguf_type(fmt)]
    ones = torch.ones(N)
    c_differs = bool((ggml_oracle.quantize_weighted(lib, fmt, x.numpy(), block, size, ones.numpy())
                      != ggml_oracle.quantize(lib, fmt, x.numpy(), block, size)).any())
    assert c_differs == (fmt != "q8_0")
    assert bool((to_gguf_bytes(x, fmt, ones) != to_gguf_bytes(x, fmt)).any()) == c_differs


# ------------------------------------------------------------------------------------------ without llama.cpp


@pytest.mark.parametrize("fmt", GGML)
def test_none_is_unweighted(fmt):
    x = data()["gaussian"]
    np.testing.assert_array_equal(to_gguf_bytes(x, fmt, None), to_gguf_bytes(x, fmt))
    assert_bits(fake_quantize(x, fmt, importance=None), fake_quantize(x, fmt), fmt)


@pytest.mark.parametrize("fmt", GGML)
def test_weighted_values_and_packing_agree(fmt):
    # the values are gguf-py's dequantization of the packed bytes; the weighted search changes the result for all
    # but Q8_0 (checked against llama.cpp in test_constant_imatrix_is_another_algorithm)
    x = data()["heavy-tailed"]
    qw = imatrices()["log-normal"]
    y = fake_quantize_weighted(x, fmt, qw)
    ref = torch.from_numpy(gguf.quants.dequantize(to_gguf_bytes(x, fmt, qw), gguf_type(fmt)).astype(np.float32))
    assert_bits(y, ref.reshape(x.shape), fmt)
    assert torch.equal(y, fake_quantize_weighted(x, fmt, qw.numpy()))  # numpy importance: the same
    assert bool((y != fake_quantize(x, fmt)).any()) == (fmt != "q8_0")


def test_fake_quantize_importance():
    g = torch.Generator().manual_seed(33)
    x = torch.randn(2, 3, N, generator=g)
    qw = torch.rand(N, generator=g)
    y = fake_quantize(x.to(torch.bfloat16), "q4_k", importance=qw)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    want = fake_quantize_weighted(x.to(torch.bfloat16).to(torch.float32).reshape(-1, N), "q4_k", qw)
    assert torch.equal(y, want.reshape(x.shape).to(torch.bfloat16))
    assert torch.equal(fake_quantize(x, "q6_k", axis=2, importance=qw), fake_quantize(x, "q6_k", importance=qw))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"fmt": "mxfp4_e2m1"}, "llama.cpp's formats only"),
    ({"axis": 0}, "last axis"),
    ({"block_size": 64}, "block"),
    ({"importance": torch.ones(N - 1)}, "one value per column"),
    ({"importance": torch.ones(2, N)}, "one value per column"),
    ({"importance": torch.full((N,), float("nan"))}, "NaN or Inf"),
    ({"importance": torch.full((N,), 1e39, dtype=torch.float64)}, "NaN or Inf"),
    ({"importance": -torch.ones(N)}, "negative"),
    ({"importance": torch.ones(N, dtype=torch.complex64)}, "real numbers"),
])
def test_fake_quantize_importance_errors(kwargs, match):
    args = {"fmt": "q4_k", "axis": -1, "block_size": None, "importance": torch.ones(N), **kwargs}
    with pytest.raises(FormatError, match=match):
        fake_quantize(torch.randn(4, N), args.pop("fmt"), **args)


def test_weighted_api_errors():
    x = torch.randn(4, N)
    with pytest.raises(FormatError, match="2-D"):
        fake_quantize_weighted(x.reshape(-1), "q4_0", torch.ones(N))
    with pytest.raises(FormatError, match="multiple of 256"):
        to_gguf_bytes(torch.randn(4, 96), "q4_k", torch.ones(96))
    with pytest.raises(FormatError, match="NaN"):
        to_gguf_bytes(torch.full((4, N), float("nan")), "q4_0", torch.ones(N))
    with pytest.raises(FormatError, match="llama.cpp's formats only"):
        to_gguf_bytes(x, "nvfp4", torch.ones(N))
    with pytest.raises(FormatError, match="floating-point"):
        fake_quantize_weighted(x.to(torch.int32), "q4_0", torch.ones(N))
    assert fake_quantize_weighted(torch.zeros(0, N), "q4_0", torch.ones(N)).shape == (0, N)


def test_zero_weight_columns_are_free():
    # Q6_K weighs each column's error by the imatrix itself: a column of weight 0 adds exactly 0 to every sum of the
    # search, so changing its value (below the sub-block's largest |x|, which sets the candidate scales) leaves every
    # other value as it was
    x = torch.tensor([[1.0 + 0.01 * i for i in range(256)]])
    qw = torch.ones(256)
    qw[3] = 0.0
    x2 = x.clone()
    x2[0, 3] = 1.02
    keep = qw > 0
    assert torch.equal(fake_quantize_weighted(x, "q6_k", qw)[0, keep], fake_quantize_weighted(x2, "q6_k", qw)[0, keep])


def test_module_exports():
    # the weighted entry points live in ggml_imatrix, which builds on ggml (never the other way: no import cycle);
    # without an importance matrix its to_gguf_bytes is ggml's
    assert not hasattr(ggml, "fake_quantize_weighted")
    x = torch.randn(2, 64)
    assert np.array_equal(to_gguf_bytes(x, "q4_0"), ggml.to_gguf_bytes(x, "q4_0"))
