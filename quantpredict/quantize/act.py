"""Activation fake-quantization: the inputs of quantized linear layers cast to a format at run time.

Blocks run along the hidden (last) dimension: MX blocks of ``act_block_size`` (32 by default) consecutive channels of
one token share a scale; per-channel INT/FP8 formats get one scale per token (dynamic per-token quantization).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from quantpredict.arch import LinearRef

_ATTR = "_quantpredict_act_quant"


@dataclass
class ActQuantHandle:
    """The hooks :func:`install_act_quant` registered; ``remove()`` takes them all off."""

    fmt: str
    block_size: int | None
    names: list[str] = field(default_factory=list)
    _handles: list = field(default_factory=list, repr=False)
    _modules: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        mine = {id(h) for h in self._handles}
        for m in self._modules:
            if id(getattr(m, _ATTR, None)) in mine:  # not a newer handle that replaced ours
                delattr(m, _ATTR)
        self._handles.clear()
        self._modules.clear()
        self.names.clear()


def install_act_quant_on(refs: Sequence[LinearRef], fmt: str, block_size: int | None = None) -> ActQuantHandle:
    """Fake-quantize the inputs of ``refs`` to ``fmt`` at run time (replacing any earlier act-quant hook on them)."""
    from quantpredict.formats import fake_quantize, get_format

    get_format(fmt)
    handle = ActQuantHandle(fmt, block_size)
    for ref in refs:
        old = getattr(ref.module, _ATTR, None)
        if old is not None:
            old.remove()

        def hook(_module, args):
            return (fake_quantize(args[0], fmt, axis=-1, block_size=block_size), *args[1:])

        h = ref.module.register_forward_pre_hook(hook)
        setattr(ref.module, _ATTR, h)
        handle._handles.append(h)
        handle._modules.append(ref.module)
        handle.names.append(ref.name)
    return handle


def install_act_quant(model: nn.Module, recipe) -> ActQuantHandle | None:
    """Install ``recipe.act_format`` on every linear layer the recipe quantizes; ``None`` if it has no act_format.

    ``quantpredict.models.load`` calls this (through :func:`quantpredict.quantize.apply_saved_quantization`) for a
    saved directory whose ``quantization.json`` names an act_format: the hooks are not part of the weights.
    """
    from quantpredict.quantize.plan import quantized_linears

    if recipe.act_format is None:
        return None
    return install_act_quant_on(quantized_linears(model, recipe), recipe.act_format, recipe.act_block_size)


def has_act_quant(module: nn.Module) -> bool:
    return getattr(module, _ATTR, None) is not None


def remove_act_quant(model: nn.Module) -> int:
    """Take every activation fake-quant hook (installed by this module) off ``model``; returns how many."""
    n = 0
    for m in model.modules():
        h = getattr(m, _ATTR, None)
        if h is not None:
            h.remove()
            delattr(m, _ATTR)
            n += 1
    return n
