"""Bundled text data (see ``data/README.md`` for sources and licenses).

WikiText-2 (CC BY-SA 3.0, Merity et al. 2016) in its tokenized "v1" form: ``train`` is read from the zip in place,
``valid`` and ``test`` from plain files. ``wikitext2-raw`` has only a ``test`` split; ``tinyshakespeare`` has one
text, split 90/10 by characters as nanoGPT does.
"""

from __future__ import annotations

import os
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from quantpredict.errors import DataError

#: The environment variable naming the data folder (a copy of the repository's ``data/``) for an installed package.
DATA_ENV = "QUANTPREDICT_DATA"
_CHECKOUT_DATA = Path(__file__).resolve().parent.parent / "data"


def locate_data_dir(environ: Mapping[str, str] | None = None, checkout: Path = _CHECKOUT_DATA) -> Path:
    """Where the data lives: ``$QUANTPREDICT_DATA`` when set, else the checkout's ``data/`` beside the package.

    A wheel holds the code only (the repository's data/ is ~100 MB of zoo weights): an installed quantpredict reads
    its zoo, texts and default predictor from the folder the variable names. Pure (nothing is read); whether the
    folder exists is :func:`data_dir`'s check.
    """
    env = os.environ if environ is None else environ
    value = env.get(DATA_ENV, "").strip()
    return Path(value).expanduser() if value else checkout


#: The data folder as located when quantpredict was imported (see :func:`locate_data_dir`).
DATA_DIR = locate_data_dir()

_SPLITS: dict[str, tuple[str, ...]] = {
    "wikitext2": ("train", "valid", "test"),
    "wikitext2-raw": ("test",),
    "tinyshakespeare": ("train", "valid"),
}


#: A subfolder every copy of the repository's data/ has (the texts the zoo, calibration and evaluation read): a
#: folder without it is not quantpredict's data, whatever else it holds.
_MARKER = "wikitext-2"


def data_problem() -> str | None:
    """Why the data folder cannot be used, as the one sentence :func:`data_dir` raises (naming ``$QUANTPREDICT_DATA``
    and what it must point to), or ``None`` when it can. Messages that would advise a command needing the data
    (``zoo build``, ``fit --store data/runs/...``) give this sentence instead when it is not ``None``, so that no
    advice leads an installed user into this same error."""
    if DATA_DIR.is_dir() and (DATA_DIR / _MARKER).is_dir():
        return None
    what = "not a directory" if not DATA_DIR.is_dir() else f"a directory without {_MARKER}/"
    how = (f"${DATA_ENV} is {DATA_DIR}, {what}" if os.environ.get(DATA_ENV, "").strip()
           else f"no data/ folder beside the package ({DATA_DIR} is {what}): a pip-installed quantpredict does not "
                "ship it")
    return (f"quantpredict's data (zoo models, WikiText-2, the shipped predictors) was not found: {how}; set "
            f"{DATA_ENV} to the data/ folder of a quantpredict repository checkout")


def data_dir() -> Path:
    """The data folder (the repository's ``data/``, or ``$QUANTPREDICT_DATA``); raises :class:`DataError` naming
    the variable when it is not there (an installed package run without the data), see :func:`data_problem`."""
    problem = data_problem()
    if problem:
        raise DataError(problem)
    return DATA_DIR


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
        fix = (f"${DATA_ENV} ({DATA_DIR}) is not a complete copy of the repository's data/ folder; point it at one"
               if os.environ.get(DATA_ENV, "").strip() else "restore it with `git checkout -- data/`")
        raise DataError(f"bundled data file {path} is missing; {fix}")


# ---- the evaluation protocol, token ids and calibration windows ---------------------------------------------------

PROBE_TEXT = "The quick brown fox"


@dataclass(frozen=True)
class Protocol:
    """How text becomes a model's windows: ``bos_id`` starts every window when the tokenizer prepends a BOS token
    itself (``None``: no BOS); WikiText's literal ``<unk>`` always stays text (``split_special_tokens``)."""

    bos_id: int | None = None
    split_special_tokens: bool = True

    @property
    def bos(self) -> bool:
        return self.bos_id is not None

    def to_dict(self) -> dict:
        return {"bos": self.bos, "bos_id": self.bos_id, "split_special_tokens": self.split_special_tokens}


