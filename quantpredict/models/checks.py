"""A model directory checked before anything loads: config, weights and tokenizer, in milliseconds.

:func:`check_files` is what :func:`quantpredict.models.check_model_dir` runs on a resolved directory; every command
that takes a model calls that first (and :func:`quantpredict.models.load` again, for library callers). A truncated
or foreign ``model.safetensors``, a shard an index names but the folder lacks, an unparseable ``config.json`` or a
folder without tokenizer files is one :class:`~quantpredict.errors.ModelError` naming the file and what to do,
before a single weight is read. Safetensors files are checked from their header alone (an 8-byte little-endian
length, a JSON table of tensors with their byte ranges) against the file's size; PyTorch ``.bin`` checkpoints only
for being readable, non-empty files.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from quantpredict.errors import ModelError

#: Files any one of which makes a tokenizer that ``AutoTokenizer`` can load (fast, SentencePiece, BPE or WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
#: Bytes per element of the safetensors dtypes.
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on the JSON header
_FIX = "re-download or re-create the model (`quantpredict quantize` / `zoo import` write whole directories)"


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensor table of a ``.safetensors`` file: ``{name: {"dtype", "shape", "data_offsets"}}`` (the
    ``__metadata__`` entry left out), read from its header alone. A file that is not safetensors, or whose tensors
    end past its last byte (a truncated download or copy), raises :class:`ModelError` naming it."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = fh.read(n) if 0 < n <= min(_MAX_HEADER, size - 8) else b""
    except OSError as exc:
        raise ModelError(f"{p} cannot be read ({exc.strerror or exc}); check its permissions") from None
    if n < 0 or not raw:
        what = ("is empty" if size == 0 else f"is only {size} bytes" if size < 8 else
                f"does not start with a safetensors header (its first 8 bytes give a header of {n:,} bytes; the "
                f"file has {size:,})")
        raise ModelError(f"{p} {what}: it is not a safetensors file, or it is truncated; {_FIX}")
    try:
        table = json.loads(raw.decode("utf-8"))
        if not isinstance(table, dict):
            raise ValueError("the header is not a JSON object")
        tensors = {k: v for k, v in table.items() if k != "__metadata__"}
        end = 0
        for name, t in tensors.items():
            begin, stop = (int(x) for x in t["data_offsets"])
            shape = [int(x) for x in t["shape"]]
            count = 1
            for d in shape:
                count *= d
            if t["dtype"] in DTYPE_BYTES and stop - begin != count * DTYPE_BYTES[t["dtype"]]:
                raise ValueError(f"tensor {name}'s byte range does not match its shape {shape} and dtype")
            end = max(end, stop)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{p} has a corrupt safetensors header ({exc}); it is not a model checkpoint, or it is "
                         f"damaged; {_FIX}") from None
    data = size - 8 - n
    if end > data:
        raise ModelError(f"{p} is truncated: its header lists {len(tensors)} tensors in {end:,} bytes of data, the "
                         f"file holds {data:,}; {_FIX}")
    return tensors


def _readable(p: Path) -> None:
    try:
        with open(p, "rb") as fh:
            if not fh.read(1):
                raise ModelError(f"{p} is empty; {_FIX}")
    except OSError as exc:
        raise ModelError(f"{p} cannot be read ({exc.strerror or exc}); check its permissions") from None


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{index} is not a readable checkpoint index (a JSON object with a weight_map): {exc}; "
                         f"{_FIX}") from None
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise ModelError(f"{index} names {len(shards)} weight shards but {index.parent} lacks {len(missing)} of "
                         f"them ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); {_FIX}")
    return [index.parent / s for s in shards]


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint files of a model directory, checked: each safetensors file's header against its size (every
    shard of a ``model.safetensors.index.json``), each ``.bin`` for being a readable, non-empty file."""
    d = Path(path)
    # the checkpoint layouts transformers loads, in its order of preference: (file, an index of shards?, its check)
    for name, shard, check in (("model.safetensors", False, safetensors_header),
                               ("model.safetensors.index.json", True, safetensors_header),
                               ("pytorch_model.bin", False, _readable),
                               ("pytorch_model.bin.index.json", True, _readable)):
        if (d / name).is_file():
            files = _index_shards(d / name) if shard else [d / name]
            for f in files:
                check(f)
            return files
    if (d / "model.safetensors").exists() or (d / "model.safetensors").is_symlink():
        raise ModelError(f"{d / 'model.safetensors'} is not a file (a directory or a broken link); {_FIX}")
    raise ModelError(f"{d} holds no weights (model.safetensors, a sharded model.safetensors.index.json or "
                     f"pytorch_model.bin); {_FIX}")


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a model directory's safetensors weights, from their headers (no weight read);
    ``{}`` for a ``.bin`` checkpoint."""
    out: dict[str, tuple[int, ...]] = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            out.update({k: tuple(v["shape"]) for k, v in safetensors_header(f).items()})
    return out


def check_files(d: Path, *, tokenizer: bool = True) -> None:
    """Check the model directory ``d`` can be loaded, without loading it: ``config.json`` parses as a JSON object,
    the weights are whole (:func:`weight_files`) and, with ``tokenizer``, a tokenizer file is there."""
    config = d / "config.json"
    try:
        doc = json.loads(config.read_text())
    except OSError as exc:
        raise ModelError(f"{config} cannot be read ({exc.strerror or exc}); check its permissions") from None
    except ValueError as exc:
        raise ModelError(f"{config} is not valid JSON ({exc}); {_FIX}") from None
    if not isinstance(doc, dict):
        raise ModelError(f"{config} is not a JSON object, so not a Hugging Face config; {_FIX}")
    archs = doc.get("architectures") or []
    if isinstance(archs, list) and archs and not any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ModelError(f"{d} holds a {', '.join(map(str, archs))}, not a causal language model; quantpredict needs a "
                         "*ForCausalLM / *LMHeadModel checkpoint")
    weight_files(d)
    if tokenizer and not any((d / f).is_file() for f in TOKENIZER_FILES):
        broken = [f for f in TOKENIZER_FILES if (d / f).is_symlink()]
        why = f" ({broken[0]} is a broken link)" if broken else ""
        raise ModelError(f"{d} holds no tokenizer{why}: none of {', '.join(TOKENIZER_FILES)}; copy the tokenizer "
                         "files of the model it came from into it (`tokenizer.save_pretrained(DIR)`)")
