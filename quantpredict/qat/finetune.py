"""Quantization-aware fine-tuning (QAT): the global-objective baseline that PTQ (RTN, GPTQ) is measured against.

:func:`finetune` trains, with AdamW on the model's next-token NLL, float *latent* weights behind a straight-through
fake quantizer (:mod:`quantpredict.qat.ste`), for exactly the linear layers the PTQ backend quantizes
(``quantize.quantized_linears(model, recipe)``: every ``arch.linear_layers`` entry but ``recipe.skip``), in the
recipe's format and block size, on exactly the calibration windows GPTQ gets
(``data.calibration_windows(train_ids, recipe.calib_samples, recipe.calib_seq_len, seed=recipe.seed)``): the same
data budget, seen ``steps * batch_size / calib_samples`` times.

Choices, made explicit:

* **Initialisation.** The model is first quantized by :func:`quantpredict.quantize.quantize_model` with the recipe's
  method replaced by ``init``. The latent weights then start where the first forward pass reproduces that PTQ model:
  for ``init="rtn"`` at the FP weights (``fake_quantize(W_fp)`` *is* RTN, and the latent keeps the sub-grid position
  of every weight, as usual in QAT); for ``init="gptq"`` at GPTQ's output (the FP weights would round back to RTN).
  With SmoothQuant the latent starts at the PTQ output for both inits (the smoothed FP weights are not kept).
  For per-channel INT formats GPTQ may leave a row whose largest weight was rounded down; re-fitting that row's scale
  moves the row onto a finer grid, so QAT from GPTQ starts a hair away from GPTQ there (``start_mismatch`` counts
  those elements; 0 for MX formats).
* **Only the quantized weights train**: embeddings, norms, biases and the head stay at their FP values, as in PTQ.
* **Scales** are re-fitted from the latent weights on every forward, exactly as ``fake_quantize`` fits them (no
  learned scales), so the returned weights satisfy ``fake_quantize(w) == w``.
* **Optimiser**: AdamW (no weight decay by default: it would pull weights towards zero, off their basin), cosine
  learning-rate decay to zero over ``steps``, gradient norm clipped at ``grad_clip``. Dropout stays off (the model is
  trained in ``eval()`` mode): PTQ sees no dropout either. Minibatches are ``batch_size`` windows drawn without
  replacement in a seeded random order, epoch after epoch.
* **Activation quantization** (``recipe.act_format``) is applied with a straight-through gradient while training and
  re-installed as the run-time hooks of :mod:`quantpredict.quantize.act` afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantpredict.qat.trajectory import Reference, TrajectoryPoint, fp_reference, mean_nll, measure_point
from quantpredict.quantize.model import QuantReport
from quantpredict.recipe import Recipe

INITS: tuple[str, ...] = ("rtn", "gptq")


@dataclass(frozen=True)
class QATResult:
    """What :func:`finetune` did.

    ``losses``: the minibatch training NLL (nats/token) of every step, measured on the quantized forward pass *before*
    that step's update. ``calib_nll_*``: mean NLL over the calibration windows (or the first ``eval_windows`` of them)
    of the FP model, of the init's PTQ model (``before``) and of the returned model (``after``). ``start_mismatch``:
    fraction of quantized weights whose first QAT forward value differs from the PTQ weights (see the module notes);
    ``changed_fraction``: fraction of quantized weights whose final value differs from the PTQ init's.
    ``trajectory``: :class:`TrajectoryPoint` every ``track_every`` steps (step 0 = the start), empty when not tracked.
    """

    recipe: Recipe
    init: str
    steps: int
    lr: float
    batch_size: int
    seed: int
    losses: tuple[float, ...]
    seconds: float
    init_seconds: float
    calib_windows: int
    calib_tokens: int
    calib_nll_fp: float
    calib_nll_before: float
    calib_nll_after: float
    start_mismatch: float
    changed_fraction: float
    init_report: QuantReport
    trajectory: tuple[TrajectoryPoint, ...] = ()

    @property
    def label(self) -> str:
        """The label of the QAT recipe this run carried out (its method segment ``qat`` from RTN, ``qat_gptq`` from
        GPTQ; steps, learning rate and batch size in it where they differ from the defaults)."""
        import dataclasses

        return dataclasses.replace(self.recipe, method=self.init, qat=True, qat_steps=self.steps, qat_lr=self.lr,
                                   qat_batch_size=self.batch_size).label

    @property
    def epochs(self) -> float:
        """Passes over the calibration windows: ``steps * batch_size / calib_windows``."""
        return self.steps * self.batch_size / self.calib_windows if self.calib_windows else 0.0

    def summary(self) -> dict[str, Any]:
        """Scalars only, JSON-ready: the init's quantization summary plus the QAT numbers."""
        d = dict(self.init_report.summary())
        d.update({
            "recipe_label": self.label, "qat_init": self.init, "qat_steps": self.steps, "qat_lr": self.lr,
            "qat_batch_size": self.batch_size, "qat_seed": self.seed, "qat_epochs": self.epochs,
            "qat_seconds": self.seconds, "init_seconds": self.init_seconds, "calib_windows": self.calib_windows,
            "calib_tokens": self.calib_tokens, "calib_nll_fp": self.calib_nll_fp,
            "calib_nll_before": self.calib_nll_before, "calib_nll_after": self.calib_nll_after,
            "start_mismatch": self.start_mismatch, "changed_fraction": self.changed_fraction,
            "final_loss": self.losses[-1] if self.losses else math.nan,
        })
        return d

    def to_dict(self) -> dict[str, Any]:
        """:meth:`summary` plus the recipe, the loss curve and the trajectory."""
        return {**self.summary(), "recipe": self.recipe.to_dict(), "losses": list(self.losses),
                "trajectory": [p.to_dict() for p in self.trajectory]}