def eval_protocol(tokenizer) -> Protocol:
    """The protocol for ``tokenizer``, decided by encoding a probe string (not by its ``add_bos_token`` attribute,
    which some tokenizers report wrongly): BOS when the encoding with special tokens starts with the BOS id and the
    plain encoding does not, as lm-evaluation-harness prefixes rolling log-likelihood windows."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return Protocol(None)
    with_special = tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
    plain = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    prepends = bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)
    return Protocol(int(bos) if prepends else None)


@dataclass(frozen=True)
class TokenStream:
    """A tokenized text and its protocol: ``ids`` ``[N]`` (no special tokens), ``bos_id`` (``None``: no BOS) and
    ``source`` (``wikitext2:train``, or ``file:<name>#<sha256 prefix>`` for a user's text). Calibration and
    evaluation windows cut from it start with ``bos_id`` when it is set."""

    ids: object  # torch.LongTensor [N]
    bos_id: int | None
    source: str

    def numel(self) -> int:
        """Tokens in the stream (as for a 1-D tensor of ids)."""
        return int(self.ids.numel())

    def __len__(self) -> int:
        return self.numel()

    @property
    def text_sha(self) -> str | None:
        """The sha256 prefix of a user's text (``None`` for a bundled split): part of its run keys."""
        return self.source.rpartition("#")[2] if self.source.startswith("file:") else None


class _TokenCache:
    """The last ``maxsize`` tokenized texts, keyed by the tokenizer's serialised content; hands out copies, so no
    caller can change what another one sees (torch has no read-only tensors)."""

    def __init__(self, maxsize: int = 8):
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, make):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key].clone()
        value = make()
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return value.clone()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_TOKEN_CACHE = _TokenCache()


def _tokenizer_key(tokenizer) -> str:
    """A key that is equal for tokenizers that tokenize alike: the fast tokenizer's serialised content (every zoo
    model ships the same tokenizer, so the splits are tokenized once per process, not once per model); a slow
    tokenizer is keyed by its class, vocabulary and special tokens."""
    import hashlib
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                           getattr(tokenizer, "special_tokens_map", {})], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _encode(tokenizer, text: str):
    import torch

    from quantpredict.memory import release_freed_heap

    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    out = torch.tensor(ids, dtype=torch.long)
    del ids
    release_freed_heap()  # the encoding's ~1 GB of temporaries for a whole split: give it back
    return out


def token_ids(tokenizer, name: str = "wikitext2", split: str = "test"):
    """The split's text tokenized once (no special tokens; ``<unk>`` stays text), as a 1-D ``LongTensor``; cached
    per tokenizer content (each call gets its own copy)."""
    key = (_tokenizer_key(tokenizer), name, split)
    return _TOKEN_CACHE.get(key, lambda: _encode(tokenizer, load_text(name, split)))


def read_text_file(path) -> tuple[str, str]:
    """A user's text file (UTF-8) and the first 12 hex digits of its sha256; a clear error if it is unusable."""
    import hashlib

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"text file {p} does not exist; pass the path of a UTF-8 text file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {p} is not UTF-8 ({exc}); convert it, e.g. with iconv -t utf-8") from None
    if not text.strip():
        raise DataError(f"text file {p} is empty; pass a file with text to calibrate or evaluate on")
    return text, hashlib.sha256(raw).hexdigest()[:12]


def token_stream(tokenizer, name: str = "wikitext2", split: str = "train", *, text_file=None,
                 protocol: Protocol | None = None) -> TokenStream:
    """A bundled split (or ``text_file``, a user's UTF-8 text) tokenized under the tokenizer's protocol."""
    protocol = protocol or eval_protocol(tokenizer)
    if text_file is not None:
        text, sha = read_text_file(text_file)
        key = (_tokenizer_key(tokenizer), "file", sha)
        ids = _TOKEN_CACHE.get(key, lambda: _encode(tokenizer, text))
        return TokenStream(ids, protocol.bos_id, f"file:{Path(text_file).name}#{sha}")
    return TokenStream(token_ids(tokenizer, name, split), protocol.bos_id, f"{name}:{split}")


def calibration_windows(calib_ids, n_samples: int, seq_len: int, seed: int = 0):
    """Calibration data as ``[n, seq_len]`` windows.

    ``calib_ids`` is a 1-D ``LongTensor`` of token ids or a :class:`TokenStream`, cut into ``n_samples`` windows of
    ``seq_len`` tokens at seeded random offsets (the GPTQ convention; under a BOS protocol each window is the BOS
    token and ``seq_len - 1`` text tokens), or a 2-D ``[n, seq_len]`` tensor of windows used as given. Empty or
    too-short data raises :class:`DataError`.
    """
    import torch

    bos_id = None
    if isinstance(calib_ids, TokenStream):
        calib_ids, bos_id = calib_ids.ids, calib_ids.bos_id
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
    text_len = seq_len - 1 if bos_id is not None else seq_len
    if calib_ids.numel() < text_len + 1:
        raise DataError(f"calibration data has {calib_ids.numel()} tokens, fewer than one window of {seq_len}; "
                        "pass more tokens or a shorter calib_seq_len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, calib_ids.numel() - text_len, (n_samples,), generator=g)
    windows = torch.stack([calib_ids[s : s + text_len] for s in starts.tolist()]).long()
    if bos_id is not None:
        windows = torch.cat([torch.full((n_samples, 1), int(bos_id), dtype=torch.long), windows], dim=1)
    return windows
