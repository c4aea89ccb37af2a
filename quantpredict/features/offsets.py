"""What runs inside each linear's forward while the features are measured: the streamed statistics behind the
output SQNRs (:func:`capture_quadratics`, never an ``[in, in]`` Hessian) and the weight offsets (:func:`offset_weights`,
:func:`along_direction`, :class:`SeededNoise`) that move the model without writing its stored weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from quantpredict import arch

# A layer whose quantization error is exactly zero would have an infinite SQNR; features must stay finite, so
# SQNRs are capped here (far above anything a <= 8-bit format reaches, ~6 dB per bit).
SQNR_CAP_DB = 300.0


def sqnr_db(signal: float, noise: float) -> float:
    if signal <= 0.0:
        return 0.0
    if noise <= signal * 10 ** (-SQNR_CAP_DB / 10):
        return SQNR_CAP_DB
    return 10.0 * math.log10(signal / noise)


class Quadratics:
    """Per linear, the running sums ``||X W^T||^2`` and ``||X delta^T||^2`` over the tokens of its FP input ``X``:
    ``tr(W H W^T)`` and ``tr(delta H delta^T)`` with ``H = 2/N X^T X``, without ever forming ``H`` ([in, in]).
    Products are taken in float32 (float64 for a float64 model) per batch and summed in float64."""

    def __init__(self, refs: Sequence[arch.LinearRef], deltas: Sequence[torch.Tensor]):
        self.refs, self.deltas = list(refs), list(deltas)
        self.sums = {r.name: [0.0, 0.0] for r in self.refs}
        self.tokens = {r.name: 0 for r in self.refs}

    def add(self, ref: arch.LinearRef, delta: torch.Tensor, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, ref.in_features)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        sums = self.sums[ref.name]
        sums[0] += float((x @ ref.weight.detach().to(x.dtype).T).double().pow(2).sum())
        sums[1] += float((x @ delta.to(x.device, x.dtype).T).double().pow(2).sum())
        self.tokens[ref.name] += x.shape[0]

    def traces(self) -> dict[str, tuple[float, float]]:
        """``{name: (tr(W H W^T), tr(delta H delta^T))}`` with ``H = 2/N X^T X``."""
        out = {}
        for name, (sw, sd) in self.sums.items():
            n = self.tokens[name]
            if n == 0:
                raise ValueError("no inputs were captured: run a forward pass inside capture_quadratics")
            out[name] = (sw * 2.0 / n, sd * 2.0 / n)
        return out


@contextlib.contextmanager
def capture_quadratics(refs: Sequence[arch.LinearRef], deltas: Sequence[torch.Tensor]) -> Iterator[Quadratics]:
    """Hook the inputs of ``refs``; forward passes inside the ``with`` fill the :class:`Quadratics`."""
    stats = Quadratics(refs, deltas)
    delta_of = {id(ref): delta for ref, delta in zip(refs, deltas, strict=True)}
    with arch.input_hooks(refs, lambda ref, x: stats.add(ref, delta_of[id(ref)], x)):
        yield stats


@contextlib.contextmanager
def offset_weights(refs: Sequence[arch.LinearRef], offset: Any) -> Iterator[None]:
    """Inside the ``with``, each linear ``refs[i]`` computes with ``W_i + offset(i)`` (``offset(i)`` in the
    parameter's storage layout, or ``None`` for no offset) without the stored weight ever being written: the moved
    weight exists only during that module's forward (one layer's worth of memory), and the weights are bitwise
    what they were whatever happens. The values equal those of adding the offsets in place (same elementwise sum).
    """
    saved: dict[int, torch.Tensor] = {}
    handles = []
    for i, ref in enumerate(refs):
        def pre(module, _args, _i=i):
            d = offset(_i)
            if d is not None:
                saved[_i] = module.weight.data
                module.weight.data = saved[_i] + d.to(saved[_i].dtype)

        def post(module, _args, _out, _i=i):
            if _i in saved:
                module.weight.data = saved.pop(_i)

        handles += [ref.module.register_forward_pre_hook(pre), ref.module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        for i, data in saved.items():
            refs[i].module.weight.data = data


@contextlib.contextmanager
def along_direction(refs: Sequence[arch.LinearRef], deltas: Sequence[torch.Tensor], t: torch.Tensor) -> Iterator[None]:
    """Inside the ``with``, each linear computes ``y + t * (x delta^T)`` (``delta`` ``[out, in]``): the model at
    ``W + t delta`` to first order in every op, exactly as a function of ``t``, so autograd w.r.t. the scalar ``t``
    gives ``g . delta`` and ``delta^T H delta``. At ``t = 0`` the output is bitwise the unmoved one."""
    handles = []
    for ref, delta in zip(refs, deltas, strict=True):
        def hook(_module, args, out, _delta=delta):
            return out + t * _StoredLinear.apply(args[0], _delta)

        handles.append(ref.module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _StoredLinear(torch.autograd.Function):
    """``x @ d^T`` with ``d`` ``[out, in]`` a constant kept in its storage dtype (e.g. a bf16 quantization
    direction): it is upcast to ``x``'s dtype inside each forward and backward and only the stored tensor is saved,
    so the autograd graph never holds a float32 copy of every layer's direction. Differentiable to any order in
    ``x`` (its backward is :class:`_StoredLinearT`, whose backward is this)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d)
        return F.linear(x, d.to(x.dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (d,) = ctx.saved_tensors
        return _StoredLinearT.apply(g, d), None


class _StoredLinearT(torch.autograd.Function):
    """``g @ d`` (the backward of :class:`_StoredLinear`), ``d`` kept in its storage dtype."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d)
        return g @ d.to(g.dtype)

    @staticmethod
    def backward(ctx, u: torch.Tensor):
        (d,) = ctx.saved_tensors
        return _StoredLinear.apply(u, d), None


class SeededNoise:
    """The sharpness group's random direction, layer by layer, without holding it: ``z_i ~ N(0, 1)`` drawn in
    float64 from one generator in layer order and scaled to ``||delta_i||``. Each layer's generator state and scale
    are kept, so layer ``i`` is redrawn on demand bit for bit (and kept, up to ``cache_bytes``)."""

    def __init__(self, deltas: Sequence[torch.Tensor], generator: torch.Generator, cache_bytes: int,
                 dtypes: Sequence[torch.dtype] | None = None):
        self.shapes = [d.shape for d in deltas]
        self.dtypes = list(dtypes) if dtypes is not None else [d.dtype for d in deltas]
        self.devices = [d.device for d in deltas]
        self.states: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        for d in deltas:
            self.states.append(generator.get_state())
            z = torch.randn(d.shape, generator=generator, dtype=torch.float64)
            self.scales.append(d.double().norm().cpu() / z.norm())
        self.cache: dict[int, torch.Tensor] = {}
        self.cache_left = cache_bytes

    def __call__(self, i: int) -> torch.Tensor:
        if i in self.cache:
            return self.cache[i]
        g = torch.Generator().set_state(self.states[i])
        z = torch.randn(self.shapes[i], generator=g, dtype=torch.float64)
        out = (z * self.scales[i]).to(self.dtypes[i]).to(self.devices[i])
        if out.numel() * out.element_size() <= self.cache_left:
            self.cache[i] = out
            self.cache_left -= out.numel() * out.element_size()
        return out
