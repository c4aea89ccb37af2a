"""Safetensors files read and written one tensor at a time: the stored tensors mapped without a copy, and a file
written header first and then tensor by tensor, byte for byte what ``safetensors.torch.save_file`` writes.

The arrays are numpy's (bfloat16 and float8 as their raw bits): the module imports no torch, so that
:mod:`quantpredict.checkpoint_rtn` quantizes without it where its kernels allow. :func:`mapped_tensors` gives
torch tensors over the same mapping, and :func:`write_streamed` takes torch tensors too.

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

import functools
import json
import mmap
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: safetensors' dtype names in the order of its ``Dtype`` enum (its files sort tensors by this, descending)
DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
               "I64", "U64")
#: each dtype as a numpy array holds it: numpy has no bfloat16 or float8, so those are their raw bits (uint16,
#: uint8), bit for bit what the file stores
NUMPY_DTYPES = {"BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
                "F8_E5M2": np.dtype(np.uint8), "F8_E4M3": np.dtype(np.uint8), "I16": np.dtype(np.int16),
                "U16": np.dtype(np.uint16), "F16": np.dtype(np.float16), "BF16": np.dtype(np.uint16),
                "I32": np.dtype(np.int32), "U32": np.dtype(np.uint32), "F32": np.dtype(np.float32),
                "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64)}


@functools.cache
def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
            "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
            "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
            "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64}


def __getattr__(name: str) -> Any:
    """``TORCH_DTYPES`` (safetensors name -> torch dtype) and ``SAFETENSORS_DTYPES`` (its inverse), built on first
    use: the module itself imports no torch, so that :mod:`quantpredict.checkpoint_rtn`'s one-pass types run
    without it (importing torch is most of a small model's quantization time)."""
    if name == "TORCH_DTYPES":
        return _torch_dtypes()
    if name == "SAFETENSORS_DTYPES":
        return {v: k for k, v in _torch_dtypes().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file to be written: its safetensors ``dtype`` name and ``shape``."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = NUMPY_DTYPES[self.dtype].itemsize
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


def _stored_bytes(name: str, t: Any, spec: TensorSpec) -> memoryview:
    """The bytes of ``t`` (a CPU torch tensor, or a numpy array in :data:`NUMPY_DTYPES`' form) as the file stores
    them; a ``ValueError`` where ``t`` is not the tensor ``spec`` describes."""
    if isinstance(t, np.ndarray):
        kind, ok, data = t.dtype, t.dtype == NUMPY_DTYPES[spec.dtype], t
    else:  # a torch tensor: torch is imported already
        import torch

        kind, ok = t.dtype, _torch_dtypes().get(spec.dtype) == t.dtype
        data = t.detach().contiguous().view(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
    if not ok or tuple(t.shape) != spec.shape:
        raise ValueError(f"tensor {name!r} is {kind} {tuple(t.shape)}, its header says {spec.dtype} {spec.shape}")
    return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def write_streamed(path: str | Path, specs: Mapping[str, TensorSpec], tensors: Iterable[tuple[str, Any]],
                   metadata: Mapping[str, str] | None = None) -> None:
    """Write the safetensors file ``path``: the header of ``specs``, then each tensor of ``tensors`` (``(name,
    tensor)`` pairs in :func:`file_order`; a CPU torch tensor, or a numpy array as :data:`NUMPY_DTYPES` holds the
    dtype) as it comes. A tensor out of order or unlike its spec is a ``ValueError``, and so is a missing one (the
    file is then incomplete: write it into a staged folder)."""
    order = file_order(specs)
    with open(path, "wb") as fh:
        fh.write(header_bytes(specs, metadata))
        done = 0
        for name, t in tensors:
            if done >= len(order) or name != order[done]:
                want = order[done] if done < len(order) else "nothing"
                raise ValueError(f"tensor {name!r} out of order: the file's next tensor is {want}")
            raw = _stored_bytes(name, t, specs[name])
            if raw.nbytes:
                fh.write(raw)
            done += 1
        if done != len(order):
            raise ValueError(f"{len(order) - done} tensor(s) of the header not written, the first {order[done]!r}")


def mapped_arrays(path: str | Path) -> tuple[dict[str, TensorSpec], dict[str, np.ndarray]]:
    """``(specs, arrays)``: every tensor of the safetensors file ``path`` as its :class:`TensorSpec` and as a numpy
    array (:data:`NUMPY_DTYPES`' form) mapped from the file's pages without a copy (copy-on-write: writing to one
    changes neither the file nor the others). The header is checked as
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
    specs, arrays = {}, {}
    for name, t in table.items():
        spec = TensorSpec(t["dtype"], tuple(int(x) for x in t["shape"]))
        dtype = NUMPY_DTYPES[spec.dtype]
        begin, stop = (int(x) for x in t["data_offsets"])
        count = (stop - begin) // dtype.itemsize
        specs[name] = spec
        if count == 0 or buf is None:
            arrays[name] = np.empty(spec.shape, dtype=dtype)
            continue
        at = start + begin
        a = np.frombuffer(buf, dtype=dtype, count=count, offset=at)
        arrays[name] = (a.copy() if at % dtype.itemsize else a).reshape(spec.shape)
    return specs, arrays


def mapped_tensors(path: str | Path) -> dict[str, Any]:
    """Every tensor of the safetensors file ``path`` as a torch tensor over :func:`mapped_arrays`' mapping (no
    copy; the same checks and read-ahead)."""
    import torch

    specs, arrays = mapped_arrays(path)
    return {k: torch.from_numpy(a).view(_torch_dtypes()[specs[k].dtype]) for k, a in arrays.items()}


#: the floating dtypes :func:`to_float32` and :func:`from_float32` convert
FLOAT_DTYPES = ("F16", "BF16", "F32")


def to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values of ``a``, an array of the safetensors ``dtype`` in :data:`NUMPY_DTYPES`' form (F32: ``a``
    itself, made contiguous; F16 and BF16 exactly widened, BF16 by placing its 16 bits on top of a float32's, as
    torch's ``.to(torch.float32)`` does)."""
    if dtype == "F32":
        return np.ascontiguousarray(a)
    if dtype == "F16":
        return a.astype(np.float32)
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"{dtype} is not one of {', '.join(FLOAT_DTYPES)}")


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """Float32 ``x`` (no NaN: the callers refuse NaN first) in the safetensors ``dtype`` (:data:`NUMPY_DTYPES`'
    form), rounded to nearest, ties to even, as torch's ``.to(dtype)`` rounds (F32: ``x`` itself). BF16 keeps the
    top 16 bits after adding half an ulp less one plus the kept part's lowest bit (the usual integer form of that
    rounding)."""
    if dtype == "F32":
        return x
    if dtype == "F16":
        return x.astype(np.float16)
    if dtype == "BF16":
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        # finite values stay below 2^32 after the addition (the largest, 0xFF7FFFFF, gains under 2^16)
        return ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    raise ValueError(f"{dtype} is not one of {', '.join(FLOAT_DTYPES)}")
