"""A GPTQ recipe calibrated on fewer tokens than its widest layer's inputs is flagged: its Hessians are
rank-deficient, and the weights-only price comes out low there (reports/gptq_hessian_study.md); the answer says so
in a note. The price reads the Hessians of the recipe's own calibration windows, as quantize_model calibrates."""

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
    mp = profile_model("llama-xs", cache=False)
    widest = max(r.in_features for r in mp.refs)
    assert widest > 32
    got = _caught(mp, "mxint4-gptq-cal2x16")  # 2 windows of 16 tokens: 32
    assert len(got) == 1 and "calibrates on 32 tokens" in str(got[0].message)
    assert f"{widest:,} inputs" in str(got[0].message)
    assert mp.calibration_moments[(2, 16, 0)].load().tokens == 32  # priced with those 32 tokens' Hessians
    assert _caught(mp, "mxint4-rtn-cal2x16") == []  # RTN reads no Hessian


def test_gptq_on_enough_tokens_is_not_flagged():
    mp = profile_model("llama-xs")  # GPTQ's default calibration: 128 windows of 256 tokens, 32,768
    assert max(r.in_features for r in mp.refs) <= 32768
    assert _caught(mp, "mxint4-gptq") == []
    assert mp.calibration_moments[(128, 256, 0)].load().tokens == 128 * 256


def test_predict_prints_the_note(tmp_path, tokenizer, capsys, monkeypatch):
    """The CLI turns the warning into one note under the table: a tiny Llama whose 2,304-wide MLP inputs outnumber
    the recipe's calibration tokens (set to 2,048 here: the CLI's recipes calibrate on 32,768, and a layer wider
    than that would make the test's GPTQ take gigabytes)."""
    import torch
    from conftest import VOCAB
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantpredict.cli import main
    from quantpredict.predict.rank import ModelProfile

    monkeypatch.setenv("QUANTPREDICT_PROFILES", str(tmp_path / "profiles"))
    monkeypatch.setattr(ModelProfile, "calibration_tokens", lambda self, recipe: 2048)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=2304, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=512, vocab_size=VOCAB, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    path = tmp_path / "wide"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert main(["predict", str(path), "--format", "mxint4", "--method", "gptq", "--ppl-fp", "30"]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "rank-deficient Hessian" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "calibrates on 2,048 tokens" in notes[0], out
    assert "2,304 inputs" in notes[0]
