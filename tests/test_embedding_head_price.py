"""The embedding and head terms of the weights-only price (:mod:`quantpredict.features.embedding_head`), each
against an independent float64 computation through the whole model: the head's by a Jacobian-vector product of
the logits along the head's change, the embedding's by the gradient of the sampled log-likelihood with respect to
a per-position step along the embedding's change (``inputs_embeds``)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from conftest import VOCAB, tiny_model
from torch.func import functional_call, jvp

from quantpredict import arch
from quantpredict.features.embedding_head import (
    embedding_quadratic,
    head_quadratic,
    measure_embedding_head,
    price_embedding_and_head,
)
from quantpredict.formats import fake_quantize
from quantpredict.recipe import Recipe

SEED = 3


def _gemma(case: str) -> torch.nn.Module:
    """Gemma-2 (logit soft-capping, the embedding scaled outside its module) or Gemma-3 (scaled inside it)."""
    torch.manual_seed(0)
    cls, model_cls = {"gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
                      "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}[case]
    cfg = cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=8,
              final_logit_softcapping=5.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
    cfg._attn_implementation = "eager"
    return model_cls(cfg).eval()


def _model(case: str) -> torch.nn.Module:
    if case == "llama-pad":  # a padding index past every row the windows use (Qwen2's is 151643 of 151936)
        model = tiny_model("llama")
        arch.embedding_modules(model)[0].padding_idx = VOCAB - 1
    else:
        model = _gemma(case) if case.startswith("gemma") else tiny_model(case)
    return model.double()


def _windows(n: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB - 1, (n, seq), generator=torch.Generator().manual_seed(1))


def _sampled_labels(model, windows):
    """The labels measure_embedding_head draws: the same generator, the same FP distributions, window by window."""
    gen = torch.Generator().manual_seed(SEED)
    out = []
    with torch.no_grad():
        for ids in windows.split(1):
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1).reshape(-1, VOCAB)
            out.append(torch.multinomial(logp.exp(), 1, generator=gen))
    return out


def _reference_head(model, windows, delta, act=None):
    """0.5 / T sum_t dz^T (diag p - p p^T) dz with dz the JVP of the logits along the head's change (float64);
    ``act``: the head's input rounded as the runtime rounds it, dz = W_q A(h) - W h taken directly instead."""
    head = arch.head(model)
    name = next(n for n, p in model.named_parameters() if p is head.weight)
    params = {n: p.detach() for n, p in model.named_parameters()}
    total = 0.0
    for ids in windows.split(1):
        def logits(p, ids=ids):
            return functional_call(model, p, args=(), kwargs={"input_ids": ids}).logits[:, :-1]

        tangent = {n: torch.zeros_like(p) for n, p in params.items()}
        tangent[name] = delta
        z, dz = (t.detach() for t in jvp(logits, (params,), (tangent,)))
        if act is not None:
            captured: list[torch.Tensor] = []
            hook = head.register_forward_pre_hook(lambda m, a, out=captured: out.append(a[0]))
            with torch.no_grad():
                model(input_ids=ids)
            hook.remove()
            h = captured[0][:, :-1].detach().double()
            hq = fake_quantize(h.float(), act[0], axis=-1, block_size=act[1]).double()
            w = head.weight.detach().double()
            dz = hq @ (w + delta).T - h @ w.T
        p = torch.softmax(z.double(), -1)
        mean = (p * dz).sum(-1)
        total += float(((p * dz * dz).sum(-1) - mean * mean).sum())
    return 0.5 * total / windows.numel()


def _reference_embedding(model, windows, fmt):
    emb = arch.embedding_modules(model)[0]
    moved = copy.deepcopy(emb)
    with torch.no_grad():
        moved.weight.copy_(fake_quantize(emb.weight.float(), fmt).double())
    total = 0.0
    for ids, y in zip(windows.split(1), _sampled_labels(model, windows), strict=True):
        with torch.no_grad():
            e = emb(ids)
            de = moved(ids) - e
        step = torch.zeros(ids.shape[1], dtype=torch.float64, requires_grad=True)
        z = model(inputs_embeds=e + step[None, :, None] * de).logits[:, :-1]
        logp = torch.log_softmax(z.double(), -1).reshape(-1, VOCAB)
        (g,) = torch.autograd.grad(logp.gather(-1, y).sum(), step)
        total += float(g.pow(2).sum())
    return 0.5 * total / windows.numel()


