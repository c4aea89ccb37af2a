"""llama.cpp importance matrices ("imatrix"): the data, its files, and the weights llama-quantize derives from it.

``llama-imatrix`` runs a model on calibration text and accumulates, for every weight matrix it multiplies (by GGUF
tensor name, e.g. ``blk.0.attn_q.weight``), the sum over the activation rows of each input column's squared value,
and how many rows it summed. It writes them as a GGUF file (llama-cpp-python 0.3.36's llama.cpp, ``tools/imatrix``):
per weight an F32 tensor ``<name>.in_sum2`` (ggml shape [n, n_mat]: one row per expert of a 3-D MoE weight, else
one) and an F32 ``<name>.counts`` ([1, n_mat]), with the keys ``general.type = "imatrix"``, ``imatrix.datasets``
(string array), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32). Its older ``.dat`` format ("legacy")
stores per weight ``(sum / count) * ncall`` and one int32 ``ncall``; llama.cpp still reads it.

``llama-quantize --imatrix`` (``tools/quantize/quantize.cpp`` ``load_imatrix``) turns each entry into the float32
``quant_weights`` it passes to ``quantize_<t>`` for every row of that tensor: ``sum / (float)count`` per matrix
(1 where the count is 0) for the GGUF format, ``sum / ncall`` (the sums as stored where ncall is 0) for the legacy
one: :func:`quant_weights`. :func:`quantpredict.formats.ggml_imatrix.to_gguf_bytes` with those weights gives its
bytes.

The GGUF files are read and written here with the standard library and numpy (little-endian GGUF v2/v3; F32 data),
so no ``gguf`` package is needed.

Using one: :func:`tensor_weights` (the weights of named tensors, checked as llama-quantize checks them; what
``export --imatrix`` packs with), :func:`layer_importance` (by Hugging Face layer name; what pricing and ``quantize
--imatrix`` round with), :func:`load` / :func:`imatrix_label` (read once, named by file and sha256 prefix).
Computing one: :func:`compute_imatrix` (``quantpredict imatrix``), llama-imatrix's sums and counts from PyTorch
forward passes. Which recipes take one: :func:`check_imatrix_recipe` (RTN of llama.cpp types), and
:func:`importance_of` (a layer's weights when its format is a llama.cpp one); quantize, features and predict all
ask here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantpredict.errors import DataError, OutputError, RecipeError

SUMS, COUNTS = ".in_sum2", ".counts"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
GGUF_MAGIC = b"GGUF"
ALIGNMENT = 32  # GGUF's default (general.alignment absent)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)  # numpy fields: identity, not elementwise, equality
class ImatrixEntry:
    """One weight's statistics as llama-imatrix stores them.

    ``sums``: float32 [n_mat, n], per matrix (expert; 1 for a 2-D weight) and input column, the sum of the squared
    activations; in a legacy file, ``(sum / count) * ncall`` with n_mat 1 (its columns then cover every expert).
    ``counts``: int64 [n_mat], the activation rows summed; in a legacy file ``[ncall]``, the chunks."""

    sums: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        sums = np.asarray(self.sums, dtype=np.float32)
        counts = np.asarray(self.counts)
        if sums.ndim == 1:
            sums = sums.reshape(1, -1)
        if sums.ndim != 2 or counts.ndim != 1 or counts.shape[0] != sums.shape[0] or sums.shape[1] == 0:
            raise DataError(f"imatrix entry: sums [n_mat, n] and counts [n_mat] needed, got shapes {sums.shape} and "
                            f"{counts.shape}")
        object.__setattr__(self, "sums", _frozen(sums))
        object.__setattr__(self, "counts", _frozen(counts.astype(np.int64)))


@dataclass(frozen=True, eq=False)
class Imatrix:
    """An importance matrix: ``entries`` by GGUF tensor name, and the file's metadata (``datasets``: the calibration
    files named; ``chunk_count``: chunks processed; ``chunk_size``: tokens per chunk). ``legacy``: read from the
    ``.dat`` format, whose sums are per-chunk means (see :class:`ImatrixEntry`)."""

    entries: Mapping[str, ImatrixEntry]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", dict(sorted(self.entries.items())))
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "names", tuple(self.entries))


def quant_weights(im: Imatrix, tensor_name: str) -> np.ndarray:
    """The float32 weights llama-quantize passes to the quantizer for ``tensor_name``: [n_mat * n], matrix (expert)
    ``j``'s in ``[j * n, (j + 1) * n)`` (a 2-D weight: its [n] columns), each ``sum / (float)count`` in float32 (1
    where the count is 0); legacy: ``sum / (float)ncall`` (the sums where ncall is 0). A :class:`DataError` if the
    imatrix has no entry of that name (llama-quantize then quantizes the tensor without one)."""
    e = im.entries.get(tensor_name)
    if e is None:
        shown = ", ".join(im.names[:5]) + (", ..." if len(im.names) > 5 else "")
        raise DataError(f"the imatrix has no entry {tensor_name!r} ({len(im.names)} entries: {shown}); "
                        "llama-quantize quantizes such a tensor without an imatrix")
    if im.legacy:
        ncall = int(e.counts[0])
        return (e.sums / np.float32(ncall) if ncall > 0 else e.sums.copy()).reshape(-1)
    out = np.ones_like(e.sums)
    for j, count in enumerate(e.counts):
        c = np.float32(count)  # (float) entry.counts[j]
        if c > 0:
            out[j] = e.sums[j] / c
    return out.reshape(-1)


# ------------------------------------------------------------------------------------------------ reading


class _Reader:
    """Little-endian fields of a GGUF file's bytes, with the file named in every error."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def fail(self, what: str) -> DataError:
        return DataError(f"imatrix file {self.path}: {what}; give a file written by llama-imatrix (GGUF or .dat)")

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise self.fail(f"truncated at byte {self.pos}")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self, len_fmt: str = "Q") -> str:
        n = self.take(len_fmt)
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated string at byte {self.pos}")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")


