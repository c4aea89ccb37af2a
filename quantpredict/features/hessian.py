"""Hessian-vector products and the two estimators built on them: Hutchinson's trace and power iteration.

Everything here takes ``loss_fn``, a zero-argument closure returning a scalar loss, and ``params``, the list of
tensors (``requires_grad=True``) the Hessian is taken with respect to. Vectors are lists of tensors shaped like
``params``. Second derivatives are taken by double backward, so the loss must be twice differentiable through every
op it uses (for Hugging Face models: eager attention, not PyTorch's CPU SDPA kernel).

:class:`HessianOperator` builds the gradient graph once and applies ``H`` to as many vectors as wanted, each costing
one extra backward pass through the retained graph instead of a fresh forward + backward + backward.

When the loss is a sum over micro-batches (``L = sum_i L_i``, e.g. the mean NLL over windows split into groups of
windows), so are its gradient and its Hessian-vector products: :class:`AccumulatedHessianOperator` holds one
micro-batch's graph at a time (forward, gradient with ``create_graph``, gradient of ``g . v``, accumulate, free),
and :func:`directional_derivatives` gives ``L``, ``dL/dt`` and ``d2L/dt2`` along one direction without any
parameter-sized vector at all. Memory is then that of one micro-batch, whatever the number of windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

LossFn = Callable[[], torch.Tensor]
Vectors = list[torch.Tensor]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inner product of two lists of same-shaped tensors, accumulated in float64 (a 0-d tensor)."""
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))


def _check_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is empty: pass the tensors the Hessian is taken with respect to")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad; set requires_grad_(True)")
    return params


class HessianOperator:
    """``v -> H v`` for the Hessian of ``loss_fn()`` w.r.t. ``params`` at their current values.

    Construction runs one forward and one backward pass with ``create_graph=True`` and keeps the graph; each
    :meth:`apply` is then one backward pass through it. ``loss`` and ``grad`` (detached) come for free.
    Do not modify ``params`` while the operator is alive: it describes the point where it was built.
    """

    def __init__(self, loss_fn: LossFn, params: Sequence[torch.Tensor]):
        self.params = _check_params(params)
        loss = loss_fn()
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        self._grads = torch.autograd.grad(loss, self.params, create_graph=True)
        self.loss = float(loss.detach())
        self.grad: Vectors = [g.detach() for g in self._grads]
        self.n_products = 0

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def apply(self, vectors: Sequence[torch.Tensor]) -> Vectors:
        """``H v`` for ``v`` shaped like ``params``."""
        vectors = [v.to(p.dtype) for v, p in zip(vectors, self.params, strict=True)]
        dot = sum((g * v).sum() for g, v in zip(self._grads, vectors))
        out = torch.autograd.grad(dot, self.params, retain_graph=True, allow_unused=True)
        self.n_products += 1
        # a parameter the gradient does not depend on (e.g. the loss is linear in it) has a zero Hessian row
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(out, self.params)]

    def release(self) -> None:
        """Free the retained graph (the operator can no longer apply)."""
        self._grads = None  # type: ignore[assignment]


class AccumulatedHessianOperator:
    """``v -> H v`` for the Hessian of ``sum_i loss_fns[i]()`` w.r.t. ``params``, one micro-batch graph at a time.

    Same interface as :class:`HessianOperator` (``params``, ``loss``, ``grad``, ``numel``, ``apply``, ``release``,
    ``n_products``). Construction runs a forward and a backward pass per micro-batch (no ``create_graph``) and sums
    the losses (float64) and gradients; each :meth:`apply` runs, per micro-batch, a forward pass, a gradient with
    ``create_graph`` and the gradient of ``g_i . v``, adds ``H_i v`` to the result and frees that graph. Sums are
    kept in the parameters' dtype promoted to at least float32. Costs a forward pass per micro-batch per product
    more than the retained graph; holds one micro-batch's graph instead of all of them.
    """

    def __init__(self, loss_fns: Sequence[LossFn], params: Sequence[torch.Tensor]):
        self.params = _check_params(params)
        self.loss_fns = list(loss_fns)
        if not self.loss_fns:
            raise ValueError("loss_fns is empty: pass one loss closure per micro-batch")
        self.n_products = 0
        total = 0.0
        grad = [torch.zeros_like(p, dtype=_acc_dtype(p)) for p in self.params]
        for fn in self.loss_fns:
            loss = _scalar(fn())
            parts = torch.autograd.grad(loss, self.params, allow_unused=True)
            for acc, part in zip(grad, parts):
                if part is not None:
                    acc += part
            total += float(loss.detach())
        self.loss = total
        self.grad: Vectors = [g.to(p.dtype) for g, p in zip(grad, self.params)]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def apply(self, vectors: Sequence[torch.Tensor]) -> Vectors:
        """``H v`` for ``v`` shaped like ``params``: the sum over micro-batches of ``H_i v``."""
        vectors = [v.to(p.dtype) for v, p in zip(vectors, self.params, strict=True)]
        out = [torch.zeros_like(p, dtype=_acc_dtype(p)) for p in self.params]
        for fn in self.loss_fns:
            loss = _scalar(fn())
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vectors) if g is not None and g.requires_grad)
            if not torch.is_tensor(dot):  # the loss is linear in every parameter: this micro-batch's H is zero
                continue
            parts = torch.autograd.grad(dot, self.params, allow_unused=True)
            for acc, part in zip(out, parts):
                if part is not None:
                    acc += part
            del loss, grads, dot, parts
        self.n_products += 1
        return [h.to(p.dtype) for h, p in zip(out, self.params)]

    def release(self) -> None:
        """Nothing is retained between products; kept for :class:`HessianOperator`'s interface."""