@dataclass(frozen=True)
class QATConfig:
    """The training hyper-parameters of :func:`finetune` (see its arguments for what each means), checked when built.

    ``finetune(..., config=QATConfig(steps=64, lr=3e-3))`` trains 64 steps at that learning rate; the defaults are
    :func:`finetune`'s (its deprecated keyword form ``finetune(..., steps=64, lr=3e-3)`` trains the same). What a
    run reads besides these (the model, the recipe, the data, the FP ``reference``, the ``track_windows``,
    ``progress`` and ``on_init``) stays an argument of :func:`finetune`.
    """

    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 8
    init: str = "rtn"
    seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    eval_windows: int | None = None
    track_every: int = 0
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"unknown QAT init {self.init!r}; valid inits: {', '.join(INITS)}")
        if (self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or self.track_every < 0
                or (self.micro_batch_size is not None and self.micro_batch_size < 1)):
            raise ValueError(f"need steps >= 0, batch_size >= 1, lr > 0, track_every >= 0 and micro_batch_size >= 1; "
                             f"got steps={self.steps}, batch_size={self.batch_size}, lr={self.lr}, "
                             f"track_every={self.track_every}, micro_batch_size={self.micro_batch_size}")

    @classmethod
    def from_recipe(cls, recipe: Recipe, **options: Any) -> QATConfig:
        """The training a QAT ``recipe`` asks for: its ``qat_steps``, ``qat_lr``, ``qat_batch_size``, its ``method``
        as the init and its ``seed``; ``options`` set the other fields (``micro_batch_size``, ...)."""
        return cls(steps=recipe.qat_steps, lr=recipe.qat_lr, batch_size=recipe.qat_batch_size, init=recipe.method,
                   seed=recipe.seed, **options)


