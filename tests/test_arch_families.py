"""Every supported model type (and config layout) end to end, on tiny random-weight models built from configs.

Each case is a tiny config (hidden 64, 2 layers, vocabulary 320, eager attention, float32, seeded); its norms get
random weights and biases so that SmoothQuant's fold is exercised away from the identity init.
"""

from __future__ import annotations

import json
import types
import warnings

import pytest
import torch
import transformers as tf
from conftest import tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantpredict import arch, evaluate, features
from quantpredict.cli import main
from quantpredict.errors import UnsupportedArchitectureError
from quantpredict.quantize import Recipe, apply_recorded_scales, apply_smoothing, fold_scales, quantize_model

VOCAB = 320
H, L, NH = 64, 2, 4
_LLAMA_LIKE = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=NH,
                   max_position_embeddings=128)
_FALCON = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=NH)

# case -> (config class, config fields); the four original families come from conftest's tiny_model
CONFIGS: dict[str, tuple[type, dict]] = {
    "mistral": (tf.MistralConfig, dict(_LLAMA_LIKE, num_key_value_heads=2, head_dim=16, sliding_window=8)),
    # one sliding-window layer, one full: the blocks receive different masks
    "qwen2": (tf.Qwen2Config, dict(_LLAMA_LIKE, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                                   max_window_layers=1)),
    "qwen3": (tf.Qwen3Config, dict(_LLAMA_LIKE, num_key_value_heads=2, head_dim=16)),
    "gemma": (tf.GemmaConfig, dict(_LLAMA_LIKE, num_key_value_heads=1, head_dim=16)),
    "gemma2": (tf.Gemma2Config, dict(_LLAMA_LIKE, num_key_value_heads=2, head_dim=16, sliding_window=8)),
    "gemma3_text": (tf.Gemma3TextConfig, dict(_LLAMA_LIKE, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                              layer_types=["sliding_attention", "full_attention"])),
    "phi3": (tf.Phi3Config, dict(_LLAMA_LIKE, num_key_value_heads=2)),
    "olmo2": (tf.Olmo2Config, dict(_LLAMA_LIKE, num_key_value_heads=2)),
    "stablelm": (tf.StableLmConfig, dict(_LLAMA_LIKE, num_key_value_heads=2, use_qkv_bias=True)),
    "stablelm-parallel": (tf.StableLmConfig, dict(_LLAMA_LIKE, num_key_value_heads=2, use_parallel_residual=True,
                                                  qk_layernorm=True)),
    "falcon": (tf.FalconConfig, dict(_FALCON, bias=True)),
    "falcon-sequential-alibi": (tf.FalconConfig, dict(_FALCON, parallel_attn=False, alibi=True, multi_query=False)),
    "falcon-new": (tf.FalconConfig, dict(_FALCON, new_decoder_architecture=True, num_kv_heads=2)),
    "falcon-new-one-norm": (tf.FalconConfig, dict(_FALCON, new_decoder_architecture=True, num_kv_heads=2,
                                                  num_ln_in_parallel_attn=1)),
    "gptj": (tf.GPTJConfig, dict(n_embd=H, n_layer=L, n_head=NH, rotary_dim=8, n_positions=128)),
    "bloom": (tf.BloomConfig, dict(hidden_size=H, n_layer=L, n_head=NH)),
    "bloom-postln-residual": (tf.BloomConfig, dict(hidden_size=H, n_layer=L, n_head=NH,
                                                   apply_residual_connection_post_layernorm=True)),
    "phi": (tf.PhiConfig, dict(_LLAMA_LIKE, partial_rotary_factor=0.5)),
    "gpt_neox-sequential": (tf.GPTNeoXConfig, dict(hidden_size=H, intermediate_size=4 * H, num_hidden_layers=L,
                                                   num_attention_heads=NH, max_position_embeddings=128,
                                                   rotary_pct=0.5, use_parallel_residual=False)),
}
ORIGINAL = ("llama", "opt", "gpt2", "gpt_neox")
CASES = (*ORIGINAL, *CONFIGS)


