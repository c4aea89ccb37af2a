"""One next-token NLL (quantpredict.lmhead): evaluation, features and QAT's trajectories all compute it, and each
path (whole logits, token chunks, per-window masks) equals an independent float64 reference written here from the
definition ``-log softmax(z)[y]``."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from quantpredict import lmhead
from quantpredict.evaluate import window_nlls
from quantpredict.evaluate.scoring import nll_sums
from quantpredict.evaluate.windows import Windows
from quantpredict.features.state import mean_nll, summed_nll
from quantpredict.qat import mean_nll as qat_mean_nll


def _windows(n: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def reference_window_nll_sums(model, ids: torch.Tensor, first_scored: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 sums of ``logsumexp(z) - z[y]`` over positions ``first_scored ..`` of each window, from a
    float64 copy of the model (no quantpredict code)."""
    import copy

    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        z = m64(input_ids=ids, use_cache=False).logits[:, :-1].double()  # [n, s-1, V]
    y = ids[:, 1:]
    nll = torch.logsumexp(z, dim=-1) - z.gather(-1, y[..., None]).squeeze(-1)  # [n, s-1]
    pos = torch.arange(1, ids.shape[1])[None, :]
    return (nll * (pos >= first_scored[:, None])).sum(dim=1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk_bytes", [10**9, 4 * VOCAB * 5])  # whole logits; 5-token chunks of the head
def test_evaluation_nll_equals_the_float64_reference(family, chunk_bytes):
    model = tiny_model(family, hidden=16, layers=2, heads=2)
    ids = _windows(5, 14)
    first = torch.tensor([1, 1, 4, 7, 13])  # Windows score positions first_scored .. (an overlap's prefix is not)
    ref = reference_window_nll_sums(model, ids, first)
    got = nll_sums(model, Windows(ids, first), batch_size=2, chunk_bytes=chunk_bytes)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("chunk_bytes", [10**9, 4 * VOCAB * 5])
def test_feature_nll_equals_evaluation_and_the_reference(chunk_bytes):
    model = tiny_model("llama", hidden=16, layers=2, heads=2)
    ids = _windows(4, 12, seed=1)
    ref = reference_window_nll_sums(model, ids, torch.ones(4, dtype=torch.long))
    with torch.no_grad():
        summed = summed_nll(model, ids, 3, chunk_bytes=chunk_bytes)
        mean = mean_nll(model, ids, 3, chunk_bytes=chunk_bytes)
    assert float(summed) == pytest.approx(float(ref.sum()), rel=2e-6)
    assert float(mean) == pytest.approx(float(ref.sum()) / (4 * 11), rel=2e-6)
    assert qat_mean_nll(model, ids, batch_size=3) == pytest.approx(float(window_nlls(model, ids).mean()), rel=1e-12)
    assert qat_mean_nll(model, ids) == pytest.approx(float(mean), rel=2e-6)


def test_summed_cross_entropy_value_gradient_and_hvp_equal_the_float64_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(23, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 40, dtype=torch.float64, generator=g)
    y = torch.randint(0, 40, (23,), generator=g)
    v = torch.randn(23, 6, dtype=torch.float64, generator=g)

    def terms(loss_of):
        z = torch.tanh(a) @ w  # [23, 40]: a nonlinear map in front, so second derivatives flow through z
        loss = loss_of(z)
        (grad,) = torch.autograd.grad(loss, a, create_graph=True)
        (hv,) = torch.autograd.grad((grad * v).sum(), a)
        return loss.detach(), grad.detach(), hv

    ref = terms(lambda z: (torch.logsumexp(z, -1) - z.gather(-1, y[:, None]).squeeze(-1)).sum())
    ours = terms(lambda z: lmhead.summed_cross_entropy(z, y))
    for x, r in zip(ours, ref):
        torch.testing.assert_close(x, r, rtol=1e-10, atol=1e-12)
    z = torch.randn(5, 7, dtype=torch.float64, generator=g)
    t = torch.randint(0, 7, (5,), generator=g)
    torch.testing.assert_close(lmhead.token_nll(z, t), torch.logsumexp(z, -1) - z.gather(-1, t[:, None]).squeeze(-1))
    assert float(lmhead.summed_cross_entropy(z, t)) == pytest.approx(float(lmhead.token_nll(z, t).sum()), rel=1e-12)