def finetune(
    model: nn.Module,
    recipe: Recipe,
    train_ids: torch.Tensor,
    *,
    config: QATConfig | None = None,
    track_windows: torch.Tensor | None = None,
    reference: Reference | None = None,
    progress: bool = True,
    on_init: Callable[[nn.Module, QuantReport], None] | None = None,
    **hyperparameters: Any,
) -> QATResult:
    """Quantize ``model`` in place with QAT: PTQ init, then ``steps`` AdamW steps of STE training on the global NLL.

    Args:
        model: a float32 Hugging Face causal LM of a family ``quantpredict.arch`` supports.
        recipe: format, block size, skip list, SmoothQuant/activation options and the calibration budget
            (``calib_samples`` windows of ``calib_seq_len`` tokens at offsets seeded by ``recipe.seed``).
            ``recipe.method`` is ignored: ``config.init`` chooses the PTQ start.
        train_ids: 1-D WikiText-2 *train* token ids, or 2-D ``[n, seq_len]`` windows used as given (as GPTQ does).
        config: the training hyper-parameters as one :class:`QATConfig` (default ``QATConfig()``): ``steps``
            (optimizer steps; 0 returns the init's PTQ model), ``lr`` (AdamW peak learning rate, cosine decay to 0
            over ``steps``), ``batch_size`` (windows per step and per evaluation forward pass), ``init`` (``"rtn"``
            or ``"gptq"``: the PTQ method quantizing the model before training), ``seed`` (of the minibatch order),
            ``weight_decay`` (AdamW's decoupled weight decay on the latent weights), ``grad_clip`` (max global
            gradient norm; ``None``: no clipping), ``eval_windows`` (measure the calibration NLLs on the first
            ``eval_windows`` calibration windows only; ``None``: all), ``track_every`` (record a
            :class:`TrajectoryPoint` every this many steps; 0: no trajectory) and ``micro_batch_size`` (run each
            step's ``batch_size`` windows in forward/backward passes of at most this many windows and accumulate
            the gradients, each micro-batch's mean loss weighted by its share of the windows: the same step as one
            pass, up to float rounding, since all windows are equally long; bounds the activation memory, SmolLM2:
            ~0.5 GB per window of 256 tokens; ``None``: one pass per step).
        track_windows: ``[n, seq_len]`` ids on which the trajectory's NLL is measured (default: the calibration
            windows used for ``eval_windows``).
        reference: the FP yardstick of the local objective (default: computed from ``model`` on the calibration
            windows before quantizing it).
        progress: tqdm bars for the init and the steps.
        on_init: called as ``on_init(model, report)`` right after the PTQ init, before training (the study measures
            the PTQ baseline there, on exactly the model QAT starts from); it must leave the model unchanged.
        **hyperparameters: deprecated: the :class:`QATConfig` fields as keywords (``steps=64, lr=3e-3``), with a
            ``DeprecationWarning``; they train exactly as the config with those fields does. With a config too,
            each must be at its default or repeat the config's value: anything else is a ``ValueError`` (no silent
            precedence; ``dataclasses.replace`` the config instead).

    Returns:
        A :class:`QATResult`. ``model`` holds the quantized weights, each on the format's grid
        (``fake_quantize(w) == w``), with activation fake-quant hooks installed when ``recipe.act_format`` is set.
    """
    cfg = _config(config, **hyperparameters)
    refs = _check(model, recipe, cfg, reference)
    t_start = time.perf_counter()
    windows, eval_w, track_w = _calibration(model, recipe, train_ids, cfg, track_windows)
    calib_nll_fp = mean_nll(model, eval_w, batch_size=cfg.batch_size)
    if cfg.track_every and reference is None:
        reference = fp_reference(model, [r.name for r in refs], windows, batch_size=cfg.batch_size)
    start = _ptq_init(model, recipe, refs, windows, eval_w, cfg, progress=progress, on_init=on_init)
    losses, trajectory, mismatch = _train(model, recipe, refs, windows, track_w, reference, start.weights, cfg,
                                          progress=progress)
    changed, calib_nll_after = _measure_after(model, recipe, refs, start.weights, eval_w, cfg)
    total = sum(w.numel() for w in start.weights)
    return QATResult(
        recipe=recipe, init=cfg.init, steps=cfg.steps, lr=float(cfg.lr), batch_size=cfg.batch_size, seed=cfg.seed,
        losses=tuple(losses), seconds=time.perf_counter() - t_start, init_seconds=start.seconds,
        calib_windows=windows.shape[0], calib_tokens=int(windows.numel()), calib_nll_fp=calib_nll_fp,
        calib_nll_before=start.nll, calib_nll_after=calib_nll_after,
        start_mismatch=mismatch / total if total else 0.0, changed_fraction=changed / total if total else 0.0,
        init_report=start.report, trajectory=tuple(trajectory))


