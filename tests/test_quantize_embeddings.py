"""Recipes that quantize the token embedding and the LM head (``embedding_format`` / ``head_format``, labels ``E=`` /
``H=``): as llama.cpp's files store ``token_embd`` and ``output``, each row rounded on its own."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from quantpredict import arch, quantize
from quantpredict.errors import FormatError, RecipeError
from quantpredict.formats import fake_quantize
from quantpredict.quantize.plan import embedding_and_head_plan, keeps_head_and_embeddings
from quantpredict.recipe import Recipe


def test_label_and_dict_round_trip_and_old_dicts_unchanged():
    r = Recipe("q8_0", embedding_format="q8_0", head_format="int8")
    assert r.label == "q8_0-rtn-E=q8_0-H=int8"
    assert Recipe.from_label(r.label) == r and Recipe.from_dict(r.to_dict()) == r
    plain = Recipe("q8_0").to_dict()
    assert "embedding_format" not in plain and "head_format" not in plain  # run keys of older recipes unchanged
    with pytest.raises(FormatError):
        Recipe("q8_0", head_format="q9_9")
    with pytest.raises(RecipeError, match="format name"):
        Recipe("q8_0", embedding_format="skip")


def test_untied_embedding_and_head_rounded_as_their_formats_and_counted_in_the_size():
    model = tiny_model("llama")
    emb, head = arch.embedding_modules(model)[0].weight, arch.head(model).weight
    assert emb is not head
    want_e, want_h = fake_quantize(emb.detach().clone(), "q8_0"), fake_quantize(head.detach().clone(), "int8")
    plain = copy.deepcopy(model)
    recipe = Recipe("int4", embedding_format="q8_0", head_format="int8")
    assert not keeps_head_and_embeddings(model, recipe) and keeps_head_and_embeddings(model, Recipe("int4"))
    rep = quantize.quantize_model(model, recipe, None, progress=False)
    ref = quantize.quantize_model(plain, Recipe("int4"), None, progress=False)
    assert torch.equal(emb, want_e) and torch.equal(head, want_h)
    for a, b in zip(arch.linear_layers(model), arch.linear_layers(plain), strict=True):
        assert torch.equal(a.weight, b.weight)  # the linears exactly as without E= / H=
    assert [(m.role, m.weight_format) for m in rep.matrices] == [("embedding", "q8_0"), ("head", "int8")]
    assert all(0 < m.rel_weight_error < 0.05 for m in rep.matrices)
    n = emb.numel()
    # q8_0: 8.5 bits, int8 per row: 8 + 16 / row bits, against 16 bits each before
    saved = n * (16 - 8.5) / 8 + n * (16 - 8 - 16 / emb.shape[1]) / 8
    assert rep.size_bytes == pytest.approx(ref.size_bytes - saved)
    assert rep.summary()["matrices"][0]["role"] == "embedding" and "matrices" not in ref.summary()


def test_a_tied_matrix_takes_one_format_and_is_rounded_once():
    model = tiny_model("gpt2")
    w = arch.embedding_modules(model)[0].weight
    assert w is arch.head(model).weight
    with pytest.raises(RecipeError, match="ties"):
        embedding_and_head_plan(model, Recipe("int4", embedding_format="q8_0", head_format="int8"))
    want = fake_quantize(w.detach().clone(), "q8_0")
    rep = quantize.quantize_model(model, Recipe("int4", head_format="q8_0"), None, progress=False)
    assert torch.equal(w, want)  # once: rounding q8_0 twice would give the same here, so check the report too
    assert [(m.role, m.weight_format) for m in rep.matrices] == [("embedding+head", "q8_0")]


def test_a_format_the_rows_do_not_fit_changes_nothing():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FormatError, match="256"):
        quantize.quantize_model(model, Recipe("int4", embedding_format="q8_0", head_format="q4_k"), None,
                                progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_file_mixes_take_llama_quantizes_embedding_and_head_types(monkeypatch):
    """``q4_k_m-file``: llama_tensor_get_type's output and token_embd rules. The 1.5B model's (untied, rows of 1536)
    are in reports/llamacpp.md's dry-run table: output Q6_K and token_embd Q4_K / Q5_K / Q3_K / Q6_K / IQ4_XS for
    Q4_K_M / Q5_K_M / Q3_K_M / Q6_K / IQ4_XS; a tied model with rows of 576 (SmolLM2) has token_embd Q8_0."""
    from types import SimpleNamespace

    from quantpredict.mixes import file_roles, is_file_spec, mix_of, named_mix

    def fake(hidden, tied, family="llama"):
        emb = torch.nn.Embedding(8, hidden)
        head = torch.nn.Linear(hidden, 8, bias=False)
        if tied:
            head.weight = emb.weight
        return SimpleNamespace(emb=emb, head=head, family=family)

    import quantpredict.arch as arch_mod

    def roles(mix, m):
        with monkeypatch.context() as mp:
            mp.setattr(arch_mod, "embedding_modules", lambda _: [m.emb])
            mp.setattr(arch_mod, "head", lambda _: m.head)
            mp.setattr(arch_mod, "family", lambda _: m.family)
            mp.setattr(arch_mod, "head_is_tied", lambda _: m.head.weight is m.emb.weight)
            return file_roles(mix, m)

    qwen = fake(1536, False)
    want = {"q4_k_m": ("q4_k", "q6_k"), "q5_k_m": ("q5_k", "q6_k"), "q3_k_m": ("q3_k", "q6_k"),
            "q6_k_pure": ("q6_k", "q6_k"), "iq4_xs_mix": ("iq4_xs", "q6_k")}
    for mix, pair in want.items():
        assert roles(mix, qwen) == pair, mix
    assert roles("q4_k_m", fake(576, True)) == (None, "q8_0")  # SmolLM2: rows not a multiple of 256
    assert roles("q4_k_m", fake(1536, False, "falcon")) == ("q4_k", "q8_0")
    assert roles("q4_k_pure", fake(576, False)) == ("q5_0", "q5_0")  # --pure: one type, with the fallback
    model = tiny_model("llama", hidden=256)  # untied, rows of 256: the K-quants fit
    r = named_mix("q4_k_m-file", model)
    assert (r.embedding_format, r.head_format) == ("q4_k", "q6_k") and r.label.endswith("-E=q4_k-H=q6_k")
    assert is_file_spec("q4_k_m-gptq-file") and not is_file_spec("q4_k_m")
    assert mix_of(r, model) == "q4_k_m-file" and mix_of(named_mix("q4_k_m", model), model) == "q4_k_m"
    assert named_mix("q4_k_m", model).embedding_format is None


def test_head_is_tied_by_the_parameter_or_its_storage():
    """One test of tying for the plan, the file mixes and export: the shared Parameter (Hugging Face), or two
    Parameters over one storage."""
    assert arch.head_is_tied(tiny_model("gpt2")) and not arch.head_is_tied(tiny_model("llama"))
    model = tiny_model("llama")
    emb = arch.embedding_modules(model)[0]
    arch.head(model).weight = torch.nn.Parameter(emb.weight.data)  # another Parameter, the same storage
    assert arch.head_is_tied(model)


def test_rank_and_predict_price_the_embedding_and_head(monkeypatch):
    """A recipe with H= is the linear layers' price plus the matrix's terms (a tied zoo model: both terms), the same
    in rank and predict; the statistics are measured once and then read from the profile's cache entry."""
    from quantpredict.features import embedding_head
    from quantpredict.predict.profile_cache import EMBEDDING_HEAD_FILE
    from quantpredict.predict.quality import HOW_PROFILE, predict_quality
    from quantpredict.predict.rank import profile_model, rank_recipes

    labels = ["int4-rtn", "int4-rtn-H=q8_0", "int4-rtn-H=int4"]
    ranked = rank_recipes("llama-xs", labels).set_index("recipe")
    plain = ranked.loc["int4-rtn"]
    assert plain["embedding_quad"] == 0.0 and plain["head_quad"] == 0.0
    for label in labels[1:]:
        row = ranked.loc[label]
        assert row["embedding_quad"] > 0 and row["head_quad"] > 0  # tied: one matrix, both terms
        assert row["token_gn_quad"] == pytest.approx(
            plain["token_gn_quad"] + row["embedding_quad"] + row["head_quad"], rel=1e-12)
        assert row["kld"] > plain["kld"] and row["size_bytes"] < plain["size_bytes"]
    assert ranked.loc["int4-rtn-H=int4", "head_quad"] > 10 * ranked.loc["int4-rtn-H=q8_0", "head_quad"]
    mp = profile_model("llama-xs")
    assert (mp.cache_dir / EMBEDDING_HEAD_FILE).is_file()

    def measured_again(*a, **k):
        raise AssertionError("the statistics were measured again instead of read from the cache")

    monkeypatch.setattr(embedding_head, "measure_embedding_head", measured_again)
    pr = predict_quality("llama-xs", "int4-rtn-H=q8_0")
    assert pr.how == HOW_PROFILE and pr.note == "" and pr.kld == float(ranked.loc["int4-rtn-H=q8_0", "kld"])


