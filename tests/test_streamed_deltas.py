"""A recipe is priced one layer's change at a time (``iter_profile_deltas``, ``iter_awq_deltas``): the same floats as
pricing the whole list of changes, bit for bit, with at most two layers' changes alive at once (the whole list of a
1.5B model's changes is 5.2 GB of float32, which set its peak RSS)."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from conftest import tiny_model

from quantpredict import arch
from quantpredict.features.awq_price import awq_deltas, iter_awq_deltas
from quantpredict.features.fisher import iter_profile_deltas, measure_profile, price_deltas, profile_deltas


def _same(a: dict, b: dict) -> bool:
    """Equal floats key by key (NaN equal to NaN: the K-FAC prices a lean profile leaves out)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = tiny_model("llama", layers=2, hidden=64)
    windows = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(1))
    prof = measure_profile(model, windows, kfac=False)
    return model, arch.linear_layers(model), prof


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_prices_equal_the_listed_ones(setting, method):
    model, refs, prof = setting
    formats = [("mxint4", None) if i % 3 else None for i in range(len(refs))]  # some layers left in FP
    names = [r.name for r in refs]
    want = price_deltas(prof, names, profile_deltas(refs, formats, method, prof), kfac=False)
    got = price_deltas(prof, names, iter_profile_deltas(refs, formats, method, prof), kfac=False)
    assert _same(got, want)  # the same floats, not approximately
    assert want["token_gn_quad"] > 0


def test_awq_streamed_equals_listed_and_any_order(setting):
    model, refs, prof = setting
    formats = [("int4", None)] * len(refs)
    names = [r.name for r in refs]
    listed = awq_deltas(model, refs, formats, "rtn", prof)
    streamed = list(iter_awq_deltas(model, refs, formats, "rtn", prof))
    assert all(torch.equal(a, b) for a, b in zip(listed, streamed, strict=True))
    assert _same(price_deltas(prof, names, iter_awq_deltas(model, refs, formats, "rtn", prof), kfac=False),
                 price_deltas(prof, names, listed, kfac=False))
    order = list(range(len(refs)))[::-1]  # the list form takes refs in any order and answers in that order
    shuffled = awq_deltas(model, [refs[i] for i in order], [formats[i] for i in order], "rtn", prof)
    assert all(torch.equal(shuffled[k], listed[i]) for k, i in enumerate(order))
    with pytest.raises(ValueError, match="block by block"):
        next(iter_awq_deltas(model, [refs[i] for i in order], formats, "rtn", prof))


def test_one_change_at_a_time_and_grad_mode_kept(setting):
    """Once layer i's change is handed out, no earlier one is kept (torch's no_grad wrapper of a generator holds the
    last value it handed out until the next step: so two changes at most while the next one is computed); the
    generator's no_grad is entered per step, so the caller's grad mode is its own between steps."""
    model, refs, prof = setting
    gen = iter_profile_deltas(refs, [("int4", None)] * len(refs), "rtn", prof)
    alive = []
    for d in gen:
        assert torch.is_grad_enabled()
        alive.append(weakref.ref(d))
        del d
        gc.collect()
        assert all(r() is None for r in alive[:-1])  # nothing older than the last change is kept
