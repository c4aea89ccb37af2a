"""The sensitivity profile, measured once per model and cached on disk.

:func:`quantpredict.predict.rank.profile_model` (behind ``rank``, ``allocate`` and ``quantpredict profile``) keeps
the lean profile (``measure_profile(kfac=False)``: the token-wise terms and the FP NLL and entropy) under

    ``$QUANTPREDICT_HOME/profiles/<model name>-<key prefix>/`` (default ``~/.cache/quantpredict/profiles``; the same
    root as the imported models; ``$QUANTPREDICT_PROFILES`` names another folder)

keyed by everything the measurement depends on (:func:`key_parts`): the weights (the sha256 of the model's weight
files, :func:`quantpredict.runs.identity.weights_hash`, or of the loaded tensors for a model object), the dtype it
ran in, the calibration text (the sha256 of the text and the tokenizer's content, or of the token ids given), the
protocol (windows, window length, seed, token windows, BOS id) and the code (:data:`PROFILE_VERSION`, bumped when
the measurement changes, and :data:`quantpredict.version.MEASUREMENT_VERSION`).

An entry is a directory written under a temporary name and renamed into place: ``tokens.safetensors`` (the per-token
layer inputs and output gradients, bf16, one input tensor per layer-input owner; and the calibration windows' token
ids), ``profile.json`` (the scalars, the layer names, the key and its parts, the sizes of the files) and, once a GPTQ
or AWQ recipe has been priced or ``quantpredict profile --gptq`` asked for them, ``moments-128x256-seed0/`` (each
layer-input owner's ``A`` on the recipe's calibration windows, as ``quantize_model`` cuts them: 128 windows of 256
tokens at seed 0 by default; float32, one safetensors file per block: :mod:`quantpredict.features.moments`). GPTQ
and AWQ are priced against these, their own calibration's Hessians (``reports/gptq_hessian_study.md``). Entries
written before that hold ``moments/``: the profile's own 8 windows' moments, no longer read by any price (delete it
to free the space: 11 GB for a 1.5B model). Once a recipe quantizing
the token embedding or the head has been priced, ``embedding-head-v1.safetensors`` (:func:`embedding_head_stats`).
Loading gives back the tensors and floats that were measured, so prices from a cached profile equal the fresh one's
bit for bit. An entry that is partial, corrupt or from another key is reported (a :class:`ProfileCacheWarning`
naming its path), removed and measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from quantpredict.features.fisher import SensitivityProfile
from quantpredict.features.moments import (
    CorruptMomentsError,
    InputMoments,
    LazyInputMoments,
    measure_input_moments,
    write_safetensors,
)

#: Bump when what the cached profile holds, or how it is measured, changes: older entries stop matching.
PROFILE_VERSION = 1
FORMAT = 1
ENV = "QUANTPREDICT_PROFILES"
PROFILE_JSON = "profile.json"
TOKENS_FILE = "tokens.safetensors"
MOMENTS_DIR = "moments"
EMBEDDING_HEAD_FILE = "embedding-head-v1.safetensors"  # the version bumps with what it holds
HASHES = "weights-hashes.json"


class ProfileCacheWarning(UserWarning):
    """A cache entry could not be used or written: it is measured again (or not kept)."""


def profiles_root() -> Path:
    """Where cached profiles live: ``$QUANTPREDICT_PROFILES``, else ``profiles`` beside the imported models
    (``$QUANTPREDICT_HOME/profiles``, default ``~/.cache/quantpredict/profiles``)."""
    from quantpredict.models.imported import imported_root

    override = os.environ.get(ENV, "").strip()
    return Path(override).expanduser() if override else imported_root().parent / "profiles"


def _sha256(data: Any) -> str:
    h = hashlib.sha256()
    h.update(data)
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (with its dtype and shape)."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def weights_id(model_or_path: Any, model: Any) -> str:
    """The weights' identity: the sha256 prefix of the weight files of a model given by name or path (what run keys
    use), else of the loaded model's state dict."""
    if isinstance(model_or_path, (str, Path)):
        from quantpredict.runs.identity import resolve_model_dir

        return "files:" + files_hash(resolve_model_dir(str(model_or_path)))
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_sha256(t).encode())
    return "tensors:" + h.hexdigest()[:16]


