"""The generic walk: an :class:`~quantpredict.arch.table.Adapter` for a model type the table does not have.

Its decoder blocks are the longest ``nn.ModuleList`` of identical blocks holding linears, their linears are
recorded in execution order by hooks on an 8-token dummy forward (module order when that forward fails), and
SmoothQuant is refused (no norm pairs are known); one :class:`~quantpredict.arch.table.GenericArchitectureWarning`
says what was found. Left out, with a clear error instead:

* mixture-of-experts types (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``phimoe``, ``dbrx``,
  ``deepseek_v2``/``v3``, ``granitemoe``, ``jamba``, ``gpt_oss``, ``llama4`` ...; in general any block holding
  3-D weights): the experts are stored as 3-D parameters, not linear layers, and quantizing them right needs
  per-expert calibration on the tokens routed to each expert, which the block-by-block calibration here lacks;
* composite (multimodal) models, e.g. ``gemma3`` (``Gemma3ForConditionalGeneration``): the longest block list may
  be the vision tower's; load the text model as a causal LM (``Gemma3ForCausalLM``, type ``gemma3_text``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantpredict.arch.table import (
    Adapter,
    GenericArchitectureWarning,
    model_type_of,
    module_at,
    supported_list,
)
from quantpredict.errors import UnsupportedArchitectureError

#: the module types a linear layer may be (GPT-2's ``Conv1D`` stores its weight as ``[in, out]``)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)

_DUMMY_TOKENS = 8


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def find_block_list(model: nn.Module) -> str | None:
    """Path of the decoder blocks: the longest ``nn.ModuleList`` of blocks of one class that hold linear layers,
    not nested in another such list (the first in module order on a tie); ``None`` when there is none."""
    found: list[tuple[str, int]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(b) for b in mod}) != 1:
            continue
        if _is_linear(mod[0]) or not all(any(_is_linear(m) for m in b.modules()) for b in mod):
            continue
        if any(_inside(name, outer) for outer, _ in found):
            continue
        found.append((name, len(mod)))
    return max(found, key=lambda f: f[1])[0] if found else None


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target and n), None)


def _norm_like(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _dummy_forward(model: nn.Module, blocks_path: str, block0: nn.Module,
                   names: list[str]) -> tuple[list[str], list[str]] | None:
    """Hooks on a dummy forward of ``_DUMMY_TOKENS`` tokens: block 0's linears in the order they first ran, and the
    modules outside the blocks that started after the last block ended (in order); ``None`` if it fails."""
    order: list[str] = []
    after: list[str] = []
    ended: list[bool] = []
    handles = []

    def on_linear(name: str):
        return lambda _m, _a: None if name in order else order.append(name)

    def on_outer(name: str):
        return lambda _m, _a: after.append(name) if ended else None

    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # no dropout; the per-module modes are put back below
        for name in names:
            handles.append(module_at(block0, name).register_forward_pre_hook(on_linear(name)))
        for name, mod in model.named_modules():
            if name and not _inside(name, blocks_path):
                handles.append(mod.register_forward_pre_hook(on_outer(name)))
        handles.append(module_at(model, blocks_path)[-1].register_forward_hook(lambda *_: ended.append(True)))
        param = next(model.parameters())
        vocab = int(getattr(model.config, "vocab_size", _DUMMY_TOKENS + 1) or _DUMMY_TOKENS + 1)
        ids = (torch.arange(1, _DUMMY_TOKENS + 1, device=param.device) % vocab).unsqueeze(0)
        with torch.no_grad():
            model(ids)
    except Exception:  # noqa: BLE001 - any failure of an unknown model's forward means: use module order
        return None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return order, after


def generic_adapter(model: nn.Module, *, warn: bool = True) -> Adapter:
    """An :class:`Adapter` found by walking ``model`` (see the module docstring); emits one
    :class:`GenericArchitectureWarning` naming the model type and what was found unless ``warn`` is false.

    Linears are block 0's ``nn.Linear``/``Conv1D`` modules in the order a dummy forward runs them (linears that never
    run are left out); when that forward fails, in module order. The final norm is the last norm-like module that
    runs between the last block and the head (module order: the last norm-like module outside the blocks). No
    SmoothQuant pairs are known.
    """
    model_type = model_type_of(model)
    where = f"architecture {model_type!r} ({type(model).__name__})"
    if getattr(getattr(model, "config", None), "text_config", None) is not None:
        raise UnsupportedArchitectureError(
            f"{where} is a composite (multimodal) model; load its text model as a causal LM; {supported_list()}")
    path = find_block_list(model)
    if path is None:
        raise UnsupportedArchitectureError(
            f"{where} is not supported: it has no adapter, and the generic walk found no list of decoder blocks "
            f"(an nn.ModuleList of identical blocks holding nn.Linear/Conv1D layers); {supported_list()}. Add an "
            "adapter in quantpredict/arch/table.py to support it.")
    block_list = module_at(model, path)
    block0 = block_list[0]
    three_d = [n for n, p in block0.named_parameters() if p.dim() >= 3]
    if three_d:
        raise UnsupportedArchitectureError(
            f"{where} is not supported: its blocks hold 3-D weights ({', '.join(three_d[:3])}), as "
            f"mixture-of-experts models do, which are not linear layers; {supported_list()}")
    names = [n for n, m in block0.named_modules() if n and _is_linear(m)]
    for i, block in enumerate(block_list):
        other = [n for n, m in block.named_modules() if n and _is_linear(m)]
        if other != names:
            raise UnsupportedArchitectureError(
                f"{where} is not supported: block {i} of {path!r} has other linear layers than block 0; "
                f"{supported_list()}")

    head_name = _module_name(model, model.get_output_embeddings() if hasattr(model, "get_output_embeddings")
                             else None)
    if head_name is None:
        raise UnsupportedArchitectureError(f"{where} is not supported: no output embedding (LM head) was found; "
                                           f"{supported_list()}")
    outside = [(n, m) for n, m in model.named_modules() if n and not _inside(n, path)]
    embeddings = tuple(n for n, m in outside if isinstance(m, nn.Embedding) and n != head_name)

    ran = _dummy_forward(model, path, block0, names)
    if ran is None:
        linears, source = tuple(names), "module order (the dummy forward failed)"
        norms = [n for n, m in outside if _norm_like(m)]
    else:
        order, after = ran
        linears, source = tuple(order), "forward order"
        before_head = after[: after.index(head_name)] if head_name in after else after
        modules = dict(outside)
        norms = [n for n in before_head if _norm_like(modules[n])]
    if not linears:
        raise UnsupportedArchitectureError(f"{where} is not supported: no linear layer of its blocks ran; "
                                           f"{supported_list()}")
    final = norms[-1] if norms else ""
    hidden_attr = next((a for a in ("hidden_size", "n_embd", "d_model") if hasattr(model.config, a)), "hidden_size")
    unused = [n for n in names if n not in linears]
    reason = (f"model type {model_type!r} has no adapter and was walked generically, so no norm -> linear pairs are "
              "known; add an adapter for it in quantpredict/arch/table.py")
    found = Adapter(family=str(model_type), blocks=path, embeddings=embeddings, head=head_name, final_norm=final,
                    linears=linears, smooth_pairs=(), hidden_size_attr=hidden_attr, smoothquant_unsupported=reason,
                    notes=f"generic walk, linears in {source}", generic=True)
    if warn:
        warnings.warn(GenericArchitectureWarning(
            f"model type {model_type!r} has no adapter in quantpredict/arch/table.py; walked generically: blocks "
            f"{path!r} ({len(block_list)} x {type(block0).__name__}), {len(linears)} linears per block in {source} "
            f"({', '.join(linears)})" + (f", {len(unused)} never ran and are left out ({', '.join(unused)})"
                                         if unused else "")
            + f", embeddings {list(embeddings)}, head {head_name!r}, final norm {final or 'none (identity)'!r}. "
            "SmoothQuant is unavailable for it; check this walk, or add an adapter."), stacklevel=3)
    return found
