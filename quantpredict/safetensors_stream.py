"""Safetensors files read and written one tensor at a time: the stored tensors mapped without a copy, and a file
written header first and then tensor by tensor, byte for byte what ``safetensors.torch.save_file`` writes.

Why: ``save_file`` takes every tensor at once and serializes them into one buffer before writing; a 1.5B model's
float32 checkpoint (7 GB) was then held twice besides the source, and the copies cost seconds of the direct RTN
path's time (:mod:`quantpredict.checkpoint_rtn`). Here the source pages are mapped (copy-on-write, so a tensor
handed out is writable and the file never changes) and each output tensor is written as soon as it exists.

The layout is the safetensors format (an 8-byte little-endian header length, a JSON header padded with spaces to
a multiple of 8 bytes, then the data) in the library's own order: dtypes from the widest enum value down, names in
order within a dtype (safetensors 0.4-0.8 ``prepare``). ``tests/test_safetensors_stream.py`` checks the bytes
against ``save_file``.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

#: safetensors' dtype names in the order of its ``Dtype`` enum (its files sort tensors by this, descending)
DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
               "I64", "U64")
TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
                "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
                "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
                "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file to be written: its safetensors ``dtype`` name and ``shape``."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = TORCH_DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


def file_order(specs: Mapping[str, TensorSpec]) -> list[str]:
    """The names of ``specs`` in the order ``save_file`` lays them out; a ``ValueError`` for a dtype it does not
    know."""
    unknown = sorted({s.dtype for s in specs.values()} - set(DTYPE_ORDER))
    if unknown:
        raise ValueError(f"unknown safetensors dtype(s) {', '.join(unknown)}")
    return sorted(specs, key=lambda k: (-DTYPE_ORDER.index(specs[k].dtype), k))


def header_bytes(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length and the padded JSON header of a file holding ``specs`` in :func:`file_order`."""
    table: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name in file_order(specs):
        spec = specs[name]
        table[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_streamed(path: str | Path, specs: Mapping[str, TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]],
                   metadata: Mapping[str, str] | None = None) -> None:
    """Write the safetensors file ``path``: the header of ``specs``, then each tensor of ``tensors`` (``(name,
    tensor)`` pairs, CPU, in :func:`file_order`) as it comes. A tensor out of order or unlike its spec is a
    ``ValueError``, and so is a missing one (the file is then incomplete: write it into a staged folder)."""
    order = file_order(specs)
    with open(path, "wb") as fh:
        fh.write(header_bytes(specs, metadata))
        done = 0
        for name, t in tensors:
            if done >= len(order) or name != order[done]:
                want = order[done] if done < len(order) else "nothing"
                raise ValueError(f"tensor {name!r} out of order: the file's next tensor is {want}")
            spec = specs[name]
            if SAFETENSORS_DTYPES.get(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
                raise ValueError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, its header says {spec.dtype} "
                                 f"{spec.shape}")
            if t.numel():
                fh.write(memoryview(t.detach().contiguous().view(-1).view(torch.uint8).numpy()))
            done += 1
        if done != len(order):
            raise ValueError(f"{len(order) - done} tensor(s) of the header not written, the first {order[done]!r}")


def mapped_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, mapped from its pages without a copy (copy-on-write: writing
    to one changes neither the file nor the others). The header is checked as
    :func:`quantpredict.models.checks.safetensors_header` checks it (a :class:`~quantpredict.errors.ModelError` for
    a damaged file); a tensor whose offset does not align to its element size is copied instead. The file is read
    ahead of use (``madvise`` WILLNEED, where the platform has it)."""
    from quantpredict.models.checks import safetensors_header

    p = Path(path)
    table = safetensors_header(p)
    with open(p, "rb") as fh:
        start = 8 + struct.unpack("<Q", fh.read(8))[0]
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if p.stat().st_size else None
    if buf is not None and hasattr(mmap, "MADV_WILLNEED"):
        # read ahead of use, as llama.cpp's own loader does (posix_madvise WILLNEED on its mapping): pages not in
        # the page cache arrive while the caller works on the tensors before them
        buf.madvise(mmap.MADV_SEQUENTIAL)
        buf.madvise(mmap.MADV_WILLNEED)
    out = {}
    for name, t in table.items():
        dtype = TORCH_DTYPES[t["dtype"]]
        shape = [int(x) for x in t["shape"]]
        begin, stop = (int(x) for x in t["data_offsets"])
        count = (stop - begin) // dtype.itemsize
        if count == 0 or buf is None:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        at = start + begin
        if at % dtype.itemsize:
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=stop - begin, offset=at).clone()
            out[name] = raw.view(dtype).reshape(shape)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=at).reshape(shape)
    return out