def files_hash(model_dir: Path) -> str:
    """:func:`quantpredict.runs.identity.weights_hash` (16 hex digits) of a model directory, remembered across
    processes in ``<profiles root>/weights-hashes.json`` by the weight files' paths, sizes and modification times
    (as ``weights_hash`` does within one): reading a 1.5B model's 7 GB again on every warm call costs seconds."""
    from quantpredict.runs.identity import weight_files, weights_hash

    stamps = []
    for p in weight_files(Path(model_dir)):
        st = p.stat()
        stamps.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    stamp = ";".join(stamps)
    memo_path = profiles_root() / HASHES
    try:
        memo = json.loads(memo_path.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    if stamps and isinstance(memo.get(stamp), str):
        return memo[stamp]
    digest = weights_hash(model_dir, n=16)
    memo[stamp] = digest
    write_json_atomic(memo_path, memo, indent=0)  # only a memo: a failed write costs a hash next time
    return digest


def write_json_atomic(path: Path, doc: Any, *, indent: int = 1) -> bool:
    """Write ``doc`` as JSON to ``path`` through a temporary file in the same folder and a rename, so a reader never
    sees half a file; False (and no temporary file left) when the cache folder cannot be written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=indent)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return False


def calibration_id(calib: Any, tokenizer: Any) -> dict[str, Any]:
    """The calibration data's identity: WikiText-2 train's text hash with the tokenizer's content and BOS protocol
    (``calib=None``, nothing tokenized), or the hash of the given stream's or windows' token ids."""
    from quantpredict import data

    out: dict[str, Any] = {}
    if tokenizer is not None:  # the full-split size (rank's evaluation-cost estimate) comes through it
        out["tokenizer"] = data._tokenizer_key(tokenizer)[:16]
    if calib is None:
        text = data.load_text("wikitext2", "train")
        out.update(source="wikitext2:train", text_sha256=_sha256(text.encode("utf-8"))[:16],
                   bos_id=data.eval_protocol(tokenizer).bos_id)
    elif isinstance(calib, data.TokenStream):
        out.update(source=calib.source, ids_sha256=tensor_sha256(calib.ids)[:16], bos_id=calib.bos_id)
    else:
        out.update(ids_sha256=tensor_sha256(torch.as_tensor(calib))[:16])
    return out


def key_parts(model_or_path: Any, model: Any, tokenizer: Any, calib: Any, protocol: dict[str, Any]) -> dict[str, Any]:
    """Everything a cached profile depends on (the key is their hash)."""
    from quantpredict.version import MEASUREMENT_VERSION

    return {"profile_version": PROFILE_VERSION, "measurement_version": MEASUREMENT_VERSION,
            "weights": weights_id(model_or_path, model), "model_class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "calibration": calibration_id(calib, tokenizer), "protocol": dict(protocol)}


def cache_key(parts: dict[str, Any]) -> str:
    return _sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode())


def entry_dir(name: str, key: str, root: Path | None = None) -> Path:
    """``<root>/<model name>-<16 hex digits of the key>`` (a path's last component; odd characters become ``_``)."""
    base = Path(str(name).rstrip("/\\")).name or "model"
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "model"
    return (root or profiles_root()) / f"{base[:64]}-{key[:16]}"


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _owners(profile: SensitivityProfile) -> dict[str, str]:
    """Layer -> the first layer whose token inputs are the same tensor (q/k/v, gate/up share one)."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(profile.token_inputs[n]), n) for n in profile.names if n in profile.token_inputs}


def save(directory: Path, key: str, parts: dict[str, Any], profile: SensitivityProfile,
         extra: dict[str, Any], windows: torch.Tensor | None = None) -> bool:
    """Write ``profile`` (its token-wise terms and scalars; not its input moments) and the calibration ``windows``
    it was measured on (so that the input moments can be measured later without tokenizing the text again) as the
    entry ``directory``, atomically. ``False`` (with a warning) when it could not be written; an entry already there
    is kept."""
    directory = Path(directory)
    work = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        owners = _owners(profile)
        tensors = {f"x:{o}": profile.token_inputs[o].contiguous() for o in set(owners.values())}
        tensors |= {f"s:{n}": g.contiguous() for n, g in profile.token_grads.items()}
        if windows is not None:
            tensors["windows"] = windows.contiguous()
        write_safetensors(work / TOKENS_FILE, tensors, {"format": "quantpredict-profile"})
        doc = {"format": FORMAT, "key": key, "parts": parts, "names": list(profile.names), "owners": owners,
               "shapes": {k: list(v.shape) for k, v in tensors.items()},
               "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
               "sizes": {TOKENS_FILE: (work / TOKENS_FILE).stat().st_size},
               "tokens": profile.tokens, "fp_nll": profile.fp_nll, "fp_entropy": profile.fp_entropy,
               "seconds": profile.seconds, "label_samples": profile.label_samples, "meta": profile.meta,
               "extra": extra}
        (work / PROFILE_JSON).write_text(json.dumps(doc, indent=1) + "\n")
        try:
            os.rename(work, directory)
        except OSError:
            if not (directory / PROFILE_JSON).is_file():
                raise
            shutil.rmtree(work, ignore_errors=True)  # another process wrote the same entry meanwhile
        return True
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        warnings.warn(f"could not write the profile cache entry {directory} ({type(exc).__name__}: {exc}); the "
                      "profile is used without being kept", ProfileCacheWarning, stacklevel=2)
        return False


def _discard(directory: Path, why: str) -> None:
    warnings.warn(f"profile cache entry {directory} is unusable ({why}); measuring the profile again",
                  ProfileCacheWarning, stacklevel=3)
    shutil.rmtree(directory, ignore_errors=True)


def load(directory: Path, key: str) -> tuple[SensitivityProfile, dict[str, Any]] | None:
    """The profile and the extra values saved at ``directory`` (with ``windows``, the calibration windows, if
    saved), or ``None`` if there is no entry; an unusable one
    (partial, corrupt, another key) is removed with a :class:`ProfileCacheWarning` and ``None`` returned. The
    profile's ``input_moment`` is the saved moments (read from disk on access) if the entry has them, else empty:
    :func:`attach_moments` gives it ones measured on demand."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.exists():
        return None
    try:
        doc = json.loads((directory / PROFILE_JSON).read_text())
        if doc.get("format") != FORMAT or doc.get("key") != key:
            raise ValueError(f"format {doc.get('format')!r} and key {str(doc.get('key'))[:16]!r}, expected "
                             f"{FORMAT} and {key[:16]}")
        for fname, size in doc["sizes"].items():
            got = (directory / fname).stat().st_size
            if got != int(size):
                raise ValueError(f"{fname} has {got} bytes, {size} were written")
        tensors = load_file(str(directory / TOKENS_FILE))
        if set(tensors) != set(doc["shapes"]):
            raise ValueError(f"{TOKENS_FILE} holds other tensors than were written")
        for k, t in tensors.items():
            if list(t.shape) != doc["shapes"][k] or str(t.dtype).removeprefix("torch.") != doc["dtypes"][k]:
                raise ValueError(f"{TOKENS_FILE}: {k} is {t.dtype} {list(t.shape)}, not as written")
        names = list(doc["names"])
        owners = dict(doc["owners"])
        profile = SensitivityProfile(
            names=names, input_moment={}, output_fisher={}, tokens=int(doc["tokens"]), fp_nll=float(doc["fp_nll"]),
            fp_entropy=float(doc["fp_entropy"]), seconds=float(doc["seconds"]),
            label_samples=int(doc["label_samples"]), meta=dict(doc["meta"]),
            token_inputs={n: tensors[f"x:{o}"] for n, o in owners.items()},
            token_grads={n: tensors[f"s:{n}"] for n in owners})
        extra = dict(doc.get("extra") or {})
        if "windows" in tensors:
            extra["windows"] = tensors["windows"]
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the entry, it is measured again
        _discard(directory, f"{type(exc).__name__}: {exc}")
        return None
    moments = directory / MOMENTS_DIR
    if moments.exists():
        try:
            profile.input_moment = InputMoments(moments)
        except CorruptMomentsError as exc:
            warnings.warn(f"{exc}; measuring the input moments again when a GPTQ recipe needs them",
                          ProfileCacheWarning, stacklevel=2)
            shutil.rmtree(moments, ignore_errors=True)
    return profile, extra


def moments_on_demand(model: Any, names: list[str], windows: Callable[[], torch.Tensor], target: Path | None, *,
                      batch_size: int = 1) -> Mapping[str, torch.Tensor]:
    """Every linear layer's input moment ``A`` on ``windows()``: read from ``target`` (a moments directory of a cache
    entry) where an earlier call wrote them, else a :class:`LazyInputMoments` that measures them block by block the
    first time one is read and writes them there (``target=None``: to a temporary directory). A corrupt directory is
    reported, removed and measured again; one that cannot be written is kept in a temporary directory."""
    if target is not None and target.exists():
        try:
            return InputMoments(target)
        except CorruptMomentsError as exc:
            warnings.warn(f"{exc}; measuring the input moments again when a recipe needs them", ProfileCacheWarning,
                          stacklevel=2)
            shutil.rmtree(target, ignore_errors=True)

    def measure() -> InputMoments:
        try:
            return measure_input_moments(model, windows(), batch_size=batch_size, directory=target)
        except OSError as exc:
            if target is None:
                raise
            warnings.warn(f"could not write the input moments to {target} ({exc}); keeping them in a temporary "
                          "directory", ProfileCacheWarning, stacklevel=2)
            return measure_input_moments(model, windows(), batch_size=batch_size)

    return LazyInputMoments(names, measure)


def attach_moments(profile: SensitivityProfile, model: Any, windows: Callable[[], torch.Tensor],
                   directory: Path | None, *, batch_size: int = 1) -> None:
    """Give ``profile`` its own input moments (on its calibration windows ``windows()``, the K-FAC input factor
    ``A``), measured on demand and written to ``directory/moments`` (the cache entry) or, with ``directory=None``,
    to a temporary directory; a profile whose moments were loaded from the cache keeps them. GPTQ and AWQ recipes
    are priced against the moments of their own calibration windows instead
    (:meth:`quantpredict.predict.rank.ModelProfile.calibration_hessians`, :func:`calibration_moments_dir`)."""
    if isinstance(profile.input_moment, InputMoments):
        return
    target = None if directory is None else Path(directory) / MOMENTS_DIR
    profile.input_moment = moments_on_demand(model, list(profile.names), windows, target, batch_size=batch_size)


def calibration_moments_dir(directory: Path, samples: int, seq_len: int, seed: int) -> Path:
    """Where the entry ``directory`` keeps the input moments of a recipe's calibration windows (``samples`` windows of
    ``seq_len`` tokens at ``seed``: :func:`quantpredict.data.calibration_windows`, as ``quantize_model`` cuts
    them)."""
    return Path(directory) / f"{MOMENTS_DIR}-{int(samples)}x{int(seq_len)}-seed{int(seed)}"


def embedding_head_stats(model: Any, windows: Callable[[], torch.Tensor], directory: Path | None, *, seed: int = 0,
                         scored_from: int | None = None):
    """The :class:`~quantpredict.features.embedding_head.EmbeddingHeadStats` of ``model`` on ``windows()`` (the
    profile's token windows): read from ``directory`` (the cache entry) where an earlier call wrote them, else
    measured (one forward and backward pass per window) and written there; ``directory=None`` measures without
    keeping. ``scored_from``: the profile's (:func:`~quantpredict.features.fisher.measure_profile`). A corrupt file
    is reported, removed and measured again; one that cannot be written is only not kept."""
    from safetensors.torch import load_file

    from quantpredict.features.embedding_head import EmbeddingHeadStats, measure_embedding_head

    path = None if directory is None else Path(directory) / EMBEDDING_HEAD_FILE
    if path is not None and path.is_file():
        try:
            return EmbeddingHeadStats.from_tensors(load_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, it is measured again
            warnings.warn(f"{path} is unusable ({type(exc).__name__}: {exc}); measuring it again",
                          ProfileCacheWarning, stacklevel=2)
            path.unlink(missing_ok=True)
    stats = measure_embedding_head(model, windows(), seed=seed, scored_from=scored_from)
    if path is not None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:  # through a temporary name: a killed write leaves no half file under the real one
            write_safetensors(tmp, stats.tensors(), {"format": "quantpredict-embedding-head"})
            os.replace(tmp, path)
        except (OSError, RuntimeError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"could not write {path} ({type(exc).__name__}: {exc}); the statistics are used without "
                          "being kept", ProfileCacheWarning, stacklevel=2)
    return stats