# GGUF value types: struct format of the scalars; 8 string, 9 array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _value(r: _Reader, vtype: int):
    if vtype in _SCALAR:
        return r.take(_SCALAR[vtype])
    if vtype == 8:
        return r.string()
    if vtype == 9:
        item, n = r.take("I"), r.take("Q")
        return [_value(r, item) for _ in range(n)]
    raise r.fail(f"unknown GGUF value type {vtype}")


def _read_gguf(data: bytes, path: Path) -> Imatrix:
    r = _Reader(data, path)
    r.take("4s")
    version = r.take("I")
    if version not in (2, 3):
        raise r.fail(f"GGUF version {version} (this reader takes little-endian versions 2 and 3)")
    n_tensors, n_kv = r.take("Q"), r.take("Q")
    kv = {}
    for _ in range(n_kv):
        key = r.string()
        kv[key] = _value(r, r.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("Q") for _ in range(r.take("I"))]
        infos.append((name, dims, r.take("I"), r.take("Q")))
    align = kv.get("general.alignment", ALIGNMENT)
    if not isinstance(align, int) or align < 1:
        raise r.fail(f"general.alignment {align!r} is not a positive integer")
    start = -(-r.pos // align) * align
    arrays: dict[str, np.ndarray] = {}
    for name, dims, ttype, offset in infos:
        if not (name.endswith(SUMS) or name.endswith(COUNTS)):
            continue
        if ttype != 0:
            raise r.fail(f"tensor {name} is not F32 (ggml type {ttype}); llama.cpp reads F32 sums and counts")
        n = int(np.prod(dims)) if dims else 1
        lo = start + offset
        if lo + 4 * n > len(data):
            raise r.fail(f"tensor {name}'s data runs past the end of the file")
        arrays[name] = np.frombuffer(data, dtype="<f4", count=n, offset=lo).reshape(list(reversed(dims)) or [1])
    return Imatrix(_pair_up(arrays, r), **_metadata(kv, r))


def _pair_up(arrays: Mapping[str, np.ndarray], r: _Reader) -> dict[str, ImatrixEntry]:
    """``<name>.in_sum2`` and ``<name>.counts`` into entries (counts rounded to integers, as ``std::lround``)."""
    names = {k[: -len(SUMS)] for k in arrays if k.endswith(SUMS)} | {k[: -len(COUNTS)] for k in arrays
                                                                      if k.endswith(COUNTS)}
    if not names:
        raise r.fail("no <tensor>.in_sum2 / <tensor>.counts tensors")
    entries = {}
    for name in sorted(names):
        sums, counts = arrays.get(name + SUMS), arrays.get(name + COUNTS)
        if sums is None or counts is None:
            raise r.fail(f"{name} has {'no sums' if sums is None else 'no counts'} (mismatched sums and counts)")
        n_mat = counts.size
        if sums.size % n_mat:
            raise r.fail(f"{name}: {sums.size} sums do not split into {n_mat} matrices")
        rounded = np.floor(np.abs(counts.astype(np.float64)) + 0.5) * np.sign(counts)  # lround: halves away from 0
        entries[name] = ImatrixEntry(sums.reshape(n_mat, -1), rounded.reshape(-1).astype(np.int64))
    return entries


def _metadata(kv: Mapping[str, object], r: _Reader) -> dict[str, object]:
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in kv]
    if missing:
        raise r.fail(f"no {', '.join(missing)} (llama-quantize refuses a GGUF imatrix without its metadata)")
    datasets = kv[KEY_DATASETS]
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise r.fail(f"{KEY_DATASETS} is not a string array")
    return {"datasets": tuple(datasets), "chunk_count": int(kv[KEY_CHUNK_COUNT]),
            "chunk_size": int(kv[KEY_CHUNK_SIZE])}


