"""Bundled text data (see ``data/README.md`` for sources and licenses).

WikiText-2 (CC BY-SA 3.0, Merity et al. 2016) in its tokenized "v1" form: ``train`` is read from the zip in place,
``valid`` and ``test`` from plain files. ``wikitext2-raw`` has only a ``test`` split; ``tinyshakespeare`` has one
text, split 90/10 by characters as nanoGPT does.
"""

from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path

from quantpredict.errors import DataError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

_SPLITS: dict[str, tuple[str, ...]] = {
    "wikitext2": ("train", "valid", "test"),
    "wikitext2-raw": ("test",),
    "tinyshakespeare": ("train", "valid"),
}


def data_dir() -> Path:
    """The repository's ``data/`` folder."""
    return DATA_DIR


def datasets() -> dict[str, tuple[str, ...]]:
    """Every bundled data set name with its splits."""
    return dict(_SPLITS)


@lru_cache(maxsize=8)
def load_text(name: str, split: str) -> str:
    """The split's text, verbatim (UTF-8 decoded, line endings untouched).

    Raises :class:`DataError` listing the valid names and splits for unknown ones.
    """
    if name not in _SPLITS:
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(_SPLITS)}")
    if split not in _SPLITS[name]:
        raise DataError(f"data set {name!r} has no split {split!r}; valid splits: {', '.join(_SPLITS[name])}")
    root = data_dir()
    if name == "wikitext2":
        if split == "train":
            path = root / "wikitext-2" / "wikitext2.zip"
            _require(path)
            with zipfile.ZipFile(path) as zf, zf.open("wikitext2/train.txt") as fh:
                return fh.read().decode("utf-8")
        path = root / "wikitext-2" / f"{split}.txt"
    elif name == "wikitext2-raw":
        path = root / "wikitext-2-raw" / "wiki.test.raw"
    else:
        path = root / "tinyshakespeare" / "input.txt"
        _require(path)
        text = path.read_bytes().decode("utf-8")
        cut = int(len(text) * 0.9)
        return text[:cut] if split == "train" else text[cut:]
    _require(path)
    return path.read_bytes().decode("utf-8")


def _require(path: Path) -> None:
    if not path.exists():
        raise DataError(f"bundled data file {path} is missing; restore it with `git checkout -- data/`")


# ---- token ids and calibration windows ----------------------------------------------------------------------------

_TOKEN_CACHE: dict[tuple, object] = {}


def _tokenizer_key(tokenizer) -> str:
    """A key that is equal for tokenizers that tokenize alike: the fast tokenizer's serialised content (every zoo
    model ships the same tokenizer, so the splits are tokenized once per process, not once per model)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}:{id(tokenizer)}"


def token_ids(tokenizer, name: str = "wikitext2", split: str = "test"):
    """The split's text tokenized once (no special tokens), as a 1-D ``LongTensor``; cached per tokenizer content."""
    import torch

    key = (_tokenizer_key(tokenizer), name, split)
    if key not in _TOKEN_CACHE:
        text = load_text(name, split)
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def calibration_windows(calib_ids, n_samples: int, seq_len: int, seed: int = 0):
    """Calibration data as ``[n, seq_len]`` windows.

    ``calib_ids`` is either a 1-D ``LongTensor`` of token ids, cut into ``n_samples`` windows of ``seq_len`` tokens
    at seeded random offsets (the GPTQ convention), or a 2-D ``[n, seq_len]`` tensor of windows used as given.
    Empty or too-short data raises :class:`DataError`.
    """
    import torch

    if not isinstance(calib_ids, torch.Tensor):
        raise DataError(f"calibration data must be a LongTensor of token ids, got {type(calib_ids).__name__}")
    if calib_ids.numel() == 0:
        raise DataError("calibration data is empty; pass token ids, e.g. data.token_ids(tokenizer, 'wikitext2', "
                        "'train')")
    if calib_ids.dim() == 2:
        return calib_ids.long()
    if calib_ids.dim() != 1:
        raise DataError(f"calibration data must be 1-D ids or 2-D [n, seq_len] windows, got shape "
                        f"{tuple(calib_ids.shape)}")
    if n_samples < 1 or seq_len < 2:
        raise DataError(f"need at least 1 calibration window of at least 2 tokens (got {n_samples} x {seq_len})")
    if calib_ids.numel() < seq_len + 1:
        raise DataError(f"calibration data has {calib_ids.numel()} tokens, fewer than one window of {seq_len}; "
                        "pass more tokens or a shorter calib_seq_len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, calib_ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([calib_ids[s : s + seq_len] for s in starts.tolist()]).long()
