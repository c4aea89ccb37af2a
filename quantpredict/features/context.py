"""The extraction's options (:class:`ExtractOptions`, :func:`parse_which`) and its context (:class:`Context`):
what the feature groups share, computed lazily once (the FP point, the directions, the FP pass's statistics, the
Hessian operator) within the memory budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantpredict import arch
from quantpredict.features.direction import awq_backend, backend_deltas, base_model, rtn_deltas
from quantpredict.features.hessian import AccumulatedHessianOperator, HessianOperator, directional_derivatives
from quantpredict.features.offsets import Quadratics, along_direction, capture_quadratics, offset_weights
from quantpredict.features.state import graph_bytes_per_window, mean_nll, prepared, summed_nll
from quantpredict.memory import LOGITS_CHUNK_BYTES, parse_bytes
from quantpredict.schema import GROUPS


@dataclass(frozen=True)
class ExtractOptions:
    """Knobs of :func:`~quantpredict.features.extract.extract` (the defaults keep the whole feature set near a
    few percent of a WikiText-2 test evaluation; see ``benchmarks/bench_features.py``)."""

    n_windows: int = 8  # calibration windows
    seq_len: int = 256  # tokens per window (clipped to the model's context)
    batch_size: int = 8  # windows per forward pass
    n_probes: int = 4  # Hutchinson probes
    max_iter: int = 8  # power-iteration Hessian-vector products at most
    # windows (the first ones of the batch) behind the curvature group's n_probes + max_iter HVPs: tr(H) and the top
    # eigenvalue are batch averages that need fewer tokens than the loss differences of the landscape group
    curvature_windows: int = 1
    tol: float = 1e-3  # power-iteration relative tolerance
    n_noise_draws: int = 1  # random-direction sharpness draws (one forward each)
    # working-memory budget (bytes or "4GiB"; None: memory.DEFAULT_MAX_MEMORY) that sets the micro-batch
    micro_batch: int | None = None  # windows per autograd graph; None: as many as max_memory allows
    max_memory: int | str | None = None
    logits_chunk_bytes: int = LOGITS_CHUNK_BYTES  # largest [tokens, vocab] float32 logits block (chunked head)


def parse_which(which: str | Iterable[str] | None) -> tuple[str, ...]:
    """Groups to compute, in schema order; ``None`` means all. Unknown names raise ``ValueError``."""
    if which is None:
        return GROUPS
    names = [w.strip() for w in (which.split(",") if isinstance(which, str) else which) if w.strip()]
    unknown = [w for w in names if w not in GROUPS]
    if unknown or not names:
        raise ValueError(f"unknown feature group(s) {unknown or names!r}; valid groups: {', '.join(GROUPS)}")
    return tuple(g for g in GROUPS if g in names)


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


@dataclass
class _CalibStats:
    """What one FP pass over the calibration batch gives: the NLL, each linear's output-SQNR traces and (for the
    ``gptq_proxy`` group only) each linear's ``[in, in]`` Hessian."""

    nll: float
    traces: dict[str, tuple[float, float]]
    hessians: dict[str, torch.Tensor] | None


