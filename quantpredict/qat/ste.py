"""Straight-through-estimator (STE) fake quantization of weights and activations, for training.

:func:`attach_weight_ste` puts a ``torch.nn.utils.parametrize`` parametrization on the ``weight`` of each given linear
layer: the layer keeps a float *latent* weight (``module.parametrizations.weight.original``, the tensor the optimizer
updates) and every forward pass uses ``fake_quantize(latent)`` in the recipe's format and block size, while the
backward pass treats the rounding as the identity (``latent + (Q(latent) - latent).detach()``; Bengio et al. 2013).
Scales are re-fitted from the latent weight on every forward, exactly as :func:`quantpredict.formats.fake_quantize`
(and so RTN) fits them; their dependence on the latent weight is not differentiated.

:func:`detach_weight_ste` removes the parametrizations and leaves ``fake_quantize(latent)`` as the plain weight, so
the model comes back with every weight on the format's grid.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from quantpredict.arch import LinearRef


class WeightSTE(nn.Module):
    """``latent -> latent + (fake_quantize(latent) - latent).detach()`` for a weight stored as ``[out, in]``.

    ``transposed`` is true for GPT-2's ``Conv1D``, which stores ``[in, out]``; blocks always run along ``in``.
    """

    def __init__(self, fmt: str, block_size: int | None, transposed: bool = False):
        super().__init__()
        self.fmt = fmt
        self.block_size = block_size
        self.transposed = transposed

    def quantize(self, latent: torch.Tensor) -> torch.Tensor:
        """``fake_quantize`` of a stored latent weight (same layout as stored), without autograd history."""
        from quantpredict.formats import fake_quantize

        w = latent.detach()
        w = w.t() if self.transposed else w
        q = fake_quantize(w, self.fmt, axis=-1, block_size=self.block_size)
        return q.t() if self.transposed else q

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return latent + (self.quantize(latent) - latent).detach()


def attach_weight_ste(refs: Sequence[LinearRef], fmt: str, block_size: int | None) -> list[nn.Parameter]:
    """Parametrize the weight of every layer in ``refs`` with :class:`WeightSTE`; returns the latent parameters.

    The latent weight starts at the layer's current weight. Layers already parametrized are refused (a ValueError):
    nesting two STEs would quantize twice.
    """
    latents = []
    for ref in refs:
        if parametrize.is_parametrized(ref.module, "weight"):
            raise ValueError(f"{ref.name}: weight is already parametrized; detach the earlier STE first")
        parametrize.register_parametrization(ref.module, "weight", WeightSTE(fmt, block_size, ref.transposed))
        latents.append(ref.module.parametrizations.weight.original)
    return latents


def latent_parameter(ref: LinearRef) -> nn.Parameter:
    """The latent (float) weight behind a parametrized layer, as stored (``[in, out]`` for ``Conv1D``)."""
    return ref.module.parametrizations.weight.original


def detach_weight_ste(refs: Sequence[LinearRef]) -> None:
    """Remove the STE parametrizations; each weight becomes ``fake_quantize(latent)``, a plain parameter."""
    for ref in refs:
        if parametrize.is_parametrized(ref.module, "weight"):
            requires_grad = latent_parameter(ref).requires_grad
            with torch.no_grad():
                parametrize.remove_parametrizations(ref.module, "weight", leave_parametrized=True)
            ref.module.weight.requires_grad_(requires_grad)


@contextmanager
def activation_ste(refs: Sequence[LinearRef], fmt: str | None, block_size: int | None) -> Iterator[None]:
    """While inside: the inputs of ``refs`` are fake-quantized to ``fmt`` with a straight-through gradient.

    The run-time activation quantization of :mod:`quantpredict.quantize.act` returns a tensor without autograd
    history, which would stop every gradient below the first quantized layer; for training it is taken off these
    layers, replaced by an STE hook here, and put back (from the recipe) by the caller afterwards. ``fmt=None``: no-op.
    """
    if fmt is None:
        yield
        return
    from quantpredict.formats import fake_quantize
    from quantpredict.quantize import act

    for ref in refs:  # take the detaching run-time hooks off (they are re-installed from the recipe afterwards)
        old = getattr(ref.module, act._ATTR, None)
        if old is not None:
            old.remove()
            delattr(ref.module, act._ATTR)

    def hook(_module, args):
        x = args[0]
        q = fake_quantize(x.detach(), fmt, axis=-1, block_size=block_size)
        return (x + (q - x).detach(), *args[1:])

    handles = [ref.module.register_forward_pre_hook(hook) for ref in refs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
