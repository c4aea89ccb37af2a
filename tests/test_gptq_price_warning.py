"""A GPTQ recipe priced against Hessians of fewer calibration tokens than its widest layer's inputs is flagged: the
weights-only price comes out low there (reports/gptq_hessian_study.md), and the answer says so in a note."""

from __future__ import annotations

import warnings

from quantpredict.predict.rank import GPTQHessianWarning, profile_model, recipe_row
from quantpredict.recipe import Recipe


def _caught(mp, label: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe_row(mp, Recipe.from_label(label))
    return [w for w in caught if issubclass(w.category, GPTQHessianWarning)]


def test_gptq_on_too_few_calibration_tokens_is_flagged():
    few = profile_model("llama-xs", n_windows=2, seq_len=16, cache=False)  # 32 tokens
    widest = max(r.in_features for r in few.refs)
    assert widest > 32
    got = _caught(few, "mxint4-gptq")
    assert len(got) == 1 and "32 calibration tokens" in str(got[0].message)
    assert f"{widest:,} inputs" in str(got[0].message)
    assert _caught(few, "mxint4-rtn") == []  # RTN reads no Hessian


def test_gptq_on_enough_tokens_is_not_flagged():
    mp = profile_model("llama-xs")  # 8 windows of 256 tokens: 2,048, more than any of its layers' inputs
    assert max(r.in_features for r in mp.refs) <= 2048
    assert _caught(mp, "mxint4-gptq") == []


def test_predict_prints_the_note(tmp_path, tokenizer, capsys, monkeypatch):
    """The CLI turns the warning into one note under the table: a tiny Llama whose 2,304-wide MLP inputs outnumber
    its profile's 8 x 256 calibration tokens."""
    import torch
    from conftest import VOCAB
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantpredict.cli import main

    monkeypatch.setenv("QUANTPREDICT_PROFILES", str(tmp_path / "profiles"))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=2304, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=512, vocab_size=VOCAB, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    path = tmp_path / "wide"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert main(["predict", str(path), "--format", "mxint4", "--method", "gptq", "--ppl-fp", "30"]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "GPTQ is priced against Hessians" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "2,048 calibration tokens" in notes[0], out
    assert "2,304 inputs" in notes[0]