def test_a_measuring_predictor_hands_embedding_and_head_recipes_to_the_profile_path():
    from quantpredict.predict.quality import HOW_PROFILE, predict_quality

    pr = predict_quality("llama-xs", "int4-rtn-H=q8_0", predictor="physics")
    assert pr.how == HOW_PROFILE and pr.predictor_kind == "profile" and "priced from the weights" in pr.note
    with pytest.raises(RecipeError, match="does not price QAT or AWQ with activation quantization"):
        predict_quality("llama-xs", "int4-rtn-awq-a_mxint8-H=q8_0")
    both = predict_quality("llama-xs", "int4-rtn-awq-H=q8_0")  # AWQ and the matrices, both from the weights
    assert both.how == HOW_PROFILE and both.kld > predict_quality("llama-xs", "int4-rtn-awq").kld


def test_rank_prices_for_llama_perplexity_protocol_from_a_profile_of_its_own(tiny_hf_dir):
    from quantpredict.errors import PredictorError
    from quantpredict.predict.rank import profile_model, rank_recipes

    labels = ["int4-rtn", "int4-rtn-H=q8_0"]
    project = rank_recipes("llama-xs", labels).set_index("recipe")
    llama = rank_recipes("llama-xs", labels, protocol="llama.cpp")
    assert llama.attrs["protocol"] == "llama.cpp"
    llama = llama.set_index("recipe")
    mp = profile_model("llama-xs", seq_len=512, scored_from=257)
    assert mp.cached and mp.profile.meta["scored_from"] == 257 and mp.cache_dir != profile_model("llama-xs").cache_dir
    for label in labels:
        assert llama.loc[label, "token_gn_quad"] != project.loc[label, "token_gn_quad"]
    assert llama.loc["int4-rtn-H=q8_0", "head_quad"] > 0
    with pytest.raises(PredictorError, match="known protocols: project, llama.cpp"):
        rank_recipes("llama-xs", labels, protocol="llama")
    with pytest.raises(PredictorError, match="context is 128 positions"):
        rank_recipes(str(tiny_hf_dir), labels, protocol="llama.cpp")


def test_the_cli_offers_the_protocols_rank_knows():
    from quantpredict.cli import build_parser
    from quantpredict.predict.rank import PROTOCOLS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    rank = sub.choices["rank"]
    assert next(a for a in rank._actions if a.dest == "protocol").choices == list(PROTOCOLS)
