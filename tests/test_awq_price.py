"""AWQ priced from the weights (:mod:`quantpredict.features.awq_price`): the change it prices, applied to the FP
model, is the AWQ-quantized model that ``quantize_model`` makes from the same statistics (a one-block model, whose
block sees the FP inputs either way), to float32 rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from quantpredict import arch, quantize
from quantpredict.features.awq_price import awq_deltas
from quantpredict.quantize import layer_plan
from quantpredict.quantize.calib import capture_linear_inputs
from quantpredict.recipe import Recipe


@pytest.mark.parametrize("label", ["int4-rtn-awq", "uint3_b32-rtn-awq", "int4-gptq-awq"])
def test_the_priced_change_is_the_awq_model(label, token_windows):
    model = tiny_model("llama", layers=1, hidden=64)
    recipe = Recipe.from_label(label)
    q = copy.deepcopy(model)
    report = quantize.quantize_model(q, recipe, token_windows, progress=False)
    assert report.awq and any(g.ratio > 0 for g in report.awq)  # the search moved something
    refs = arch.linear_layers(model)
    planned = {p.ref.name: (p.weight_format, p.block_size) for p in layer_plan(model, recipe)}
    with torch.no_grad(), capture_linear_inputs(refs) as stats:
        model(input_ids=token_windows)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gptq = {"blocksize": recipe.gptq_blocksize, "percdamp": recipe.percdamp, "act_order": recipe.act_order}
    deltas = awq_deltas(model, refs, [planned.get(r.name) for r in refs], recipe.method, None, gptq_options=gptq,
                        hessians={n: s.hessian for n, s in stats.items()},
                        absmeans={n: s.absmean for n, s in stats.items()})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is put back
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for r, d in zip(arch.linear_layers(moved), deltas, strict=True):
            r.set_weight(r.weight + d)
        want, got = q(input_ids=token_windows).logits, moved(input_ids=token_windows).logits
        plain = model(input_ids=token_windows).logits
    assert not torch.allclose(want, plain, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rank_refuses_what_it_does_not_price_before_loading():
    from quantpredict.errors import RecipeError
    from quantpredict.predict.rank import rank_recipes

    with pytest.raises(RecipeError, match="AWQ with activation quantization"):
        rank_recipes("no-such-model", ["mxint4-rtn-awq-a_mxint8"])  # no model is looked up
    with pytest.raises(RecipeError, match="without a runtime's rounding"):
        rank_recipes("no-such-model", ["q4_0-rtn-awq"], runtime="llama.cpp-cpu")
