"""llama.cpp's named mixes as per-layer recipes: the layer rules, the shape fallback, recipe text, and use."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from quantpredict import arch, mixes
from quantpredict.errors import RecipeError
from quantpredict.quantize import Recipe, layer_plan, quantize_model, size_report

VOCAB = 320


def _llama(hidden: int, inter: int, layers: int):
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, vocab_size=VOCAB)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


def _formats_by_role(model, recipe):
    out: dict[tuple[str, int], str] = {}
    for p in layer_plan(model, recipe):
        role = p.ref.name.rsplit(".", 1)[-1]
        out[(role, p.ref.block_index)] = p.weight_format
    return out


def test_use_more_bits_by_hand():
    # llama.cpp: i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2, integer division
    assert [i for i in range(32) if mixes.use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29,
                                                                    30, 31]
    assert [i for i in range(30) if mixes.use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(4) if mixes.use_more_bits(i, 4)] == [2, 3]
    assert [i for i in range(8) if mixes.use_more_bits(i, 8)] == [0, 3, 6, 7]


def test_q4_k_m_and_friends_on_a_k_quant_compatible_model():
    model = _llama(256, 512, 8)  # every row a multiple of 256: no fallback
    more = {0, 3, 6, 7}
    f = _formats_by_role(model, mixes.named_mix("q4_k_m", model))
    for i in range(8):
        assert f[("v_proj", i)] == f[("down_proj", i)] == ("q6_k" if i in more else "q4_k")
        assert {f[(r, i)] for r in ("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj")} == {"q4_k"}
    f = _formats_by_role(model, mixes.named_mix("q5_k_m", model))
    assert [f[("v_proj", i)] for i in range(8)] == ["q6_k" if i in more else "q5_k" for i in range(8)]
    assert f[("q_proj", 0)] == "q5_k"
    f = _formats_by_role(model, mixes.named_mix("q4_k_s", model))
    assert [f[("v_proj", i)] for i in range(8)] == ["q5_k"] * 4 + ["q4_k"] * 4
    assert [f[("down_proj", i)] for i in range(8)] == ["q5_k"] + ["q4_k"] * 7  # i < 8 // 8
    assert set(_formats_by_role(model, mixes.named_mix("q6_k_pure", model)).values()) == {"q6_k"}
    # the size is the elements-weighted mean of 4.5 (q4_k) and 6.5625 (q6_k) bits
    r = mixes.named_mix("q4_k_m", model)
    plan = layer_plan(model, r)
    n6 = sum(p.ref.weight.numel() for p in plan if p.weight_format == "q6_k")
    n = sum(p.ref.weight.numel() for p in plan)
    assert size_report(model, r)["effective_bits_per_param"] == pytest.approx((6.5625 * n6 + 4.5 * (n - n6)) / n)


def test_llama_cpp_shape_fallback():
    assert mixes.fallback("q4_k", 512) == "q4_k" and mixes.fallback("q4_k", 192) == "q5_0"
    assert mixes.fallback("q5_k", 64) == "q5_1" and mixes.fallback("q6_k", 96) == "q8_0"
    assert mixes.fallback("q4_k", 80) == "fp16" and mixes.fallback("q8_0", 80) == "q8_0"
    model = _llama(64, 80, 4)  # hidden 64: Q5_0 for Q4_K; intermediate 80 (not a multiple of 32): F16
    f = _formats_by_role(model, mixes.named_mix("q4_k_m", model))
    assert f[("down_proj", 0)] == "fp16" and f[("q_proj", 0)] == "q5_0"
    assert f[("v_proj", 3)] == "q8_0"  # wanted q6_k (use_more_bits(3, 4)), rows of 64: Q8_0


def test_falcon_ffn_down_rule_and_fused_qkv():
    slots = [mixes.Slot(f"h.{i}.mlp.dense_4h_to_h", "ffn_down", i, 256) for i in range(32)]
    falcon = mixes.mix_formats("q4_k_m", slots, "falcon")
    assert falcon[:2] == ["q6_k", "q6_k"] and falcon[2] == "q5_k" and falcon[4] == "q4_k" and falcon[6] == "q5_k"
    assert mixes.mix_formats("q4_k_m", slots, "llama")[4] == "q4_k"
    assert mixes.mix_formats("q4_k_s", slots, "falcon") == ["q4_k"] * 32  # not Falcon's ffn_down
    # a fused q/k/v takes the attn_v rule (llama.cpp's category_is_attn_v)
    qkv = [mixes.Slot(f"h.{i}.attn.c_attn", "attn_qkv", i, 256) for i in range(4)]
    assert mixes.mix_formats("q4_k_m", qkv) == ["q4_k", "q4_k", "q6_k", "q6_k"]


def test_every_adapter_linear_has_a_role():
    for model_type, rows in arch._ADAPTERS.items():
        for ad in rows:
            roles = [mixes.tensor_role(p) for p in ad.linears]
            assert "other" not in roles, (model_type, dict(zip(ad.linears, roles)))
            assert sum(r in mixes.ATTN_V_LIKE for r in roles) == 1, model_type
            assert roles.count("ffn_down") == 1, model_type
    assert mixes.tensor_role("attn.c_proj") == "attn_output" and mixes.tensor_role("mlp.c_proj") == "ffn_down"


def test_recipe_text_and_round_trips():
    model = _llama(64, 128, 2)
    r = mixes.named_mix("q4_k_m-gptq-awq", model)
    assert r.method == "gptq" and r.awq and r.weight_format == "q4_k"
    assert Recipe.from_label(r.label) == r
    assert mixes.mix_of(r, model) == "q4_k_m-gptq-awq"
    assert mixes.mix_of(mixes.named_mix("q5_k_s", model), model) == "q5_k_s"
    assert mixes.mix_of(Recipe("q4_k"), model) is None
    assert mixes.resolve_recipe("uint4-gptq", model) == Recipe("uint4", method="gptq")
    assert mixes.named_mix("q4_k_m", model, base=Recipe("int8", method="gptq", calib_samples=4)).calib_samples == 4
    assert mixes.is_mix_spec("q4_k_m") and mixes.is_mix_spec("Q4_K_M-gptq") and not mixes.is_mix_spec("q4_k-rtn")
    with pytest.raises(RecipeError, match="named mixes: q4_k_s, q4_k_m"):
        mixes.named_mix("q3_k_xl", model)
    with pytest.raises(RecipeError, match="sets every layer's format"):
        mixes.is_mix_spec("q4_k_m-L=q4_k*14")


def test_a_mix_quantizes_on_the_formats_it_names():
    model = _llama(64, 80, 2)
    recipe = mixes.named_mix("q4_k_m-gptq-cal4x16", model)
    stream = torch.randint(3, VOCAB, (600,), generator=torch.Generator().manual_seed(0))
    before = {r.name: r.weight.detach().clone() for r in arch.linear_layers(model)}
    report = quantize_model(model, recipe, stream, progress=False)
    assert len(report.layers) == len(before) and report.recipe_label == recipe.label
    for ref in arch.linear_layers(model):
        w = ref.weight.detach()
        assert not torch.equal(w, before[ref.name]), ref.name
        if ref.name.endswith("down_proj"):  # fp16: the weights cast to half precision, nothing else
            assert torch.equal(w, w.half().float()) and (w - before[ref.name]).abs().max() < 1e-2


# ---- rank and allocate with mixes ---------------------------------------------------------------------------------


class _StubPredictor:
    """A 'profile' predictor whose KLD is the summed token-wise price (what the shipped one is fitted on)."""

    kind = "profile"

    def predict(self, frame):
        import pandas as pd

        k = frame["token_gn_quad"].to_numpy(float)
        return pd.DataFrame({"kld": k, "kld_low": 0.5 * k, "kld_high": 2 * k, "delta_nll": k, "ppl": 10 + k,
                             "ppl_low": 10 + k / 2, "ppl_high": 10 + 2 * k, "top1": 1 - k}, index=frame.index)


@pytest.fixture
def stub_predictor(monkeypatch):
    import quantpredict.predict.quality as quality

    monkeypatch.setattr(quality, "resolve_predictor", lambda p: _StubPredictor())


def test_solve_budget_skips_layouts_a_layer_cannot_store():
    import numpy as np

    from quantpredict.predict.allocate import solve_budget

    cost = np.array([[1.0, 0.1], [np.inf, 0.2], [2.0, 0.3]])  # layer 1 cannot take option 0
    bits = np.array([[4.0, 8.0], [np.inf, 8.0], [4.0, 8.0]])
    choice, _ = solve_budget(cost, bits, 20.0)
    assert choice[1] == 1 and bits[[0, 1, 2], choice].sum() <= 20.0
    with pytest.raises(RecipeError, match="at least one candidate"):
        solve_budget(np.full((1, 2), np.inf), np.ones((1, 2)), 10.0)


def test_rank_and_allocate_take_the_mixes(stub_predictor):
    from quantpredict.predict.allocate import allocate
    from quantpredict.predict.rank import profile_model, rank_recipes

    frame = rank_recipes("llama-l", ["q4_k_m", "q4_k_pure", "uint4-rtn"])
    assert set(frame["mix"].dropna()) == {"q4_k_m", "q4_k_pure"}
    by_mix = frame.set_index(frame["mix"].fillna(frame["recipe"]))
    assert by_mix.loc["q4_k_m", "bits_per_element"] > by_mix.loc["q4_k_pure", "bits_per_element"]
    assert by_mix.loc["q4_k_m", "token_gn_quad"] < by_mix.loc["q4_k_pure", "token_gn_quad"]
    mp = profile_model("llama-l")
    res = allocate("llama-l", match="q4_k_m", compare=["q4_k_pure"], profile=mp)
    mix = res.compared[0]
    assert mix["mix"] == "q4_k_m" and res.compared[1]["mix"] == "q4_k_pure"
    assert res.target_bits == pytest.approx(mix["bits_per_element"])
    assert res.bits_per_element <= mix["bits_per_element"] + 1e-9
    assert res.objective <= mix["objective"] * (1 + 1e-9)  # the mix is one of the allocations it searched over
    assert set(res.layers["format"]) <= {"q4_k", "q5_0", "q6_k", "q8_0"}
    # a k-quant on rows of 192 is not a choice: those layers take the candidates that fit
    assert all(f != "q4_k" for f, name in zip(res.layers["format"], res.layers["layer"]) if "down_proj" not in name)
    with pytest.raises(RecipeError, match="fits none of the candidate formats"):
        allocate("llama-l", 5.0, candidates=["q4_k", "q6_k"], profile=mp)


def test_cli_quantize_and_collect_name_mixes(tmp_path, capsys):
    import json

    from quantpredict.cli import main
    from quantpredict.models import skeleton

    out = tmp_path / "q"
    assert main(["quantize", "llama-l", "--mix", "q4_k_m", "--method", "rtn", "--calib-samples", "2",
                 "--calib-seq-len", "32", "--out", str(out)]) == 0
    saved = json.loads((out / "quantization.json").read_text())
    assert saved["label"] == mixes.named_mix("q4_k_m-cal2x32", skeleton("llama-l")).label
    capsys.readouterr()
    assert main(["collect", "--models", "llama-l", "--recipes", "q4_k_m-gptq", "uint4-rtn-awq", "--store",
                 str(tmp_path / "s.sqlite"), "--dry-run"]) == 0
    keys = capsys.readouterr().out.splitlines()
    assert any("|q4_k-gptq-L=" in k for k in keys) and any("|uint4-rtn-awq|" in k for k in keys)
    assert not (tmp_path / "s.sqlite").exists()
    assert main(["collect", "--models", "llama-l", "--recipes", "q4_k_m-@mlp.down_proj=q8_0", "--dry-run"]) != 0
    assert "sets every layer's format" in capsys.readouterr().err


def _llama_gqa(kv_heads: int, layers: int = 16):
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=kv_heads, max_position_embeddings=64, vocab_size=VOCAB)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


def test_low_bit_mixes_by_hand():
    # llama_tensor_get_type_impl (llama-cpp-python 0.3.36's llama.cpp) for a dense model of 16 layers without GQA:
    # n/16 = 1, n/8 = 2; every row 256, so no fallback
    model = _llama_gqa(kv_heads=4)
    assert mixes.gqa_ratio(model) == 1
    rest = ("q_proj", "k_proj", "gate_proj", "up_proj")
    f = _formats_by_role(model, mixes.named_mix("q3_k_m", model))
    assert [f[("v_proj", i)] for i in range(16)] == ["q5_k"] * 2 + ["q4_k"] * 14  # i_attention_wv < 2
    assert [f[("down_proj", i)] for i in range(16)] == ["q5_k"] + ["q4_k"] * 15  # not Falcon: Q4_K from n/16 on
    assert {f[("o_proj", i)] for i in range(16)} == {"q4_k"}
    assert {f[(r, i)] for r in rest for i in range(16)} == {"q3_k"}
    f = _formats_by_role(model, mixes.named_mix("q3_k_l", model))
    assert {f[(r, i)] for r in ("v_proj", "down_proj", "o_proj") for i in range(16)} == {"q5_k"}
    assert {f[(r, i)] for r in rest for i in range(16)} == {"q3_k"}
    assert set(_formats_by_role(model, mixes.named_mix("q3_k_s", model)).values()) == {"q3_k"}
    f = _formats_by_role(model, mixes.named_mix("q2_k_mix", model))
    assert {f[(r, i)] for r in ("v_proj", "down_proj", "o_proj") for i in range(16)} == {"q3_k"}
    assert {f[(r, i)] for r in rest for i in range(16)} == {"q2_k"}
    f = _formats_by_role(model, mixes.named_mix("iq4_xs_mix", model))
    assert [f[("down_proj", i)] for i in range(16)] == ["q5_k"] * 2 + ["iq4_xs"] * 14  # i < n/8, no imatrix
    assert {f[(r, i)] for r in (*rest, "v_proj", "o_proj") for i in range(16)} == {"iq4_xs"}
    # GQA with 4 query heads per key/value head: attn_v gets Q4_K in Q2_K and Q5_K in IQ4_XS
    gqa = _llama_gqa(kv_heads=1, layers=2)
    assert mixes.gqa_ratio(gqa) == 4
    assert _formats_by_role(gqa, mixes.named_mix("q2_k_mix", gqa))[("v_proj", 1)] == "q4_k"
    assert _formats_by_role(gqa, mixes.named_mix("iq4_xs_mix", gqa))[("v_proj", 1)] == "q5_k"
    # the size of q3_k_s is Q3_K's 3.4375 bits everywhere
    assert size_report(model, mixes.named_mix("q3_k_s", model))["effective_bits_per_param"] == pytest.approx(3.4375)


def test_low_bit_mixes_falcon_and_fallback():
    down = [mixes.Slot(f"h.{i}.mlp.dense_4h_to_h", "ffn_down", i, 256) for i in range(16)]
    out = [mixes.Slot(f"h.{i}.self_attention.dense", "attn_output", i, 256) for i in range(16)]
    more = [i for i in range(16) if mixes.use_more_bits(i, 16)]
    assert mixes.mix_formats("q3_k_m", down, "falcon") == ["q5_k"] + [
        "q4_k" if i in more else "q3_k" for i in range(1, 16)]
    assert set(mixes.mix_formats("q3_k_m", out, "falcon")) == {"q3_k"}
    assert set(mixes.mix_formats("q3_k_l", down + out, "falcon")) == {"q4_k"}
    assert set(mixes.mix_formats("q2_k_mix", out, "falcon")) == {"q2_k"}
    # llama.cpp's fallback: Q3_K / Q2_K -> Q4_0, IQ4_XS -> IQ4_NL, F16 where 32 does not tile a row either
    assert mixes.fallback("q3_k", 288) == mixes.fallback("q2_k", 288) == "q4_0"
    assert mixes.fallback("iq4_xs", 288) == "iq4_nl" and mixes.fallback("iq4_xs", 80) == "fp16"
    model = _llama(64, 128, 2)  # rows of 64 and 128: every low-bit type falls back
    f = _formats_by_role(model, mixes.named_mix("q2_k_mix", model))
    assert f[("q_proj", 0)] == "q4_0" and f[("v_proj", 0)] == "q4_0" and f[("down_proj", 0)] == "q4_0"
    f = _formats_by_role(model, mixes.named_mix("iq4_xs_mix", model))
    assert set(f.values()) == {"iq4_nl"}  # 2 layers: n/8 = 0, no Q5_K ffn_down
    f = _formats_by_role(model, mixes.named_mix("q3_k_l", model))
    assert f[("v_proj", 0)] == "q5_1" and f[("q_proj", 0)] == "q4_0"  # Q5_K -> Q5_1, Q3_K -> Q4_0


def test_low_bit_mix_names_keep_format_labels():
    # q2_k and iq4_xs name formats: their mixes are q2_k_mix / iq4_xs_mix, so "q2_k-rtn" stays a plain recipe
    assert not mixes.is_mix_spec("q2_k-rtn") and not mixes.is_mix_spec("iq4_xs") and mixes.is_mix_spec("q2_k_mix")
    assert mixes.is_mix_spec("q3_k_m-gptq") and mixes.get_mix("Q3_K_L").ftype == "Q3_K_L"
    model = _llama_gqa(kv_heads=4, layers=2)
    r = mixes.named_mix("q3_k_m-gptq", model)
    assert r.weight_format == "q3_k" and mixes.mix_of(r, model) == "q3_k_m-gptq"
