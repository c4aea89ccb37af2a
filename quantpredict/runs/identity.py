"""Model identity for run keys: the name the user gave plus a short hash of the weight files' bytes."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from quantpredict.errors import ModelError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a saved model directory (or the file itself), sorted by name."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        return [model_dir]
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                   and not p.name.startswith(("optimizer", "scheduler", "training_args", "rng_state")))
    return files


@lru_cache(maxsize=256)
def _hash_files(files: tuple[tuple[str, int, int], ...], n: int) -> str:
    # keyed by (path, size, mtime) so a rewritten file is hashed again
    h = hashlib.sha256()
    for path, _size, _mtime in files:
        h.update(Path(path).name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:n]


def weights_hash(model_dir: str | Path, n: int = 12) -> str:
    """sha256 (first ``n`` hex digits) over the weight files' names and bytes; cached by path, size and mtime."""
    files = weight_files(Path(model_dir))
    if not files:
        raise ModelError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {model_dir}; pass a saved model directory")
    stats = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash_files(stats, n)


def resolve_model_dir(name_or_path: str) -> Path:
    """The directory holding a model's weights: the zoo model of that name or the path itself
    (:func:`quantpredict.models.resolve`, which raises :class:`ModelError` naming what it tried)."""
    try:
        from quantpredict.models import resolve
    except ImportError:  # pragma: no cover - the models package is part of quantpredict
        p = Path(name_or_path).expanduser()
        if p.exists():
            return p
        raise ModelError(f"model {name_or_path!r} is not a path, and the zoo is not available") from None
    return Path(resolve(name_or_path))


def model_id(name_or_path: str) -> str:
    """``name@<12 hex digits of the weights hash>``: the model part of a run key."""
    return f"{name_or_path}@{weights_hash(resolve_model_dir(name_or_path))}"


@lru_cache(maxsize=256)
def model_uses_bos(name_or_path: str) -> bool:
    """Whether the model's tokenizer prepends a BOS token (:func:`quantpredict.data.eval_protocol`): part of its
    run keys. Loads the tokenizer only."""
    from transformers import AutoTokenizer

    from quantpredict.data import eval_protocol

    path = resolve_model_dir(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: its tokenizer could not be loaded ({exc}); a model directory needs its "
                         "tokenizer files") from exc
    return eval_protocol(tok).bos
