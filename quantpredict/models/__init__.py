"""Loading models: the project's own zoo by name, or any Hugging Face causal LM directory on disk.

Nothing here downloads: hub ids are refused with a message that says how to point at a local copy. Before anything
loads, :func:`check_model_dir` checks the directory (config, whole weights, tokenizer) from file headers alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from quantpredict.errors import ModelError
from quantpredict.models import checks

__all__ = ["check_model_dir", "checkpoint_dtype", "list_zoo", "load", "resolve", "resolve_for_models", "skeleton",
           "tensor_shapes", "zoo_card", "zoo_root"]


def zoo_root() -> Path:
    """``<data folder>/zoo`` (it may not exist: a local model directory needs no data folder)."""
    from quantpredict.data import DATA_DIR

    return DATA_DIR / "zoo"


def _card(path: Path) -> dict:
    try:
        return json.loads((path / "zoo_card.json").read_text())
    except (OSError, ValueError):
        return {}


def list_zoo() -> list[str]:
    """Names of the trained zoo models present on disk, smallest (non-embedding parameters) first."""
    root = zoo_root()
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p / "zoo_card.json").exists()
             and (p / "model.safetensors").exists()]
    return [p.name for p in sorted(found, key=lambda p: (_card(p).get("n_params_nonembed", 0), p.name))]


def zoo_card(name: str) -> dict:
    """The ``zoo_card.json`` facts of a zoo or imported model (family, parameters, tokens, perplexities, source)."""
    from quantpredict.models.imported import imported_path, list_imported

    path = zoo_root() / name
    if not (path / "zoo_card.json").exists():
        path = imported_path(name)
        if path is None:
            raise ModelError(f"{name!r} is not a zoo model; zoo models: {', '.join(list_zoo()) or '(none built)'}"
                             f"; imported models: {', '.join(list_imported()) or '(none)'}")
    return _card(path)


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The model directory for a zoo name, an imported registry model (``smollm2-135m``, imported on first use) or a
    local path; a clear error for anything else."""
    from quantpredict.models.imported import resolve_imported

    text = str(name_or_path)
    zoo_path = zoo_root() / text
    if "/" not in text and (zoo_path / "config.json").exists():
        return zoo_path
    if "/" not in text:
        imported = resolve_imported(text)
        if imported is not None:
            return imported
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a directory but holds no config.json, so it is not a Hugging Face model "
                             "directory; point at the folder that contains config.json and the weights")
        return path
    if path.exists():
        raise ModelError(f"{path} is a file; pass the Hugging Face model directory that contains it")
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    hint = (f" It looks like a Hugging Face hub id: quantpredict never downloads. Download it on a machine with "
            f"network access (e.g. `huggingface-cli download {text} --local-dir ./{text.split('/')[-1]}`) and pass "
            f"that local directory.") if looks_like_hub_id else ""
    raise ModelError(f"no model {text!r}: tried the zoo ({zoo_path}) and the local path {path.resolve()}.{hint} "
                     f"Zoo models: {', '.join(list_zoo()) or _no_zoo()}")


def _no_zoo() -> str:
    """What an error says about an empty zoo: build it, or, when there is no data folder (an installed package
    without $QUANTPREDICT_DATA), why: `zoo build` needs that folder too."""
    from quantpredict.data import data_problem

    problem = data_problem()
    return f"none ({problem})" if problem else "(none built; run `quantpredict zoo build`)"


def check_model_dir(name_or_path: str | os.PathLike, *, tokenizer: bool = True) -> Path:
    """Resolve ``name_or_path`` (zoo name, imported model or directory) and check, from file headers alone, that it
    can be loaded: ``config.json`` parses, the safetensors weights (every shard) are whole and not foreign files,
    and, with ``tokenizer``, a tokenizer file is there (:func:`quantpredict.models.checks.check_files`). Returns the
    directory; a :class:`ModelError` names the file and the fix. Every command that takes a model calls this before
    it loads one."""
    path = resolve(name_or_path)
    checks.check_files(path, tokenizer=tokenizer)
    return path


def tensor_shapes(name_or_path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a model's safetensors weights, from their headers alone (no weight is read)."""
    return checks.tensor_shapes(resolve(name_or_path))


def skeleton(name_or_path: str | os.PathLike):
    """The model's module tree built from its config on the meta device: names and shapes, no weights (what a
    per-layer recipe such as a named mix needs to be resolved, in milliseconds)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises several types for unreadable configs
        raise ModelError(f"{path}: config.json could not be read as a Hugging Face config ({exc})") from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()


def resolve_for_models(models: Sequence[str], mix_specs: Sequence[str]) -> dict:
    """``{model: [recipe of each named mix]}`` for zoo names or model directories, from their module trees alone
    (:func:`skeleton`: no weights are read). It lives here, not in :mod:`quantpredict.mixes`, because it loads
    model trees, and the mixes sit below the models in the layers."""
    from quantpredict.mixes import named_mix

    if not mix_specs:
        return {}
    out = {}
    for m in models:
        tree = skeleton(m)
        out[m] = [named_mix(spec, tree) for spec in mix_specs]
    return out


def checkpoint_dtype(config):
    """The dtype a checkpoint's config records (``dtype`` / ``torch_dtype``), float32 when it records none."""
    import torch

    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def load(name_or_path: str | os.PathLike, *, dtype=None, attn_implementation: str | None = None, device=None):
    """Load ``(model, tokenizer)`` for a zoo name or a local HF causal-LM directory, in ``eval()`` mode.

    ``dtype`` defaults to ``torch.float32``; ``"bf16"``/``"fp32"`` (or a torch dtype) choose another, ``"auto"``
    keeps the checkpoint's own (a bf16 checkpoint stays bf16: half the memory). ``device`` (``"cuda"``, ``"cuda:1"``;
    default CPU) is checked first: an unavailable one raises :class:`~quantpredict.errors.DeviceError`. A directory
    written by ``quantize.save_quantized`` with activation quantization gets its activation fake-quant hooks
    re-installed, so it evaluates as it was quantized.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quantpredict.memory import resolve_device, resolve_dtype

    target = resolve_device(device, flag="device")
    path = check_model_dir(name_or_path)  # a corrupt or incomplete directory fails here, before a weight is read
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises several types for unreadable configs
        raise ModelError(f"{path}: config.json could not be read as a Hugging Face config ({exc})") from exc
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        dtype = checkpoint_dtype(config)
    else:
        import torch

        dtype = resolve_dtype(dtype, flag="dtype") or torch.float32
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ModelError(f"{path} holds a {', '.join(archs)}, not a causal language model; quantpredict needs a "
                         "*ForCausalLM / *LMHeadModel checkpoint")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar for models that load in milliseconds
    kwargs = {"dtype": dtype, "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # the checkpoint's fault, not quantpredict's
        raise ModelError(f"{path} could not be loaded as a causal LM with its tokenizer ({type(exc).__name__}: "
                         f"{exc}); {'re-create it' if (path / 'quantization.json').exists() else 're-download it'}"
                         ) from exc
    model.eval()
    if target.type != "cpu":
        model.to(target)
    qjson = path / "quantization.json"
    if qjson.exists():
        from quantpredict.quantize import Recipe, install_act_quant

        recipe = Recipe.from_dict(json.loads(qjson.read_text())["recipe"])
        if recipe.act_format:
            install_act_quant(model, recipe)
    return model, tokenizer
