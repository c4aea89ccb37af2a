import pytest
import torch
from conftest import tiny_model
from torch import nn

from quantpredict import arch
from quantpredict.errors import ModelError, UnsupportedArchitectureError


def test_block_by_block_matches_full_forward(any_family, token_windows):
    model = tiny_model(any_family)
    with torch.no_grad():
        ref = model(token_windows).logits
        inputs = arch.capture_block_inputs(model, token_windows, batch_size=4)
        h = inputs.hidden
        for block in arch.blocks(model):
            h = arch.run_block(block, arch.BlockInputs(h, inputs.kwargs), batch_size=4)
        logits = arch.head(model)(arch.final_norm(model)(h))
    if any_family == "opt":  # OPT may project after the final norm; tiny configs have no projection
        assert getattr(model.model.decoder, "project_out", None) is None
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_linear_refs_are_out_in_and_writable(any_family):
    model = tiny_model(any_family)
    refs = arch.linear_layers(model)
    assert len(refs) == len(arch.blocks(model)) * len(arch.adapter(model).linears)
    x = torch.randn(5, refs[0].in_features)
    for ref in refs:
        w = ref.weight
        assert w.shape == (ref.out_features, ref.in_features)
        x = torch.randn(3, ref.in_features)
        bias = ref.module.bias if ref.module.bias is not None else 0
        torch.testing.assert_close(ref.module(x), x @ w.T + bias)
        new = torch.zeros_like(w)
        ref.set_weight(new)
        assert torch.count_nonzero(ref.weight) == 0


def test_smooth_pairs_norms_feed_their_linears(any_family):
    model = tiny_model(any_family)
    for i in range(len(arch.blocks(model))):
        for pair in arch.smooth_pairs(model, i):
            assert pair.norm.weight.shape[0] == pair.linears[0].in_features


def test_non_embedding_parameters_excludes_embeddings_and_head(any_family):
    model = tiny_model(any_family)
    n = arch.non_embedding_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < n < total
    assert n == sum(p.numel() for b in arch.blocks(model) for p in b.parameters()) + sum(
        p.numel() for p in arch.final_norm(model).parameters()
    )


def test_unsupported_architecture_lists_supported():
    class Fake(nn.Module):
        class config:  # noqa: N801
            model_type = "mamba"

    with pytest.raises(UnsupportedArchitectureError, match="llama, opt, gpt2, gpt_neox"):
        arch.adapter(Fake())


def test_check_finite_names_parameter():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight"):
        arch.check_finite(model)