@pytest.mark.parametrize("case", ["llama", "gemma2", "gemma3_text"])
def test_head_term_is_the_logit_space_quadratic_of_the_whole_model(case):
    model = _model(case)
    windows = _windows()
    stats = measure_embedding_head(model, windows, seed=SEED)
    w = arch.head(model).weight.detach()
    delta = (fake_quantize(w.float(), "int4") - w.float()).double()
    want = _reference_head(model, windows, delta)
    assert want > 0
    assert head_quadratic(model, stats, delta) == pytest.approx(want, rel=1e-4)
    act = ("q8_0_x86", 32)
    want_act = _reference_head(model, windows, delta, act=act)
    assert want_act != pytest.approx(want, rel=1e-3)  # the rounding of the head's input is priced
    if arch.logit_softcap(model) is None:
        assert head_quadratic(model, stats, delta, act) == pytest.approx(want_act, rel=1e-4)


@pytest.mark.parametrize("case", ["llama", "llama-pad", "gpt2", "gemma2", "gemma3_text"])
def test_embedding_term_is_the_token_wise_gradient_price(case):
    model = _model(case)
    windows = _windows()
    stats = measure_embedding_head(model, windows, seed=SEED)
    want = _reference_embedding(model, windows, "int4")
    assert want > 0
    assert embedding_quadratic(model, stats, "int4") == pytest.approx(want, rel=1e-5)


def test_head_term_is_the_kl_to_second_order():
    """The head alone quantized: the measured mean KL over the same positions approaches the price (second order;
    a small change, so within a few percent)."""
    model = tiny_model("llama").double()
    windows = _windows(4, 16)
    stats = measure_embedding_head(model, windows, seed=SEED)
    head = arch.head(model)
    w = head.weight.detach().clone()
    delta = (fake_quantize(w.float(), "int8") - w.float()).double()
    with torch.no_grad():
        z = model(input_ids=windows).logits[:, :-1].double()
        head.weight.add_(delta)
        zq = model(input_ids=windows).logits[:, :-1].double()
        head.weight.copy_(w)
    p, lq = torch.log_softmax(z, -1), torch.log_softmax(zq, -1)
    kl_sum = float((p.exp() * (p - lq)).sum())
    assert head_quadratic(model, stats, delta) == pytest.approx(kl_sum / windows.numel(), rel=0.03)


def test_recipes_price_the_matrices_they_quantize_and_a_tied_one_pays_both_terms():
    tied, untied = tiny_model("gpt2"), tiny_model("llama")
    windows = _windows()
    for model in (tied, untied):
        stats = measure_embedding_head(model, windows, seed=SEED)
        assert price_embedding_and_head(model, stats, Recipe("int4")) == {"embedding_quad": 0.0, "head_quad": 0.0}
    stats = measure_embedding_head(tied, windows, seed=SEED)
    w = arch.head(tied).weight.detach().float()
    delta = fake_quantize(w, "q8_0") - w
    got = price_embedding_and_head(tied, stats, Recipe("int4", head_format="q8_0"))
    assert got == {"embedding_quad": embedding_quadratic(tied, stats, "q8_0", delta),
                   "head_quad": head_quadratic(tied, stats, delta)}
    assert got["embedding_quad"] > 0 and got["head_quad"] > 0
    stats = measure_embedding_head(untied, windows, seed=SEED)
    only_e = price_embedding_and_head(untied, stats, Recipe("int4", embedding_format="q8_0"))
    assert only_e["head_quad"] == 0.0 and only_e["embedding_quad"] > 0
    w = arch.head(untied).weight.detach().float()
    runtime = price_embedding_and_head(untied, stats, Recipe("q8_0", head_format="q8_0"), runtime="llama.cpp-cpu")
    assert runtime["head_quad"] == head_quadratic(untied, stats, fake_quantize(w, "q8_0") - w, ("q8_0_x86", 32))


def test_measuring_leaves_the_model_as_it_was():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    stats = measure_embedding_head(model, _windows(), seed=SEED)
    assert model.training and flags == [p.requires_grad for p in model.parameters()]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert stats.positions == 24 and stats.head_inputs.shape == (22, 32) and stats.embedding_grads.shape == (24, 32)