def fp_finetune(model: nn.Module, recipe: Recipe, train_ids: torch.Tensor, *, config: QATConfig,
                progress: bool = False) -> list[float]:
    """The control of a QAT run: the same training without quantization, in place; returns the step losses.

    The layers ``recipe`` quantizes are trained as QAT trains their latents (the same calibration windows, AdamW,
    cosine schedule, minibatch order and clipping; everything else frozen), but forward in full precision. A model
    fine-tuned on WikiText-2 train gets better at WikiText-2 test whether or not it is quantized (SmolLM2-Instruct
    was not trained on it), so QAT's gain over GPTQ is recovery only beyond what this control gains over FP.

    Args:
        model: float32 causal LM, trained in place.
        recipe: only its layer selection (``skip``) and calibration (``calib_samples``, ``calib_seq_len``, ``seed``)
            are used; its format is not.
        train_ids: 1-D WikiText-2 *train* token ids, as for :func:`finetune`.
        config: the QAT run's :class:`QATConfig` (``init`` and the trajectory settings are ignored).
    """
    cfg = dataclasses.replace(config, track_every=0)
    refs = _check(model, recipe, cfg, None)
    windows, eval_w, _ = _calibration(model, recipe, train_ids, cfg, None)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [ref.module.weight for ref in refs]  # the stored parameters (Conv1D's [in, out] included)
    try:
        for w in weights:
            w.requires_grad_(True)
        plain = dataclasses.replace(recipe, act_format=None, smoothquant_alpha=None)
        losses, _ = _ste_steps(model, plain, refs, weights, windows, eval_w, None, cfg, progress=progress)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, True))
        model.train(was_training)
    return losses


def _config(config: QATConfig | None, **keywords: Any) -> QATConfig:
    """The :class:`QATConfig` of a :func:`finetune` call: built from the keywords, or ``config`` when the keywords
    agree with it (a keyword at its default defers to the config; one set to another value than the config's
    raises ``ValueError``)."""
    fields = {f.name for f in dataclasses.fields(QATConfig)}
    unknown = [k for k in keywords if k not in fields]
    if unknown:
        raise TypeError(f"finetune() got an unexpected keyword argument {unknown[0]!r}")
    if keywords:
        import warnings

        warnings.warn(f"finetune({', '.join(f'{k}=' for k in keywords)}) is deprecated; pass "
                      "config=QATConfig(...) (the same fields)", DeprecationWarning, stacklevel=3)
    if config is None:
        return QATConfig(**keywords)
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a QATConfig, got {type(config).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(QATConfig)}
    clash = [f"{k}={v!r} (config: {getattr(config, k)!r})" for k, v in keywords.items()
             if v != defaults[k] and v != getattr(config, k)]
    if clash:
        raise ValueError(f"finetune got a config and conflicting keyword(s): {', '.join(clash)}; set them in the "
                         "config (dataclasses.replace(config, ...)) or drop the config")
    return config


def _check(model: nn.Module, recipe: Recipe, cfg: QATConfig, reference: Reference | None) -> list:
    """Checks before any work: a supported architecture, at least one quantized layer, float32 weights, and an FP
    reference for a SmoothQuant trajectory. Returns the quantized layers' refs (``quantized_linears``)."""
    from quantpredict import arch
    from quantpredict.errors import ModelError
    from quantpredict.quantize import quantized_linears

    arch.adapter(model)  # unsupported architecture: a clear error before any work
    refs = quantized_linears(model, recipe)
    if not refs:
        raise ValueError(f"recipe {recipe.label!r} quantizes no layer of this model (check recipe.skip)")
    for ref in refs:
        if ref.weight.dtype != torch.float32:
            raise ModelError(f"{ref.name} is {ref.weight.dtype}; QAT trains float32 latent weights (small AdamW "
                             "updates vanish in 16-bit): load the model with dtype=torch.float32")
    if cfg.track_every and recipe.smoothquant_alpha is not None and reference is None:
        raise ValueError("a trajectory measures distances to the FP weights, which SmoothQuant rescales; track "
                         "recipes without smoothquant_alpha or pass a reference")
    return refs


