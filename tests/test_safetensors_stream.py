"""Safetensors written tensor by tensor and read mapped: byte for byte what the safetensors library writes, and the
same tensors it reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantpredict.errors import ModelError
from quantpredict.safetensors_stream import (
    SAFETENSORS_DTYPES,
    TensorSpec,
    file_order,
    mapped_tensors,
    write_streamed,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.1.mlp.down_proj.weight": torch.randn(5, 7, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(3, 7, generator=g),
        "model.norm.weight": torch.randn(7, generator=g).bfloat16(),
        "model.embed_tokens.weight": torch.randn(11, 7, generator=g).half(),
        "lm_head.bias": torch.randn(3, generator=g).double(),
        "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flags": torch.tensor([True, False, True]),
        "small": torch.arange(5, dtype=torch.int16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "é-name": torch.ones(2, dtype=torch.uint8),
    }


def _specs(tensors):
    return {k: TensorSpec(SAFETENSORS_DTYPES[t.dtype], tuple(t.shape)) for k, t in tensors.items()}


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_streamed_file_is_byte_identical_to_save_file(tmp_path, metadata):
    tensors = _tensors()
    save_file(tensors, tmp_path / "lib.safetensors", metadata=metadata)
    specs = _specs(tensors)
    write_streamed(tmp_path / "ours.safetensors", specs, ((k, tensors[k]) for k in file_order(specs)), metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_mapped_tensors_read_what_the_library_reads_and_never_write_the_file(tmp_path):
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    before = path.read_bytes()
    mapped, loaded = mapped_tensors(path), load_file(path)
    assert mapped.keys() == loaded.keys()
    for k in loaded:
        assert mapped[k].dtype == loaded[k].dtype and mapped[k].shape == loaded[k].shape, k
        assert torch.equal(mapped[k], loaded[k]), k
    mapped["model.norm.weight"].fill_(7)  # copy-on-write: the file keeps its bytes
    assert path.read_bytes() == before


def test_out_of_order_missing_or_mismatched_tensors_are_refused(tmp_path):
    tensors = _tensors()
    specs = _specs(tensors)
    order = file_order(specs)
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="out of order"):
        write_streamed(out, specs, ((k, tensors[k]) for k in reversed(order)))
    with pytest.raises(ValueError, match="not written"):
        write_streamed(out, specs, ((k, tensors[k]) for k in order[:-1]))
    with pytest.raises(ValueError, match="header says"):
        write_streamed(out, specs, ((k, tensors[k].float() if k == order[0] else tensors[k]) for k in order))
    with pytest.raises(ValueError, match="unknown safetensors dtype"):
        file_order({"a": TensorSpec("F4", (2,))})


def test_a_damaged_file_is_a_model_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelError, match="truncated"):
        mapped_tensors(path)