def _read_legacy(data: bytes, path: Path) -> Imatrix:
    r = _Reader(data, path)
    n_entries = r.take("i")
    if n_entries < 1:
        raise r.fail("no entries (not an imatrix file?)")
    entries = {}
    for _ in range(n_entries):
        name = r.string("i")
        ncall, nval = r.take("i"), r.take("i")
        if nval < 1 or r.pos + 4 * nval > len(data):
            raise r.fail(f"entry {name!r}: bad or truncated values")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=r.pos)
        r.pos += 4 * nval
        entries[name] = ImatrixEntry(sums.reshape(1, -1), np.array([ncall]))
    chunk_count, datasets = 0, ()
    if r.pos + 4 <= len(data):  # the optional trailer: chunk count, then the dataset's name
        chunk_count = r.take("i")
        if r.pos + 4 <= len(data):
            n = r.take("i")
            if 0 < n <= len(data) - r.pos:
                datasets = (data[r.pos : r.pos + n].decode("utf-8", errors="replace"),)
    return Imatrix(entries, datasets=datasets, chunk_count=chunk_count, chunk_size=0, legacy=True)


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """The imatrix in ``path``: llama-imatrix's GGUF format, or its legacy ``.dat`` (what llama.cpp reads when the
    file is not GGUF). A :class:`DataError` naming the file if it is missing, unreadable or malformed."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"imatrix file {p}: cannot read it ({e.strerror or e})") from None
    try:
        if data[:4] == GGUF_MAGIC:
            return _read_gguf(data, p)
        return _read_legacy(data, p)
    except (ValueError, struct.error, OverflowError, MemoryError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"imatrix file {p}: malformed ({e}); give a file written by llama-imatrix") from None


# ------------------------------------------------------------------------------------------------ writing


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _tensors(im: Imatrix) -> list[tuple[str, np.ndarray]]:
    """The F32 tensors of the GGUF file, numpy-shaped [n_mat, n] and [n_mat, 1], sums then counts per name. A
    legacy entry is written so that :func:`quant_weights` of the file is unchanged: its sums with count ``ncall``
    (count 1 where ncall is 0: the sums themselves)."""
    out = []
    for name, e in im.entries.items():
        counts = e.counts
        if im.legacy:
            counts = np.maximum(counts, 1)
        out.append((name + SUMS, e.sums.astype("<f4")))
        out.append((name + COUNTS, counts.astype("<f4").reshape(-1, 1)))
    return out


def gguf_bytes(im: Imatrix) -> bytes:
    """``im`` as the GGUF file llama-imatrix writes (keys ``general.type``, ``imatrix.datasets``, ``.chunk_count``,
    ``.chunk_size``; tensors by sorted name, each ``in_sum2`` then ``counts``; 32-byte alignment)."""
    tensors = _tensors(im)
    kv = [_string("general.type") + struct.pack("<I", 8) + _string("imatrix"),
          _string(KEY_DATASETS) + struct.pack("<IIQ", 9, 8, len(im.datasets)) + b"".join(map(_string, im.datasets)),
          _string(KEY_CHUNK_COUNT) + struct.pack("<II", 4, im.chunk_count),
          _string(KEY_CHUNK_SIZE) + struct.pack("<II", 4, im.chunk_size)]
    head = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(kv)), *kv]
    blobs, offset = [], 0
    for name, a in tensors:
        dims = list(reversed(a.shape))  # ggml order: ne0 (the columns) first; trailing 1s dropped (ggml_n_dims)
        while len(dims) > 1 and dims[-1] == 1:
            dims.pop()
        head.append(_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, 0, offset))
        blob = a.tobytes()
        pad = -len(blob) % ALIGNMENT
        blobs.append(blob + b"\0" * pad)
        offset += len(blob) + pad
    header = b"".join(head)
    return header + b"\0" * (-len(header) % ALIGNMENT) + b"".join(blobs)


def write_imatrix(im: Imatrix, path: str | os.PathLike) -> Path:
    """Write ``im`` to ``path`` in the GGUF format llama-quantize reads (:func:`gguf_bytes`); returns the path. An
    :class:`OutputError` naming the file if it cannot be written."""
    p = Path(path)
    data = gguf_bytes(im)
    try:
        p.write_bytes(data)
    except OSError as e:
        raise OutputError(f"imatrix file {p}: cannot write it ({e.strerror or e})") from None
    return p


# ------------------------------------------------------------------------------------------------ using it


def as_imatrix(imatrix: Imatrix | str | os.PathLike) -> tuple[Imatrix, str]:
    """``imatrix`` and the name it is shown by: an :class:`Imatrix` as it is (``"imatrix"``, or its first dataset's
    name), a path read by :func:`read_imatrix` (the path)."""
    if isinstance(imatrix, Imatrix):
        return imatrix, "imatrix" + (f" of {imatrix.datasets[0]}" if imatrix.datasets else "")
    return read_imatrix(imatrix), str(imatrix)


def imatrix_label(imatrix: Imatrix | str | os.PathLike | None) -> str | None:
    """How a row or a file names the imatrix it was priced or quantized with: the file's name and the first 12 hex
    digits of the sha256 of its bytes (``imatrix.gguf@1a2b3c4d5e6f``); an :class:`Imatrix` object, ``sha256:`` of its
    GGUF bytes (:func:`gguf_bytes`); ``None`` for none."""
    import hashlib

    if imatrix is None:
        return None
    if isinstance(imatrix, Imatrix):
        return "sha256:" + hashlib.sha256(gguf_bytes(imatrix)).hexdigest()[:12]
    p = Path(imatrix)
    try:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
    except OSError as e:
        raise DataError(f"imatrix file {p}: cannot read it ({e.strerror or e})") from None
    return f"{p.name}@{digest}"


def tensor_weights(im: Imatrix, rows: Mapping[str, int], *, source: str = "the imatrix",
                   optional: frozenset[str] | set[str] = frozenset()) -> dict[str, np.ndarray]:
    """The float32 :func:`quant_weights` [n] of each GGUF tensor of ``rows`` (name -> row length ``n``, a 2-D
    weight's columns), checked as llama-quantize checks them: an entry of another size than ``n`` is an error (as
    llama-quantize's "imatrix size ... is different from tensor size"), except for ``token_embd.weight``, which
    llama-quantize then quantizes without one; non-finite weights are an error ("imatrix contains non-finite
    value"). A tensor without an entry is a :class:`DataError` naming ``source`` and the tensor, unless it is in
    ``optional``: then it is left out, and is quantized without weights (llama-quantize: "did not find weights for
    ...", and it goes on without)."""
    out: dict[str, np.ndarray] = {}
    for name, n in rows.items():
        if name not in im.entries:
            if name in optional:
                continue
            shown = ", ".join(im.names[:4]) + (", ..." if len(im.names) > 4 else "")
            raise DataError(f"{source} has no entry for {name} ({len(im.names)} entries: {shown}); give the imatrix "
                            "of this model (llama-imatrix or `quantpredict imatrix` on it)")
        w = quant_weights(im, name)
        if w.size != n:
            if name == "token_embd.weight":
                continue
            raise DataError(f"{source}: entry {name} has {w.size} values, but the tensor's rows have {n} columns "
                            "(llama-quantize refuses it too); give the imatrix of this model")
        if not np.isfinite(w).all():
            raise DataError(f"{source}: entry {name} holds non-finite values (llama-quantize refuses it too)")
        out[name] = w
    return out


_READ_CACHE: dict[tuple[str, int, int], tuple[Imatrix, str]] = {}


def load(imatrix: Imatrix | str | os.PathLike) -> tuple[Imatrix, str | None]:
    """``imatrix`` and its :func:`imatrix_label`; a path is read once per (path, size, mtime) in this process, so
    pricing many recipes with one file reads and hashes it once."""
    if isinstance(imatrix, Imatrix):
        return imatrix, imatrix_label(imatrix)
    p = Path(imatrix)
    try:
        st = p.stat()
    except OSError as e:
        raise DataError(f"imatrix file {p}: cannot read it ({e.strerror or e})") from None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _READ_CACHE:
        _READ_CACHE.clear()  # one file at a time is what the commands use
        _READ_CACHE[key] = (read_imatrix(p), imatrix_label(p))
    return _READ_CACHE[key]


def layer_importance(model, refs, formats, imatrix: Imatrix | str | os.PathLike) -> dict[str, object]:
    """HF linear name -> float32 tensor [in] of llama-quantize's quant_weights, for each of ``refs`` (the model's
    :class:`~quantpredict.arch.LinearRef`) whose entry of ``formats`` (``(format, block size)`` or ``None``) is a
    llama.cpp format: the weights its RTN is priced with. The GGUF tensor names come from gguf's name map of the
    model's architecture (:func:`quantpredict.gguf_names.model_gguf_names`); a layer without an entry, or with one of
    another size, is a :class:`DataError` naming the imatrix and the tensor (:func:`tensor_weights`)."""
    import torch

    from quantpredict.formats import get_format
    from quantpredict.gguf_names import model_gguf_names

    im, label = load(imatrix)
    wanted = [r for r, fb in zip(refs, formats, strict=True) if fb is not None and get_format(fb[0]).family == "ggml"]
    if not wanted:
        return {}
    names = model_gguf_names(model, [r.name for r in wanted])
    source = f"imatrix file {imatrix}" if not isinstance(imatrix, Imatrix) else f"imatrix {label}"
    weights = tensor_weights(im, {names[r.name]: r.in_features for r in wanted}, source=source)
    return {r.name: torch.from_numpy(weights[names[r.name]]) for r in wanted}


# ------------------------------------------------------------------------------------------------ computing it

#: llama-imatrix collects no matrix multiplication of fewer activation rows (its ``src1->ne[1] < 16`` test)
MIN_ROWS = 16


def compute_imatrix(model, windows, *, batch_size: int = 1, datasets: tuple[str, ...] = (),
                    progress: bool = False) -> Imatrix:
    """llama-imatrix's importance matrix of ``model`` (a loaded Hugging Face causal LM) over ``windows`` (int64
    [n, T] token ids, each a chunk as llama-imatrix evaluates one): a forward pre-hook on every linear layer of the
    blocks (:func:`quantpredict.arch.linear_layers`; the head is not collected, as llama-imatrix without
    ``--process-output``) adds, per input column, the sum of the squares of that layer's input rows, and counts the
    rows (one per token: llama-imatrix's ``counts += nrows(src1) / n_mat``, the activation rows, not the chunks).
    Entries are by GGUF tensor name (:func:`quantpredict.gguf_names.model_gguf_names`); ``chunk_count`` is ``n``,
    ``chunk_size`` ``T`` (llama-imatrix's ``n_ctx / n_parallel``).

    Departures from llama-imatrix: the sums accumulate in float64 (llama-imatrix: float32, in its graph's order)
    and are stored in float32; the activations are PyTorch's float32 forward, not ggml's. A window shorter than
    :data:`MIN_ROWS` tokens is refused (llama-imatrix would skip its matrix multiplications). ``batch_size``
    windows per forward pass (the sums do not depend on it beyond float64 rounding)."""
    import torch
    from tqdm.auto import tqdm

    from quantpredict import arch
    from quantpredict.gguf_names import model_gguf_names

    windows = torch.as_tensor(windows)
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise DataError(f"compute_imatrix needs [n, T] token windows, got shape {tuple(windows.shape)}")
    if windows.shape[1] < MIN_ROWS:
        raise DataError(f"windows of {windows.shape[1]} tokens: llama-imatrix collects no batch of fewer than "
                        f"{MIN_ROWS} tokens; use windows of at least {MIN_ROWS}")
    refs = arch.linear_layers(model)
    names = model_gguf_names(model, [r.name for r in refs])
    sums = {r.name: torch.zeros(r.in_features, dtype=torch.float64) for r in refs}
    counts = dict.fromkeys(sums, 0)

    def hook_for(name: str, n: int):
        def hook(module, args):
            x = args[0].detach().reshape(-1, n).to(torch.float64)  # [rows, in]: every token's input row
            sums[name] += (x * x).sum(0)
            counts[name] += x.shape[0]
        return hook

    handles = [r.module.register_forward_pre_hook(hook_for(r.name, r.in_features)) for r in refs]
    try:
        with torch.inference_mode():
            for batch in tqdm(windows.split(batch_size), desc="imatrix", unit="batch", disable=not progress):
                model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    entries = {names[n]: ImatrixEntry(sums[n].to(torch.float32).numpy().reshape(1, -1), np.array([counts[n]]))
               for n in sums}
    return Imatrix(entries, datasets=tuple(datasets), chunk_count=int(windows.shape[0]),
                   chunk_size=int(windows.shape[1]))


def importance_of(importance: Mapping[str, Any] | None, name: str, fmt: str) -> Any:
    """The importance weights of layer ``name`` in ``importance`` when its format ``fmt`` is a llama.cpp one (the
    only formats an imatrix applies to; ggml's F16/BF16 ignore it too), else ``None``."""
    if not importance or name not in importance:
        return None
    from quantpredict.formats import get_format

    return importance[name] if get_format(fmt).family == "ggml" else None


def check_imatrix_recipe(recipe: Any, formats: Sequence[tuple[str, int | None] | None] = ()) -> None:
    """A :class:`RecipeError` unless ``recipe`` can be priced with an importance matrix: RTN (GPTQ, AWQ, QAT and
    SmoothQuant are not llama.cpp's, which quantizes each tensor by itself with the imatrix's weights), no
    activation format (a runtime's rounding is ``runtime=``'s), and every quantized layer's format (``formats``,
    or the recipe's own weight format) a llama.cpp type or a 16-bit float (which ignores it, as in ggml)."""
    from quantpredict.formats import get_format

    what = [w for w, on in (("GPTQ", recipe.method == "gptq"), (f"method {recipe.method}", recipe.method
                                                                   not in ("rtn", "gptq")),
                            ("AWQ", recipe.awq), ("QAT", recipe.qat),
                            ("SmoothQuant", recipe.smoothquant_alpha is not None),
                            (f"activation format a_{recipe.act_format}", recipe.act_format is not None)) if on]
    if what:
        raise RecipeError(f"recipe {recipe.label}: an imatrix applies to llama.cpp's round-to-nearest quantization "
                          f"(llama-quantize --imatrix), not with {' and '.join(what)}; price the RTN recipe with it, "
                          "or this one without --imatrix")
    fmts = [fb[0] for fb in formats if fb is not None] or [recipe.weight_format]
    bad = sorted({f for f in fmts if get_format(f).family not in ("ggml", "float")})
    if bad:
        raise RecipeError(f"recipe {recipe.label}: an imatrix applies to llama.cpp types only, and "
                          f"{', '.join(bad)} is not one; drop --imatrix for it")
