"""Shared fixtures: tiny randomly initialised models of every supported family (no downloads, seconds to build)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB = 128


def tiny_model(family: str, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0):
    """A tiny causal LM of ``family`` with eager attention (second derivatives work through it)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128, **common)
        cls = LlamaForCausalLM
    elif family == "opt":
        cfg = OPTConfig(hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        max_position_embeddings=128, word_embed_proj_dim=hidden, **common)
        cls = OPTForCausalLM
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128, **common)
        cls = GPT2LMHeadModel
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=128, rotary_pct=0.5, **common)
        cls = GPTNeoXForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    return model


FAMILIES = ("llama", "opt", "gpt2", "gpt_neox")


@pytest.fixture(params=FAMILIES)
def any_family(request):
    return request.param


@pytest.fixture
def token_windows():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (6, 24), generator=g)