def _perturb_norms(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if "norm" not in type(mod).__name__.lower():
                continue
            for p in (getattr(mod, "weight", None), getattr(mod, "bias", None)):
                if isinstance(p, torch.Tensor):
                    p.add_(0.2 * torch.randn(p.shape, generator=g))


def build(case: str, seed: int = 0) -> nn.Module:
    if case in ORIGINAL:
        model = tiny_model(case, seed=seed)
    else:
        cls, fields = CONFIGS[case]
        cfg = cls(**fields, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    _perturb_norms(model, seed)
    return model


@pytest.fixture(params=CASES)
def case(request):
    return request.param


@pytest.fixture
def windows():
    return torch.randint(3, VOCAB, (6, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def stream():
    return torch.randint(3, VOCAB, (400,), generator=torch.Generator().manual_seed(2))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _tree_linears(model: nn.Module) -> list[str]:
    """Linear/Conv1D modules of the model tree, the LM head excepted (independently of arch)."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head]


# ---- coverage of the table -----------------------------------------------------------------------------------------


def test_every_adapter_row_has_a_case():
    hit = {(m.config.model_type, arch.adapter(m)) for m in map(build, CASES)}
    rows = {(t, ad) for t, variants in arch._ADAPTERS.items() for ad in variants}
    assert rows <= hit, f"adapter rows without a test case: {[(t, a.describe_when()) for t, a in rows - hit]}"
    assert len(arch.SUPPORTED_FAMILIES) >= 14


# ---- block by block ------------------------------------------------------------------------------------------------


def test_block_by_block_matches_full_forward(case, windows):
    model = build(case)
    ref = _logits(model, windows)
    with torch.no_grad():
        inputs = arch.capture_block_inputs(model, windows, batch_size=4)  # batches of 4 and 2
        h = inputs.hidden
        for block in arch.blocks(model):
            h = arch.run_block(block, arch.BlockInputs(h, inputs.kwargs), batch_size=4)
        out = arch.logits(model, h)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_kwargs_that_differ_between_blocks_are_kept_per_block(windows):
    # Gemma-3 gives its sliding layer local rotary embeddings and a windowed mask, its full layer global ones
    model = build("gemma3_text")
    with torch.no_grad():
        inputs = arch.capture_block_inputs(model, windows, batch_size=8)
        assert isinstance(inputs.kwargs["position_embeddings"], arch.PerBlock)
        assert isinstance(inputs.kwargs["attention_mask"], arch.PerBlock)
        first = {k: v.values[0] if isinstance(v, arch.PerBlock) else v for k, v in inputs.kwargs.items()}
        h = inputs.hidden
        for block in arch.blocks(model):  # block 0's kwargs for every block: not the model
            h = arch.run_block(block, arch.BlockInputs(h, first), batch_size=8)
    assert (arch.logits(model, h) - _logits(model, windows)).abs().max() > 1e-3


# ---- quantization --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq+smoothquant"])
def test_quantize_model_quantizes_every_linear_on_the_int4_grid(case, method, stream):
    model = build(case)
    smooth = method.endswith("+smoothquant")
    if smooth and not arch.smoothquant_supported(model):
        pytest.skip("SmoothQuant is refused for this layout (tested below)")
    names = _tree_linears(model)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in names}
    recipe = Recipe(weight_format="int4", method=method.split("+")[0], calib_samples=4, calib_seq_len=16,
                    smoothquant_alpha=0.5 if smooth else None)
    report = quantize_model(model, recipe, stream, batch_size=4, progress=False)
    assert len(report.layers) == len(names)
    assert sorted(r.name for r in report.layers) == sorted(names)
    mods = dict(model.named_modules())
    for name in names:
        w0, w = before[name], mods[name].weight.detach()
        if isinstance(mods[name], Conv1D):
            w0, w = w0.t(), w.t()
        assert not torch.equal(w, w0), name
        assert max(len(row.unique()) for row in w) <= 15, name  # int4: the levels -7 .. 7 times a row scale
        if smooth:  # the row scale was fitted on the smoothed weight, which is not at hand here
            continue
        # int4, one scale per output row fitted on the original row: max|w0| / 7 (RTN and GPTQ alike)
        k = w.double() / (w0.double().abs().amax(dim=1, keepdim=True) / 7)
        assert (k - k.round()).abs().max() < 1e-4, name
        assert k.abs().max() <= 7 + 1e-4, name
    assert torch.isfinite(_logits(model, stream[:32].view(2, 16))).all()


# ---- SmoothQuant ---------------------------------------------------------------------------------------------------


def _random_smoothing(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i in range(len(arch.blocks(model))):
        for pair in arch.smooth_pairs(model, i):
            assert pair.norm.weight.shape[0] == pair.linears[0].in_features
            s = torch.exp(0.7 * torch.randn(pair.linears[0].in_features, generator=g, dtype=torch.float64))
            apply_smoothing(pair, s)


def test_smoothquant_preserves_logits_or_refuses(case, windows):
    model = build(case)
    model_type = model.config.model_type
    if not arch.smoothquant_supported(model):
        with pytest.raises(UnsupportedArchitectureError, match=f"SmoothQuant is not supported for model type "
                                                                f"'{model_type}'"):
            arch.smooth_pairs(model, 0)
        with pytest.raises(UnsupportedArchitectureError, match=model_type):
            quantize_model(model, Recipe("int4", smoothquant_alpha=0.5), windows, progress=False)
        return
    ref = _logits(model, windows)
    weights = [r.weight.detach().clone() for r in arch.linear_layers(model)]
    _random_smoothing(model)
    torch.testing.assert_close(_logits(model, windows), ref, rtol=0, atol=1e-5)
    changed = [not torch.equal(w, r.weight) for w, r in zip(weights, arch.linear_layers(model))]
    assert sum(changed) == sum(len(p.linears) for i in range(L) for p in arch.smooth_pairs(model, i))


def test_parallel_blocks_share_one_scale_between_attention_and_mlp():
    for case_name in ("gptj", "phi", "falcon", "stablelm-parallel", "falcon-new-one-norm"):
        model = build(case_name)
        ad = arch.adapter(model)
        assert ad.parallel and len(ad.smooth_pairs) == 1, case_name
        firsts = ad.smooth_pairs[0][1]
        assert any("mlp" in p for p in firsts) and any("attn" in p or "attention" in p for p in firsts), case_name


def test_refused_layouts_really_break_under_a_fold(windows):
    # BLOOM with the residual taken after the norm: the sequential layout's fold would change the function, which is
    # why that layout refuses SmoothQuant
    model = build("bloom-postln-residual")
    ref = _logits(model, windows)
    wrong = arch._ADAPTERS["bloom"][0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in arch.blocks(model):
            for norm_path, lin_paths in wrong.smooth_pairs:
                refs = [arch.LinearRef(p, arch._get(block, p), 0) for p in lin_paths]
                s = torch.exp(0.7 * torch.randn(H, generator=g, dtype=torch.float64))
                apply_smoothing(arch.SmoothPair(arch._get(block, norm_path), norm_path, refs), s)
    assert (_logits(model, windows) - ref).abs().max() > 1e-3


def _gemma_norm_reference(x, w, eps):
    """Gemma's RMSNorm written out: x / rms(x) * (1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)


def test_gemma_fold_is_one_plus_w_over_s_minus_one():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    g = torch.Generator().manual_seed(0)
    dim = 16
    norm = GemmaRMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(0.5 * torch.randn(dim, generator=g))
    w0 = norm.weight.detach().clone()
    lin = nn.Linear(dim, 8, bias=False)
    x = torch.randn(5, dim, generator=g)
    s = torch.exp(torch.randn(dim, generator=g, dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(norm(x), _gemma_norm_reference(x, w0, 1e-6))  # the module is (1 + w)
        y_ref = lin(norm(x))
        pair = arch.SmoothPair(norm, "norm", [arch.LinearRef("lin", lin, 0)], norm_offset=1.0)
        apply_smoothing(pair, s)
        torch.testing.assert_close(norm.weight, ((1 + w0.double()) / s - 1).float())
        torch.testing.assert_close(norm(x), _gemma_norm_reference(x, w0, 1e-6) / s.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lin(norm(x)), y_ref, rtol=1e-5, atol=1e-5)
        # w / s instead: the norm computes x_hat * (1 + w / s), not x_hat * (1 + w) / s
        naive = _gemma_norm_reference(x, w0 / s.float(), 1e-6)
        assert (naive - _gemma_norm_reference(x, w0, 1e-6) / s.float()).abs().max() > 0.1


def test_gemma_models_need_the_offset(windows):
    for case_name in ("gemma", "gemma2", "gemma3_text"):
        model = build(case_name)
        assert arch.adapter(model).norm_offset == 1.0
        ref = _logits(model, windows)
        g = torch.Generator().manual_seed(0)
        for i in range(L):
            for pair in arch.smooth_pairs(model, i):
                s = torch.exp(0.7 * torch.randn(H, generator=g, dtype=torch.float64))
                apply_smoothing(arch.SmoothPair(pair.norm, pair.norm_name, pair.linears, norm_offset=0.0), s)
        assert (_logits(model, windows) - ref).abs().max() > 1e-3, case_name


def test_gemma2_folds_only_into_the_norms_before_linears():
    pairs = dict(arch.adapter(build("gemma2")).smooth_pairs)
    assert set(pairs) == {"input_layernorm", "pre_feedforward_layernorm"}  # post_* norms act on branch outputs


# ---- AWQ -----------------------------------------------------------------------------------------------------------

# the linear -> linear folds each case takes (the tiny mistral/qwen2/qwen3/gemma*/olmo2/stablelm/phi3/falcon-new configs
# use grouped-query attention, so their v -> o fold does not apply)
AWQ_LINEAR_FOLDS = {
    "llama": {"self_attn.v_proj->self_attn.o_proj", "mlp.up_proj->mlp.down_proj"},
    "opt": {"self_attn.v_proj->self_attn.out_proj", "fc1->fc2"},
    "gpt2": {"attn.c_attn->attn.c_proj"},
    "phi3": {"mlp.gate_up_proj->mlp.down_proj"},
    "gptj": {"attn.v_proj->attn.out_proj"},
    "phi": {"self_attn.v_proj->self_attn.dense"},
    **{c: {"mlp.up_proj->mlp.down_proj"} for c in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                                    "stablelm", "stablelm-parallel")},
}


def _random_awq_folds(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 0
    for i in range(len(arch.blocks(model))):
        for group in arch.awq_groups(model, i):
            s = torch.exp(0.7 * torch.randn(group.in_features, generator=g, dtype=torch.float64))
            fold_scales(group, s)
            n += 1
    return n


def test_awq_folds_preserve_logits_or_refuse(case, windows):
    # every scaling group (norm -> linears and linear -> linear) folded with random scales: the same function
    model = build(case)
    model_type = model.config.model_type
    if not arch.smoothquant_supported(model):
        with pytest.raises(UnsupportedArchitectureError, match=f"AWQ is not supported for model type "
                                                                f"'{model_type}'.*without awq"):
            arch.awq_groups(model, 0)
        with pytest.raises(UnsupportedArchitectureError, match=f"AWQ is not supported for model type '{model_type}'"):
            quantize_model(model, Recipe("uint4", awq=True), windows, progress=False)
        return
    ref = _logits(model, windows)
    prefix = arch.adapter(model).blocks + ".0."
    folds = {g.name.removeprefix(prefix) for g in arch.awq_groups(model, 0) if g.prev is not None}
    assert folds == AWQ_LINEAR_FOLDS.get(case, set()), case
    n = _random_awq_folds(model)
    assert n == L * len(arch.awq_groups(model, 0))
    torch.testing.assert_close(_logits(model, windows), ref, rtol=0, atol=1e-5)


def test_awq_linear_folds_break_where_they_are_refused(windows):
    # the conditions are needed: under grouped-query attention (mistral) v is narrower than o's input; through
    # GELU (gpt_neox) fc1 -> fc2 would not commute; OPT with a GELU activation loses its fc1 -> fc2 fold
    opt = build("opt")
    opt.config.activation_function = "gelu"
    assert all(g.prev is None or "fc1" not in g.name for g in arch.awq_groups(opt, 0))
    neox = build("gpt_neox-sequential")
    ref = _logits(neox, windows)
    block = arch.blocks(neox)[0]
    prev = arch.LinearRef("fc1", block.mlp.dense_h_to_4h, 0)
    nxt = arch.LinearRef("fc2", block.mlp.dense_4h_to_h, 0)
    s = torch.exp(0.7 * torch.randn(prev.out_features, generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64))
    fold_scales(arch.ScaleGroup("fc1->fc2", [nxt], prev=prev), s)
    assert (_logits(neox, windows) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_awq_quantize_model_on_every_architecture(case, method, stream):
    model = build(case)
    if not arch.smoothquant_supported(model):
        pytest.skip("AWQ is refused for this layout (tested above)")
    fp = build(case)
    recipe = Recipe("uint4", block_size=32, method=method, awq=True, calib_samples=4, calib_seq_len=16)
    report = quantize_model(model, recipe, stream, batch_size=4, progress=False)
    assert len(report.layers) == len(_tree_linears(model))
    assert len(report.awq) == L * len(arch.awq_groups(fp, 0))
    assert all(g.loss <= g.loss_rtn for g in report.awq)  # ratio 0 (s = 1) is RTN and always a candidate
    assert "AWQ:" in report.format_table() and report.summary()["awq_groups"] == len(report.awq)
    # the recorded scales, folded into an FP copy, give the model AWQ quantized: the same function as before
    ref = _logits(fp, stream[:32].view(2, 16))
    apply_recorded_scales(fp, report.awq)
    torch.testing.assert_close(_logits(fp, stream[:32].view(2, 16)), ref, rtol=0, atol=1e-5)
    assert torch.isfinite(_logits(model, stream[:32].view(2, 16))).all()


# ---- features and evaluation ---------------------------------------------------------------------------------------


def test_features_and_compare_run(case, stream):
    model = build(case)
    feats = features.extract(model, Recipe("int4"), stream, which="model,format,noise,landscape", n_windows=2,
                             seq_len=16)
    assert feats and all(torch.isfinite(torch.tensor(v)) for v in feats.values())
    assert feats["n_layers"] == L
    q = build(case)
    quantize_model(q, Recipe("int4"), stream, progress=False)
    res = evaluate.compare_ids(model, q, stream, seq_len=16, max_windows=2)
    assert res.to_dict()


def test_smoothquant_features_measure_the_same_fp_model(case, stream):
    # features.extract folds SmoothQuant into a copy (features.direction.smoothed_copy): the FP loss must not move
    model = build(case)
    plain = features.extract(model, Recipe("int4"), stream, which="model", n_windows=2, seq_len=16)
    recipe = Recipe("int4", smoothquant_alpha=0.8)
    if not arch.smoothquant_supported(model):
        with pytest.raises(UnsupportedArchitectureError, match=model.config.model_type):
            features.extract(model, recipe, stream, which="model", n_windows=2, seq_len=16)
        return
    smoothed = features.extract(model, recipe, stream, which="model,noise", n_windows=2, seq_len=16)
    assert smoothed["fp_calib_nll"] == pytest.approx(plain["fp_calib_nll"], abs=1e-5)


# ---- the generic walk ----------------------------------------------------------------------------------------------


def test_generic_walk_agrees_with_the_adapters(case):
    model = build(case)
    ad, walked = arch.adapter(model), arch.generic_adapter(model, warn=False)
    for field in ("blocks", "linears", "embeddings", "head", "final_norm"):
        assert getattr(walked, field) == getattr(ad, field), field
    assert int(getattr(model.config, walked.hidden_size_attr)) == arch.hidden_size(model)


def _gpt_neo():
    cfg = tf.GPTNeoConfig(hidden_size=H, num_layers=L, num_heads=NH, attention_types=[[["global", "local"], 1]],
                          window_size=8, max_position_embeddings=128, vocab_size=VOCAB, bos_token_id=1,
                          eos_token_id=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.GPTNeoForCausalLM(cfg).eval()


def test_generic_fallback_walks_an_unknown_type(windows, stream):
    model = _gpt_neo()  # no adapter for gpt_neo
    with pytest.warns(arch.GenericArchitectureWarning, match=r"'gpt_neo'.*'transformer\.h'.*6 linears per block in "
                                                             r"forward order"):
        ad = arch.adapter(model)
    # forward order, not module order (GPT-Neo registers k, v, q but runs q, k, v)
    assert ad.linears == ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj",
                          "attn.attention.out_proj", "mlp.c_fc", "mlp.c_proj")
    assert ad.final_norm == "transformer.ln_f" and ad.embeddings == ("transformer.wte", "transformer.wpe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model: the walk is cached on it
        arch.adapter(model)
        report = quantize_model(model, Recipe("int4"), stream, progress=False)
    assert len(report.layers) == len(_tree_linears(model))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt_neo' has no adapter"):
        quantize_model(model, Recipe("int4", smoothquant_alpha=0.5, calib_samples=4, calib_seq_len=16), stream,
                       progress=False)
    fp = _gpt_neo()
    with pytest.warns(arch.GenericArchitectureWarning):
        inputs = arch.capture_block_inputs(fp, windows, batch_size=4)
    h = inputs.hidden
    with torch.no_grad():
        for block in arch.blocks(fp):
            h = arch.run_block(block, arch.BlockInputs(h, inputs.kwargs), batch_size=4)
        torch.testing.assert_close(arch.logits(fp, h), _logits(fp, windows), rtol=0, atol=1e-5)


class _ToyBlock(nn.Module):
    def __init__(self, three_d: bool = False):
        super().__init__()
        self.second = nn.Linear(8, 8)
        self.first = nn.Linear(8, 8)
        if three_d:
            self.experts = nn.Parameter(torch.zeros(2, 8, 8))


class _Toy(nn.Module):
    """A model whose forward fails: the walk falls back to module order."""

    def __init__(self, three_d: bool = False):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="toy", hidden_size=8, vocab_size=10)
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([_ToyBlock(three_d) for _ in range(3)])
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 10)

    def get_output_embeddings(self):
        return self.out

    def forward(self, ids):
        raise RuntimeError("no forward")


def test_generic_walk_falls_back_to_module_order():
    with pytest.warns(arch.GenericArchitectureWarning, match="'toy'.*module order"):
        ad = arch.adapter(_Toy())
    assert (ad.blocks, ad.linears, ad.final_norm, ad.head) == ("layers", ("second", "first"), "norm", "out")


def test_mixture_of_experts_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="3-D weights"):
        arch.adapter(_Toy(three_d=True))
    cfg = tf.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=2, vocab_size=VOCAB)
    with pytest.raises(UnsupportedArchitectureError, match="'mixtral'.*mixture-of-experts.*supported families: "
                                                           "llama, opt, gpt2, gpt_neox"):
        arch.adapter(tf.MixtralForCausalLM(cfg))


def test_unknown_layout_of_a_known_type_is_refused():
    model = build("falcon-new")
    model.config.parallel_attn = False  # a layout the table does not list
    with pytest.raises(UnsupportedArchitectureError, match="'falcon' with .*parallel_attn=False.*matches none"):
        arch.adapter(model)


# ---- the CLI -------------------------------------------------------------------------------------------------------


def test_zoo_list_architectures(capsys):
    assert main(["zoo", "list", "--architectures"]) == 0
    text = capsys.readouterr().out
    for model_type in arch.SUPPORTED_FAMILIES:
        assert model_type in text
    assert main(["zoo", "list", "--architectures", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_type = {}
    for row in rows:
        by_type.setdefault(row["model_type"], []).append(row)
    assert set(by_type) == set(arch.SUPPORTED_FAMILIES)
    assert [r["smoothquant"] for r in by_type["olmo2"]] == [False] and "post-norm" in by_type["olmo2"][0][
        "smoothquant_note"]
    assert by_type["phi3"][0]["fused_projections"] == ["self_attn.qkv_proj", "mlp.gate_up_proj"]
    assert by_type["gptj"][0]["parallel_block"] and by_type["gemma"][0]["norm"] == "x_hat*(1+w)"
