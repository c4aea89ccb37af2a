"""``token_cross_quad``: the token-wise price with each position's terms summed over the layers before squaring."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from quantpredict import arch
from quantpredict.features import act_price
from quantpredict.features.embedding_head import with_embedding_and_head
from quantpredict.features.fisher import cross_layer_quadratic, measure_profile, price_deltas, profile_deltas
from quantpredict.formats import fake_quantize


def _setup(fmt=("int4", None)):
    model = tiny_model("llama", hidden=64)
    g = torch.Generator().manual_seed(0)
    prof = measure_profile(model, torch.randint(3, 320, (2, 16), generator=g), kfac=False)
    refs = arch.linear_layers(model)
    formats = [fmt] * len(refs)
    return model, prof, refs, formats, profile_deltas(refs, formats, "rtn", prof)


def _float64_cross(prof, refs, deltas, act=None):
    """``0.5 / T sum_t (sum_l s_lt^T v_lt)^2`` in float64 from the profile's stored tokens, with ``v = dW x`` (plus
    ``W_q (A(x) - x)`` for an activation format ``act``)."""
    total = None
    for ref, d in zip(refs, deltas, strict=True):
        if d is None:
            continue
        x = prof.token_inputs[ref.name].double()
        s = prof.token_grads[ref.name].double()
        v = x @ d.double().T
        if act is not None:
            w_q = (ref.weight.detach().float() + d.float()).double()
            err = (fake_quantize(x.float(), act, axis=-1, block_size=32) - x.float()).double()
            v = v + err @ w_q.T
        terms = (s * v).sum(1)
        total = terms if total is None else total + terms
    return 0.5 * float(total.pow(2).sum()) / total.shape[0]


def test_cross_layer_price_equals_a_float64_sum_over_layers(float32_prices):
    _, prof, refs, _, deltas = _setup()
    feats = price_deltas(prof, [r.name for r in refs], deltas, kfac=False)
    assert feats["token_cross_quad"] == pytest.approx(_float64_cross(prof, refs, deltas), rel=1e-5)
    # the cross terms are not small here: the two prices differ, which the comparison above must tell apart
    assert abs(feats["token_cross_quad"] / feats["token_gn_quad"] - 1) > 0.01


def test_one_layer_has_no_cross_terms():
    _, prof, refs, _, deltas = _setup()
    one = [d if i == 3 else None for i, d in enumerate(deltas)]
    feats = price_deltas(prof, [r.name for r in refs], one, kfac=False)
    assert feats["token_cross_quad"] == pytest.approx(feats["token_gn_quad"], rel=1e-12)
    assert cross_layer_quadratic(torch.zeros(5, dtype=torch.float64), 5) == 0.0


def test_weight_activation_path_gives_the_same_cross_price_and_adds_the_activation_terms(float32_prices):
    model, prof, refs, formats, deltas = _setup(("mxint4", 32))
    want = price_deltas(prof, [r.name for r in refs], deltas, kfac=False)
    got = act_price.price_act_recipe(model, prof, refs, formats, "rtn", act_format=None, act_block=None,
                                     smoothquant_alpha=None)
    assert got["token_cross_quad"] == pytest.approx(want["token_cross_quad"], rel=1e-6)
    with_act = act_price.price_act_recipe(model, prof, refs, formats, "rtn", act_format="mxint8", act_block=32,
                                          smoothquant_alpha=None)
    assert with_act["token_cross_quad"] == pytest.approx(_float64_cross(prof, refs, deltas, act="mxint8"), rel=1e-4)


def test_embedding_and_head_terms_join_the_cross_price_token_wise():
    feats = {"token_gn_quad": 0.5, "token_cross_quad": 0.6, "kfac_max_layer_share": 0.2}
    out = with_embedding_and_head(feats, {"embedding_quad": 0.1, "head_quad": 0.3})
    assert out["token_cross_quad"] == pytest.approx(1.0) and out["token_gn_quad"] == pytest.approx(0.9)
    assert "token_cross_quad" not in with_embedding_and_head({k: v for k, v in feats.items()
                                                              if k != "token_cross_quad"},
                                                             {"embedding_quad": 0.1, "head_quad": 0.3})
