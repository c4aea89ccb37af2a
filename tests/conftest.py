"""Shared fixtures: tiny randomly initialised models of every supported family (no downloads, seconds to build)."""

from __future__ import annotations

import os

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

VOCAB = 320


@pytest.fixture(autouse=True, scope="session")
def _profile_cache_in_a_temporary_folder(tmp_path_factory):
    """Profiles measured by the tests (rank, allocate) are cached in a folder of this session, not the user's."""
    old = os.environ.get("QUANTPREDICT_PROFILES")
    os.environ["QUANTPREDICT_PROFILES"] = str(tmp_path_factory.mktemp("profiles"))
    yield
    if old is None:
        os.environ.pop("QUANTPREDICT_PROFILES", None)
    else:
        os.environ["QUANTPREDICT_PROFILES"] = old


def pytest_configure(config):
    """``QUANTPREDICT_TEST_THREADS=n`` runs the session with ``n`` torch intra-op threads (float32 sums follow the
    thread count; benchmarks/recorded_matrix.py runs the recorded tests under 1 and 2)."""
    threads = os.environ.get("QUANTPREDICT_TEST_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


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
def float32_prices(monkeypatch):
    """The token-wise price's products in float32 on any CPU (``features.fisher.price_dtype``), for the tests that
    compare a price with a float64 hand computation to float32's precision; the bfloat16 products that CPUs with
    native bfloat16 get by default are checked against their own error bound (tests/test_price_dtype.py)."""
    from quantpredict.features import fisher

    monkeypatch.setattr(fisher, "price_dtype", lambda device_type="cpu": torch.float32)


@pytest.fixture
def token_windows():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (6, 24), generator=g)


def tiny_tokenizer():
    """A byte-level BPE tokenizer with a vocabulary of ``VOCAB`` trained on a slice of WikiText-2 train (offline)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from quantpredict.data import load_text

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([load_text("wikitext2", "train")[:200_000]], vocab_size=VOCAB, min_frequency=2,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_hf_dir(tmp_path, tokenizer):
    """A tiny Llama and its tokenizer saved as a Hugging Face model directory."""
    model = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