def _calibration(model: nn.Module, recipe: Recipe, train_ids: torch.Tensor, cfg: QATConfig,
                 track_windows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(windows, eval_windows, track_windows)`` on the model's device: GPTQ's calibration windows (QAT trains on
    them), the prefix of them the calibration NLLs are measured on, and the trajectory's windows."""
    from quantpredict.data import calibration_windows

    device = next(model.parameters()).device
    windows = calibration_windows(train_ids, recipe.calib_samples, recipe.calib_seq_len, seed=recipe.seed).to(device)
    eval_w = windows if cfg.eval_windows is None else windows[: max(1, int(cfg.eval_windows))]
    track_w = eval_w if track_windows is None else track_windows.to(device)
    return windows, eval_w, track_w


@dataclass(frozen=True)
class _Start:
    """Where training starts: the init's PTQ report, its seconds, its quantized weights and calibration NLL."""

    report: QuantReport
    seconds: float
    weights: list[torch.Tensor]
    nll: float


def _ptq_init(model: nn.Module, recipe: Recipe, refs: list, windows: torch.Tensor, eval_w: torch.Tensor,
              cfg: QATConfig, *, progress: bool, on_init) -> _Start:
    """Quantize ``model`` with the init's PTQ method on ``windows``, measure it, call ``on_init``, then (RTN init
    without SmoothQuant) put the FP weights back as the latents' start (see the module notes)."""
    from quantpredict.quantize import quantize_model

    latent_from_fp = cfg.init == "rtn" and recipe.smoothquant_alpha is None
    fp_weights = [r.parameter.detach().clone() for r in refs] if latent_from_fp else None
    t0 = time.perf_counter()
    # 2-D windows are used as given: PTQ calibrates on exactly the windows QAT trains on
    report = quantize_model(model, dataclasses.replace(recipe, method=cfg.init), windows, batch_size=cfg.batch_size,
                            progress=progress)
    seconds = time.perf_counter() - t0
    ptq_weights = [r.weight.detach().clone() for r in refs]
    nll = mean_nll(model, eval_w, batch_size=cfg.batch_size)
    if on_init is not None:
        on_init(model, report)
    if fp_weights is not None:
        with torch.no_grad():
            for r, w in zip(refs, fp_weights):
                r.parameter.copy_(w)
    return _Start(report=report, seconds=seconds, weights=ptq_weights, nll=nll)


def _train(model: nn.Module, recipe: Recipe, refs: list, windows: torch.Tensor, track_w: torch.Tensor,
           reference: Reference | None, ptq_weights: list[torch.Tensor], cfg: QATConfig, *,
           progress: bool) -> tuple[list[float], list[TrajectoryPoint], int]:
    """STE training of the quantized layers' latent weights, everything else frozen, in ``eval()`` mode.

    Attaches the weight STE, counts the weights whose first QAT forward value differs from the PTQ init's (the
    ``mismatch``), runs :func:`_ste_steps`, and always restores the model's ``requires_grad`` flags, its training
    mode and plain weights. Returns ``(losses, trajectory, mismatch)``.
    """
    from quantpredict.qat.ste import attach_weight_ste, detach_weight_ste

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    latents = attach_weight_ste(refs, recipe.weight_format, recipe.weight_block_size)
    try:
        for p in latents:
            p.requires_grad_(True)
        with torch.no_grad():
            start = [r.weight.detach() for r in refs]
        mismatch = sum(int((s != w).sum()) for s, w in zip(start, ptq_weights))
        del start
        losses, trajectory = _ste_steps(model, recipe, refs, latents, windows, track_w, reference, cfg,
                                        progress=progress)
    finally:
        detach_weight_ste(refs)
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, True))
        model.train(was_training)
    return losses, trajectory, mismatch