def _acc_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    return loss


def directional_derivatives(loss_fns: Iterable[Callable[[torch.Tensor], torch.Tensor]],
                            like: torch.Tensor) -> tuple[float, float, float]:
    """``(L, dL/dt, d2L/dt2)`` at ``t = 0`` for ``L(t) = sum_i loss_fns[i](t)``, summed in float64.

    Each ``loss_fns[i]`` takes the scalar ``t`` (a 0-d tensor of ``like``'s dtype and device, requiring grad) and
    returns its micro-batch's loss with the parameters moved to ``W + t v``. With ``v`` the quantization direction
    these are the loss, ``g . v`` and ``v^T H v``: the Taylor terms of the landscape group, for the memory of one
    micro-batch's graph and no parameter-sized gradient or product. Per micro-batch: one forward, one backward with
    ``create_graph`` (to ``t`` only) and one more backward.
    """
    loss_total = first = second = 0.0
    for fn in loss_fns:
        t = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        loss = _scalar(fn(t))
        (d1,) = torch.autograd.grad(loss, t, create_graph=True, allow_unused=True)
        if d1 is not None and d1.requires_grad:
            (d2,) = torch.autograd.grad(d1, t, allow_unused=True)
        else:  # the loss is at most linear in t
            d2 = None
        loss_total += float(loss.detach())
        first += 0.0 if d1 is None else float(d1.detach())
        second += 0.0 if d2 is None else float(d2)
        del loss, d1, d2
    return loss_total, first, second


def hvp(loss_fn: LossFn, params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]) -> Vectors:
    """One Hessian-vector product ``H v`` by double backward (shapes as ``params``)."""
    op = HessianOperator(loss_fn, params)
    try:
        return op.apply(vectors)
    finally:
        op.release()


def rademacher_like(params: Sequence[torch.Tensor], generator: torch.Generator) -> Vectors:
    """Independent +-1 entries shaped like ``params`` (drawn on CPU from ``generator``, so seeded runs agree)."""
    return [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype).to(p.device) for p in params]


def hutchinson_trace_op(op: HessianOperator, n_probes: int, seed: int = 0,
                        groups: Sequence[int] | None = None) -> tuple[float, float, list[float]]:
    """Hutchinson on an existing operator: ``(mean, stderr, per_group_means)``.

    ``groups`` gives each parameter's group index (e.g. its transformer block); the per-group trace estimates come
    from the same probes (``v_g . (H v)_g``), so they sum to the total.
    """
    if n_probes < 2:
        raise ValueError(f"n_probes must be at least 2 to give a standard error, got {n_probes}")
    n_groups = (max(groups) + 1) if groups else 0
    g = torch.Generator().manual_seed(seed)
    samples = []
    group_sums = [0.0] * n_groups
    for _ in range(n_probes):
        v = rademacher_like(op.params, g)
        hv = op.apply(v)
        parts = [float(_dot([a], [b])) for a, b in zip(v, hv)]
        samples.append(sum(parts))
        if groups:
            for gi, part in zip(groups, parts, strict=True):
                group_sums[gi] += part
    t = torch.tensor(samples, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(n_probes)), [s / n_probes for s in group_sums]


def hutchinson_trace(loss_fn: LossFn, params: Sequence[torch.Tensor], n_probes: int = 8,
                     seed: int = 0) -> tuple[float, float]:
    """Hutchinson's estimate of ``tr(H)``: the mean of ``v^T H v`` over Rademacher probes ``v``.

    Returns ``(mean, standard error)``; the standard error is the sample standard deviation over ``sqrt(n_probes)``
    (``n_probes >= 2``). Cost: one gradient graph plus ``n_probes`` Hessian-vector products.
    """
    op = HessianOperator(loss_fn, params)
    try:
        mean, se, _ = hutchinson_trace_op(op, n_probes, seed)
    finally:
        op.release()
    return mean, se


def top_eigenvalue_op(op: HessianOperator, tol: float = 1e-3, max_iter: int = 20, seed: int = 0) -> tuple[float, int]:
    """Power iteration on an existing operator: ``(eigenvalue, iterations used)``."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g).to(p.dtype).to(p.device) for p in op.params]
    norm = math.sqrt(float(_dot(v, v)))
    v = [x / norm for x in v]
    eig = float("nan")
    for it in range(1, max_iter + 1):
        hv = op.apply(v)
        new = float(_dot(v, hv))  # Rayleigh quotient of the unit vector v
        norm = math.sqrt(float(_dot(hv, hv)))
        if norm == 0.0:
            return 0.0, it
        v = [x / norm for x in hv]
        if it > 1 and abs(new - eig) <= tol * abs(new):
            return new, it
        eig = new
    return eig, max_iter


def top_eigenvalue(loss_fn: LossFn, params: Sequence[torch.Tensor], tol: float = 1e-3, max_iter: int = 20,
                   seed: int = 0) -> float:
    """The dominant Hessian eigenvalue by power iteration on Hessian-vector products.

    Power iteration converges to the eigenvalue of largest *magnitude*; it is returned with its sign (the Rayleigh
    quotient), so a negative value means the most curved direction is one of negative curvature. At a trained
    model's calibration loss the dominant eigenvalue is positive in practice, and then it is the largest eigenvalue.
    Stops when two successive estimates agree to ``tol`` relative, or after ``max_iter`` products; the convergence
    rate is ``|lambda_2 / lambda_1|`` per iteration.
    """
    op = HessianOperator(loss_fn, params)
    try:
        eig, _ = top_eigenvalue_op(op, tol, max_iter, seed)
    finally:
        op.release()
    return eig
