"""llama.cpp's GGUF tensor names of a Hugging Face model's linear layers, from its config alone (no converted
file): gguf's own name map of the model's architecture, the map llama.cpp's converter names tensors by. Shared by
:mod:`quantpredict.export` (the file it writes) and :mod:`quantpredict.imatrix` (importance matrices are keyed by
these names), below both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quantpredict.errors import ModelError, ResourceError


def require_gguf() -> None:
    """The ``gguf`` package (the reader and writer of the rewrite), or a one-line error saying how to install it."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ResourceError("export needs the gguf package: pip install 'quantpredict[export]' (or gguf==0.19.0)") \
            from None


def gguf_arch_name(model_type: str) -> str:
    """gguf's architecture name (``general.architecture`` of the converted file) for a Hugging Face ``model_type``,
    known from the config alone: the name in ``gguf.MODEL_ARCH_NAMES`` equal to it once ``_`` and ``-`` are dropped
    and case is ignored (``llama``, ``gpt2``, ``gpt_neox`` -> ``gptneox``). A :class:`ModelError` if none is. The
    converter's own class may name another architecture for a model type; :func:`quantpredict.export.export_gguf`
    reads the converted file's and uses that."""
    import gguf

    def norm(text: str) -> str:
        return text.lower().replace("_", "").replace("-", "")

    for name in gguf.MODEL_ARCH_NAMES.values():
        if norm(name) == norm(model_type):
            return name
    raise ModelError(f"no GGUF architecture for the model type {model_type!r} in the gguf package; llama.cpp's "
                     "tensor names of this model are not known")


def gguf_tensor_names(arch_name: str, n_blocks: int, layer_names: Sequence[str], *, model: str = "the model"
                      ) -> dict[str, str]:
    """``{Hugging Face linear name: GGUF tensor name}`` for ``layer_names`` by gguf's own name map of the
    architecture ``arch_name`` (a ``general.architecture`` value) with ``n_blocks`` blocks: the map llama.cpp's
    converter names the tensors by. Needs no converted file."""
    import gguf

    arch_ids = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch_name not in arch_ids:
        raise ModelError(f"the gguf package ({gguf.__name__}) does not know architecture {arch_name!r} of the "
                         "converted file; upgrade gguf")
    names = gguf.get_tensor_name_map(arch_ids[arch_name], n_blocks)
    out = {}
    for layer in layer_names:
        name = names.get_name(layer + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise ModelError(f"{model}: no GGUF tensor name for {layer} in gguf's map of {arch_name}")
        out[layer] = name
    return out


def model_gguf_names(model: Any, layer_names: Sequence[str]) -> dict[str, str]:
    """:func:`gguf_tensor_names` of a loaded Hugging Face ``model`` (its ``config.model_type`` and block count)."""
    from quantpredict import arch

    require_gguf()
    return gguf_tensor_names(gguf_arch_name(model.config.model_type), len(arch.blocks(model)), layer_names,
                             model=getattr(model.config, "name_or_path", "") or type(model).__name__)