def test_the_features_profile_group_adds_the_terms_to_token_gn_quad():
    """A run's stored ``token_gn_quad`` (features.extract, the sweep's path) carries the head's term as rank's does:
    measured on the first two calibration windows, the profile's token windows."""
    from quantpredict.features import extract
    from quantpredict.features.extract import feature_windows

    model = tiny_model("llama")
    calib = torch.randint(3, VOCAB, (4000,), generator=torch.Generator().manual_seed(5))
    plain = extract(model, Recipe("int4"), calib, which="profile")
    both = extract(model, Recipe("int4", head_format="int8"), calib, which="profile")
    stats = measure_embedding_head(model, feature_windows(model, calib)[:2], seed=0)
    w = arch.head(model).weight.detach().float()
    head = head_quadratic(model, stats, fake_quantize(w, "int8") - w)
    assert head > 0 and "head_quad" not in both  # the schema's features only: the store takes no others
    assert both["token_gn_quad"] == pytest.approx(plain["token_gn_quad"] + head, rel=1e-12)
    assert both["kfac_quad"] == plain["kfac_quad"]  # K-FAC terms: the linear layers alone


def test_a_protocol_that_scores_the_second_half_prices_those_positions_alone():
    """``scored_from=k`` (llama-perplexity's protocol): the head's term over the scored positions only, divided by
    their count plus one per window (as the default divides by every position); ``k = 1`` is the default exactly."""
    model = _model("llama")
    windows = _windows(2, 16)
    k = 9
    plain = measure_embedding_head(model, windows, seed=SEED)
    one = measure_embedding_head(model, windows, seed=SEED, scored_from=1)
    assert one.positions == plain.positions and torch.equal(one.embedding_grads, plain.embedding_grads)
    half = measure_embedding_head(model, windows, seed=SEED, scored_from=k)
    assert half.positions == 2 * (16 - k + 1) and half.head_inputs.shape[0] == 2 * (16 - k)
    w = arch.head(model).weight.detach()
    delta = (fake_quantize(w.float(), "int4") - w.float()).double()
    head = arch.head(model)
    with torch.no_grad():
        z = model(input_ids=windows).logits[:, k - 1:-1].double()
        head.weight.add_(delta)
        dz = model(input_ids=windows).logits[:, k - 1:-1].double() - z
        head.weight.sub_(delta)
    p = torch.softmax(z, -1)
    mean = (p * dz).sum(-1)
    want = 0.5 * float(((p * dz * dz).sum(-1) - mean * mean).sum()) / half.positions
    assert head_quadratic(model, half, delta) == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="scored_from"):
        measure_embedding_head(model, windows, scored_from=16)


def test_a_profile_that_scores_the_second_half(token_windows):
    from quantpredict.features.fisher import measure_profile, price_deltas

    model = tiny_model("llama")
    k = 13
    plain = measure_profile(model, token_windows, kfac=False)
    one = measure_profile(model, token_windows, kfac=False, scored_from=1)
    half = measure_profile(model, token_windows, kfac=False, scored_from=k)
    name = plain.names[0]
    assert torch.equal(one.token_grads[name], plain.token_grads[name]) and one.fp_nll == plain.fp_nll
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=token_windows).logits[:, k - 1:-1].double(), -1)
    nll = -logp.gather(-1, token_windows[:, k:, None]).mean()
    assert half.fp_nll == pytest.approx(float(nll), rel=1e-6) and half.tokens == 6 * (24 - k)
    rows = half.token_inputs[name].shape[0]
    assert rows == 2 * 24 and half.positions(rows) == 2 * (24 - k + 1) and plain.positions(rows) == rows
    # the context positions carry the scored positions' gradients: nonzero, unlike nothing scored before k
    assert float(half.token_grads[name][: k - 1].float().abs().sum()) > 0
    w = arch.linear_layers(model)[0].weight.detach().float()
    d = fake_quantize(w, "int4") - w
    names, deltas = [name], [d]
    x, s = half.token_inputs[name].float(), half.token_grads[name].float()
    want = 0.5 * float((((s @ d) * x).sum(1).double() ** 2).sum()) / half.positions(rows)
    assert price_deltas(half, names, deltas, kfac=False)["token_gn_quad"] == pytest.approx(want, rel=1e-5)