def _ste_steps(model: nn.Module, recipe: Recipe, refs: list, latents: list, windows: torch.Tensor,
               track_w: torch.Tensor, reference: Reference | None, cfg: QATConfig, *,
               progress: bool) -> tuple[list[float], list[TrajectoryPoint]]:
    """The training loop: AdamW with cosine decay over ``cfg.steps``, seeded minibatches drawn epoch after epoch
    without replacement, gradient clipping, activation STE; a trajectory point every ``cfg.track_every`` steps
    (and at steps 0 and the last). A non-finite loss raises :class:`~quantpredict.errors.ModelError`."""
    from tqdm.auto import tqdm

    from quantpredict.errors import ModelError
    from quantpredict.qat.ste import activation_ste

    steps, batch_size = cfg.steps, cfg.batch_size
    device = windows.device
    losses: list[float] = []
    trajectory: list[TrajectoryPoint] = []
    optimizer = torch.optim.AdamW(latents, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.empty(0, dtype=torch.long)
    with activation_ste(refs, recipe.act_format, recipe.act_block):
        if cfg.track_every:
            trajectory.append(measure_point(model, reference, track_w, 0, batch_size=batch_size))
        bar = tqdm(range(1, steps + 1), desc=f"qat {recipe.weight_format} from {cfg.init}", unit="step",
                   disable=not progress)
        for step in bar:
            if order.numel() < batch_size:  # a fresh epoch; leftovers of the last one go first
                order = torch.cat([order, torch.randperm(windows.shape[0], generator=gen)])
            idx, order = order[:batch_size], order[batch_size:]
            batch = windows[idx.to(device)]
            optimizer.zero_grad(set_to_none=True)
            loss = _loss_and_backward(model, batch, cfg.micro_batch_size)
            if not math.isfinite(loss):
                raise ModelError(f"QAT loss became {loss} at step {step}; lower the learning rate (lr={cfg.lr})")
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(latents, cfg.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(loss)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if cfg.track_every and (step % cfg.track_every == 0 or step == steps):
                trajectory.append(measure_point(model, reference, track_w, step, batch_size=batch_size))
        bar.close()
    return losses, trajectory


def _measure_after(model: nn.Module, recipe: Recipe, refs: list, ptq_weights: list[torch.Tensor],
                   eval_w: torch.Tensor, cfg: QATConfig) -> tuple[int, float]:
    """The final measurement: re-install the activation hooks (``recipe.act_format``), then count the weights that
    moved off the PTQ init's and measure the calibration NLL. Returns ``(changed, calib_nll_after)``."""
    from quantpredict.quantize import install_act_quant

    if recipe.act_format is not None:
        install_act_quant(model, recipe)
    changed = sum(int((r.weight.detach() != w).sum()) for r, w in zip(refs, ptq_weights))
    return changed, mean_nll(model, eval_w, batch_size=cfg.batch_size)


def run_qat(model: nn.Module, recipe: Recipe, calib_ids, *, progress: bool = False):
    """QAT of ``model`` in place as the QAT ``recipe`` says; returns the :class:`QATResult` (whose ``summary()`` the
    store keeps as the run's quantization summary)."""
    from quantpredict.errors import RecipeError

    if not recipe.qat:
        raise RecipeError(f"recipe {recipe.label} is not a QAT recipe; set qat=True")
    return finetune(model, dataclasses.replace(recipe, qat=False), calib_ids, config=QATConfig.from_recipe(recipe),
                    progress=progress)


def _loss_and_backward(model: nn.Module, batch: torch.Tensor, micro_batch_size: int | None) -> float:
    """The minibatch's mean next-token NLL, its gradient accumulated into the parameters' ``.grad``.

    ``micro_batch_size=None`` (or at least the batch): one forward/backward pass. Otherwise passes of at most that
    many windows, each mean loss scaled by its share of the windows; a non-finite loss is returned before any
    backward pass of the offending micro-batch.
    """
    if micro_batch_size is None or micro_batch_size >= batch.shape[0]:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        if torch.isfinite(loss):
            loss.backward()
        return float(loss.detach())
    total = 0.0
    n = batch.shape[0]
    for lo in range(0, n, micro_batch_size):
        part = batch[lo : lo + micro_batch_size]
        loss = model(input_ids=part, labels=part, use_cache=False).loss
        if not torch.isfinite(loss):
            return float(loss.detach())
        share = part.shape[0] / n
        (loss * share).backward()
        total += float(loss.detach()) * share
    return total