class Context:
    def __init__(self, model: nn.Module, recipe: Any, windows: torch.Tensor, seed: int, opts: ExtractOptions,
                 groups: Sequence[str] = GROUPS, storage_dtype: torch.dtype | None = None, profile: Any = None,
                 calib_ids: Any = None):
        self.model, self.recipe, self.windows, self.seed, self.opts = model, recipe, windows, seed, opts
        self.calib_ids = calib_ids  # what extract was given: GPTQ's own calibration windows are cut from it
        self._profile = profile
        # the model's own dtype when it was upcast for the call: directions are kept in it where that is exact
        self.storage_dtype = storage_dtype
        self.groups = tuple(groups)
        self.budget = parse_bytes(opts.max_memory, flag="max_memory")
        self.progress = False  # a bar over micro-batches (extract(progress=True) sets it)
        self._cache: dict[str, Any] = {}
        self._op: HessianOperator | AccumulatedHessianOperator | None = None
        self._op_windows = 0

    def _lazy(self, key: str, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def awq(self) -> bool:
        return bool(getattr(self.recipe, "awq", False))

    @property
    def base(self) -> nn.Module:
        if self.awq:
            return self._awq[0]
        return self._lazy("base", lambda: base_model(self.model, self.recipe, self.windows, self.opts.batch_size))

    @property
    def _awq(self) -> tuple[nn.Module, list[torch.Tensor]]:
        def run() -> tuple[nn.Module, list[torch.Tensor]]:
            smoothed = base_model(self.model, self.recipe, self.windows, self.opts.batch_size)
            return awq_backend(smoothed, self.recipe, self.windows, self.opts.batch_size, compact=self.storage_dtype)
        return self._lazy("awq", run)

    @property
    def profile(self):
        """The model's :class:`~quantpredict.features.fisher.SensitivityProfile`: the one given to ``extract``
        (measured on the unsmoothed, unscaled model, so only for recipes without SmoothQuant and AWQ), else measured
        here."""
        from quantpredict.features.fisher import measure_profile

        if self._profile is not None and getattr(self.recipe, "smoothquant_alpha", None) is None and not self.awq:
            return self._profile
        return self._lazy("profile", lambda: measure_profile(self.base, self.windows, seed=self.seed))

    @property
    def refs(self) -> list[arch.LinearRef]:
        return self._lazy("refs", lambda: arch.linear_layers(self.base))

    @property
    def params(self) -> list[torch.Tensor]:
        return [r.parameter for r in self.refs]

    @property
    def rtn_delta(self) -> list[torch.Tensor]:
        return self._lazy("rtn_delta", lambda: rtn_deltas(self.base, self.refs, self.recipe,
                                                          compact=self.storage_dtype))

    @property
    def delta(self) -> list[torch.Tensor]:
        """The recipe's direction, in ``[out, in]`` layout."""
        if self.awq:
            return self._awq[1]
        if getattr(self.recipe, "method", "rtn") == "rtn":
            return self.rtn_delta
        return self._lazy("delta", lambda: backend_deltas(self.base, self.refs, self.recipe, self.windows,
                                                          self.opts.batch_size, compact=self.storage_dtype))

    def param_layout(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[out, in]`` tensors in the parameters' storage layout (GPT-2's Conv1D stores ``[in, out]``)."""
        return [t.t() if r.transposed else t for t, r in zip(tensors, self.refs, strict=True)]

    # -- memory: how many windows one autograd graph may hold

    def micro_batch(self, n_windows: int) -> int:
        """Windows per double-backward graph for an operator over ``n_windows``: ``opts.micro_batch``, else as many
        as :func:`graph_bytes_per_window` says fit in the budget (at least one)."""
        if self.opts.micro_batch is not None:
            if self.opts.micro_batch < 1:
                raise ValueError(f"micro_batch must be at least 1 window, got {self.opts.micro_batch}")
            return min(self.opts.micro_batch, n_windows)
        per = graph_bytes_per_window(self.base, self.windows.shape[1], chunk_bytes=self.opts.logits_chunk_bytes)
        return max(1, min(n_windows, self.budget // max(per, 1)))

    def whole_graph(self, n_windows: int | None = None) -> bool:
        """True when the double-backward graph of ``n_windows`` (default: all) fits at once: the retained-graph path."""
        n = self.windows.shape[0] if n_windows is None else n_windows
        return self.micro_batch(n) >= n

    def _summed_nll(self, windows: torch.Tensor) -> torch.Tensor:
        return summed_nll(self.base, windows, self.opts.batch_size, chunk_bytes=self.opts.logits_chunk_bytes)

    def _share_fns(self, windows: torch.Tensor, size: int) -> list:
        """One closure per micro-batch of ``size`` windows, returning its share of the mean NLL over ``windows``."""
        total = windows.shape[0] * (windows.shape[1] - 1)
        return [lambda w=windows[lo : lo + size]: self._summed_nll(w) / total
                for lo in range(0, windows.shape[0], size)]

    # -- the FP pass: NLL, output-SQNR traces, Hessians

    @property
    def fp_nll(self) -> float:
        def compute() -> float:
            if self.wants_calib_stats:  # the layer-input pass gives the NLL too: one forward instead of two
                return self.calib_stats.nll
            if self.awq:
                # AWQ's scaled model computes the FP function (its scales are folded exactly), so the FP NLL is read
                # from the FP model: building the scaled one runs AWQ's search over the calibration batch (over an
                # hour at 1.5B), which the model group alone (a backfill) must not pay for
                with prepared(self.model), torch.no_grad():
                    return float(summed_nll(self.model, self.windows, self.opts.batch_size,
                                            chunk_bytes=self.opts.logits_chunk_bytes) / self._n_tokens)
            return self.base_nll
        return self._lazy("fp_nll", compute)

    @property
    def base_nll(self) -> float:
        """The mean NLL at the point the directions start from (:attr:`base`): :attr:`fp_nll` itself, but for an
        AWQ recipe, whose scaled model rounds differently (what the landscape's differences subtract)."""
        def compute() -> float:
            if self.wants_calib_stats:
                return self.calib_stats.nll
            with prepared(self.base), torch.no_grad():
                return float(self._summed_nll(self.windows) / self._n_tokens)
        return self._lazy("base_nll", compute)

    @property
    def _n_tokens(self) -> int:
        return self.windows.shape[0] * (self.windows.shape[1] - 1)

    @property
    def wants_calib_stats(self) -> bool:
        return bool({"noise", "gptq_proxy"} & set(self.groups))

    @property
    def calib_stats(self) -> _CalibStats:
        return self._lazy("calib_stats", self._calib_pass)

    @contextlib.contextmanager
    def _capture(self) -> Iterator[tuple[Quadratics, dict | None]]:
        from quantpredict.quantize import capture_linear_inputs

        with contextlib.ExitStack() as stack:
            quad = stack.enter_context(capture_quadratics(self.refs, self.rtn_delta))
            stats = (stack.enter_context(capture_linear_inputs(self.refs)) if "gptq_proxy" in self.groups
                     else None)
            yield quad, stats

    def _calib_pass(self) -> _CalibStats:
        share = (self._op is None and "landscape" in self.groups and "curvature" not in self.groups
                 and self.whole_graph())
        with self._capture() as (quad, stats):
            if share:
                # the landscape group's Hessian operator runs a forward pass over the whole batch anyway: take the
                # layer statistics and the NLL from it (one forward instead of two; with curvature in the set its
                # one-window operator would release this one and it would be built twice)
                nll = self.operator().loss
            else:
                with prepared(self.base), torch.no_grad():
                    nll = float(self._summed_nll(self.windows) / self._n_tokens)
        hessians = None if stats is None else {name: st.hessian for name, st in stats.items()}
        return _CalibStats(nll, quad.traces(), hessians)

    @property
    def hessians(self) -> dict[str, torch.Tensor]:
        """``{linear name: H = 2/N X^T X}`` ([in, in], float64) of each linear's FP input on the calibration batch,
        for the ``gptq_proxy`` group (from the same forward pass that gives ``fp_nll``)."""
        hessians = self.calib_stats.hessians
        if hessians is None:
            raise RuntimeError("layer Hessians are collected only when the gptq_proxy group is selected")
        return hessians

    # -- second order

    def operator(self, n_windows: int | None = None) -> HessianOperator | AccumulatedHessianOperator:
        """The Hessian operator at ``W`` on the first ``n_windows`` windows (default all); one is kept at a time.
        A retained graph when it fits the budget, else accumulated over micro-batches."""
        n = self.windows.shape[0] if n_windows is None else max(1, min(n_windows, self.windows.shape[0]))
        if self._op is None or self._op_windows != n:
            self.release_operator()
            windows = self.windows[:n]
            size = self.micro_batch(n)
            with prepared(self.base, self.params):
                if size >= n:
                    self._op = HessianOperator(lambda: mean_nll(self.base, windows, self.opts.batch_size,
                                                                chunk_bytes=self.opts.logits_chunk_bytes),
                                               self.params)
                else:
                    self._op = AccumulatedHessianOperator(self._share_fns(windows, size), self.params)
            self._op_windows = n
            if n == self.windows.shape[0] and size >= n:
                self._cache.setdefault("base_nll", self._op.loss)
                if not self.awq:
                    self._cache.setdefault("fp_nll", self._op.loss)
        return self._op

    def release_operator(self) -> None:
        if self._op is not None:
            self._op.release()
            self._op = None

    def apply_hessian(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``H v`` on the whole calibration batch."""
        op = self.operator()
        with prepared(self.base, self.params):
            return op.apply(vectors)

    def taylor_terms(self, delta: Sequence[torch.Tensor]) -> tuple[float, float]:
        """``(g . delta, delta^T H delta)`` on the whole batch (``delta`` ``[out, in]``): from the retained operator
        when its graph fits the budget, else by :func:`directional_derivatives` over micro-batches (float64 sums,
        no parameter-sized vector)."""
        if self.whole_graph():
            d_param = self.param_layout(delta)
            op = self.operator()
            return _dot(op.grad, d_param), _dot(d_param, self.apply_hessian(d_param))
        self.release_operator()
        size = self.micro_batch(self.windows.shape[0])
        shares = self._share_fns(self.windows, size)

        def along(fn):
            def loss(t: torch.Tensor) -> torch.Tensor:
                with along_direction(self.refs, delta, t):
                    return fn()
            return loss

        like = self.params[0].detach()
        like = like.new_zeros((), dtype=torch.promote_types(like.dtype, torch.float32))
        fns = [along(fn) for fn in shares]
        if self.progress:
            from tqdm.auto import tqdm

            fns = tqdm(fns, desc="g.delta, delta'H delta", unit="micro-batch", leave=False)
        with prepared(self.base, eager=True):
            _, first, second = directional_derivatives(fns, like)
        return first, second

    def nll_at(self, offset: Any) -> float:
        """Calibration NLL with every linear weight moved: ``offset`` is a list of ``[out, in]`` tensors (one per
        linear) or a callable ``i -> tensor`` in the parameters' layout; the stored weights are never written."""
        self.release_operator()  # the retained graph refers to the weights' current values
        if not callable(offset):
            layout = self.param_layout(offset)
            offset = layout.__getitem__
        with prepared(self.base), offset_weights(self.refs, offset):
            return float(self._summed_nll(self.windows) / self._n_tokens)
