"""Safetensors written tensor by tensor and read mapped: byte for byte what the safetensors library writes, and the
same tensors it reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantpredict.errors import ModelError
from quantpredict.safetensors_stream import (
    NUMPY_DTYPES,
    SAFETENSORS_DTYPES,
    TensorSpec,
    file_order,
    from_float32,
    mapped_arrays,
    mapped_tensors,
    to_float32,
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


def test_numpy_arrays_round_trip_byte_for_byte(tmp_path):
    """The torch-free forms: a file's :func:`mapped_arrays` (bf16 and float8 as raw bits) written back by
    :func:`write_streamed` is the same file, and an array of another dtype than its spec's is refused."""
    tensors = _tensors()
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    specs, arrays = mapped_arrays(tmp_path / "lib.safetensors")
    assert specs == _specs(tensors)
    assert all(arrays[k].dtype == NUMPY_DTYPES[specs[k].dtype] for k in specs)
    write_streamed(tmp_path / "ours.safetensors", specs, ((k, arrays[k]) for k in file_order(specs)),
                   {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    first = file_order(specs)[0]
    with pytest.raises(ValueError, match="header says"):
        write_streamed(tmp_path / "x.safetensors", specs, ((k, arrays[k].astype(np.complex64) if k == first
                                                             else arrays[k]) for k in file_order(specs)))


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


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32")])
def test_float32_conversions_are_torchs_bit_for_bit(dtype, name):
    """``from_float32`` rounds as torch's ``.to(dtype)`` does (nearest, ties to even, overflow to Inf) and
    ``to_float32`` widens as ``.float()`` does, on values spread over float32's whole range, exact ties between two
    representable values, both zeros, the subnormals and the infinities."""
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(200_000, generator=g) * torch.exp(torch.randn(200_000, generator=g) * 20)
    ulp = 2.0 ** -8  # bfloat16's spacing above 1; fp16's is 2^-10
    ties = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11])
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38, 3.4028235e38, -3.4028235e38, 1e-45,
                          -1e-45, 1.17e-38, 65504.0, 65520.0, -65520.0, 6e-8, 3e-8])
    x = torch.cat([spread, ties, edges])
    with np.errstate(over="ignore"):  # fp16 overflows to Inf, as torch's does
        ours = from_float32(x.numpy(), name)
    theirs = x.to(dtype)
    assert ours.dtype == NUMPY_DTYPES[name]
    assert np.array_equal(ours.view(np.uint8), theirs.view(torch.uint8).numpy())
    widened = to_float32(ours, name)
    assert widened.dtype == np.float32
    assert np.array_equal(widened.view(np.uint32), theirs.float().numpy().view(np.uint32))
