"""The token-wise price in bfloat16 products (``features.fisher.price_dtype``): chosen by what the hardware
multiplies natively, and within its own rounding bound of a float64 computation."""

from __future__ import annotations

import pytest
import torch

from quantpredict.features import act_price, fisher

U_BF16 = 2.0**-8  # bfloat16's unit roundoff: 8 significant bits, round to nearest


def _layer(seed=0, t=96, out=48, inp=80, signed=True):
    """``(d [out, in] float32, x [t, in] bf16, s [t, out] bf16)``; ``signed=False``: every entry positive, so the sums
    do not cancel and the rounding bound below is within a few u of the value."""
    g = torch.Generator().manual_seed(seed)
    draw = (lambda *shape: torch.randn(*shape, generator=g)) if signed else \
        (lambda *shape: torch.rand(*shape, generator=g) + 0.1)
    x = (draw(t, inp) * torch.linspace(0.2, 5.0, inp)).bfloat16()  # stored as the profile does
    s = draw(t, out).bfloat16()
    d = draw(out, inp) * 1e-3  # a float32 weight change
    return d, x, s


def _bound(d, x, s):
    """``(exact, bound)``: the float64 price ``0.5 / T sum_t v_t^2`` and a bound on the bfloat16 product's error.

    ``v_t = s_t^T d x_t``. The product rounds each ``d_ji`` (relative ``u``) and each output ``(s d)_ti`` (``u``), and
    accumulates in float32 (``n 2^-24`` relative, under ``0.1 u`` here), so ``|v^_t - v_t| <= e_t = 2.1 u m_t`` with
    ``m_t = sum_ij |s_tj| |d_ji| |x_ti|``, and the price moves by at most ``0.5 / T sum_t e_t (2 |v_t| + e_t)``."""
    d64, x64, s64 = d.double(), x.double(), s.double()
    v = ((s64 @ d64) * x64).sum(1)
    m = ((s64.abs() @ d64.abs()) * x64.abs()).sum(1)
    e = 2.1 * U_BF16 * m
    n = x.shape[0]
    return 0.5 * float(v.pow(2).sum()) / n, 0.5 * float((e * (2 * v.abs() + e)).sum()) / n


@pytest.mark.parametrize("signed", [False, True])
def test_bfloat16_price_is_within_its_rounding_bound_of_float64(signed):
    d, x, s = _layer(signed=signed)
    exact, bound = _bound(d, x, s)
    if not signed:  # without cancellation the bound is tight: 4.2 u = 1.6% of the price
        assert bound < 0.02 * exact
    got = fisher.token_quadratic(d, x, s, x.shape[0], dtype=torch.bfloat16)
    assert abs(got - exact) <= bound
    f32 = fisher.token_quadratic(d, x, s, x.shape[0], dtype=torch.float32)
    assert f32 == pytest.approx(exact, rel=1e-5)
    assert got != f32  # the products were taken in bfloat16


def test_chunks_and_the_cross_layer_terms_are_the_same_products():
    d, x, s = _layer(1)
    into = torch.zeros(x.shape[0], dtype=torch.float64)
    whole = fisher.token_quadratic(d, x, s, x.shape[0], dtype=torch.bfloat16, into=into)
    chunked = fisher.token_quadratic(d, x, s, x.shape[0], chunk=17, dtype=torch.bfloat16)
    assert chunked == pytest.approx(whole, rel=1e-12)
    assert torch.equal(into, fisher.token_terms(s, d, x, torch.bfloat16))
    assert fisher.cross_layer_quadratic(into, x.shape[0]) == pytest.approx(whole, rel=1e-12)


def test_act_quadratic_weight_part_is_the_token_quadratic_in_either_dtype():
    d, x, s = _layer(2)
    w = torch.randn(d.shape, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.bfloat16, torch.float32):
        total, weight, act = act_price.act_quadratic(w + d, d, x, s, None, None, None, dtype=dtype)
        assert total == weight == pytest.approx(fisher.token_quadratic(d, x, s, x.shape[0], dtype=dtype), rel=1e-12)
        assert act == 0.0


def test_price_dtype_follows_the_hardware(monkeypatch):
    choose = fisher.price_dtype.__wrapped__  # the uncached function: the cached one answers for this machine
    for caps, want in (({"avx512_bf16": True}, torch.bfloat16), ({"amx_bf16": True}, torch.bfloat16),
                       ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, torch.float32)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert choose("cpu") is want
    assert choose("cuda") is torch.bfloat16 and choose("mps") is torch.float32
