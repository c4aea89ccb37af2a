"""The PTQ-vs-QAT study: same data budget, FP / RTN / GPTQ / QAT-from-RTN / QAT-from-GPTQ, and the misalignment.

For each model and format, :func:`study_one` measures on the same WikiText-2 *test* windows the per-window NLL of
the FP model, of RTN and GPTQ (each exactly the model its QAT run starts from, captured through ``finetune``'s
``on_init``), and of QAT from each; paired differences carry standard errors over windows. Along the way it records
the paths: RTN and GPTQ replayed layer by layer (:func:`quantpredict.qat.ptq_trajectory`), QAT every
``track_every`` steps, each point holding the summed local objective, the NLL on a fixed test prefix and the
distance to the FP weights. :func:`run_study` appends one JSON line per (model, format) to a results file as it
goes (resumable: finished pairs are skipped), and :mod:`quantpredict.studies.qat_report` renders ``reports/qat.md``.

:class:`RunOptions` are how a cell is measured, not what: trajectory resolution, the reference's dtype and QAT
micro-batches change memory and time (and float rounding), never the data budget or the recipe, so they are
recorded with each result (``options``) but are not part of the settings that identify a cell.
"""

from __future__ import annotations

import copy
import json
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


STUDY_FORMATS: tuple[str, ...] = ("int4", "int3", "int2", "mxint4", "mxint3", "mxfp4_e2m1")
METHODS: tuple[str, ...] = ("fp", "rtn", "gptq", "qat_rtn", "qat_gptq")
RESULTS_FILE = "qat_results.jsonl"
HURTS_FILE = "qat_hurts_results.jsonl"
CONTROL_FILE = "qat_fp_control.jsonl"  # FP fine-tuned at each data budget (--fp-control), beside the results file
RESULTS_FILES = {"zoo": RESULTS_FILE, "hurts": HURTS_FILE}  # the shipped zoo study; models where quantization hurts


@dataclass(frozen=True)
class StudySettings:
    """Everything a study run depends on besides the model and format (recorded with every result)."""

    steps: int = 32
    lr: float = 1e-3
    batch_size: int = 4
    calib_samples: int = 128
    calib_seq_len: int = 256
    seq_len: int = 256
    max_windows: int | None = 64
    track_windows: int = 8
    track_every: int = 4
    eval_windows: int = 16
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def qat_config(self, init: str, *, micro_batch_size: int | None = None):
        """The :class:`~quantpredict.qat.QATConfig` of this study's QAT run from ``init``."""
        from quantpredict.qat.finetune import QATConfig

        return QATConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size, init=init, seed=self.seed,
                         eval_windows=self.eval_windows, track_every=self.track_every,
                         micro_batch_size=micro_batch_size)


#: the local objective's dtypes by name (torch's dtype is looked up where it is used: importing torch here would
#: cost every CLI command the seconds of torch's import while the parser is built)
REFERENCE_DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class RunOptions:
    """How a cell is measured (recorded as ``options``; not part of the cell's identity).

    ``ptq_points``: ``"layer"`` (a PTQ trajectory point after every layer, as the zoo study) or ``"block"`` (after
    each transformer block: the NLL forward passes of a 211-point path dominate a SmolLM2 cell otherwise).
    ``reference_dtype``: ``"float64"`` or ``"float32"`` for the FP weights and Hessians of the local objective.
    ``micro_batch_size``: QAT forward/backward passes of at most this many windows (gradients accumulated;
    ``None``: the whole batch at once).
    """

    ptq_points: str = "layer"
    reference_dtype: str = "float64"
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        from quantpredict.qat.trajectory import PTQ_POINTS

        if self.ptq_points not in PTQ_POINTS:
            raise ValueError(f"unknown ptq_points {self.ptq_points!r}; valid: {', '.join(PTQ_POINTS)}")
        if self.reference_dtype not in REFERENCE_DTYPES:
            raise ValueError(f"unknown reference_dtype {self.reference_dtype!r}; valid: {', '.join(REFERENCE_DTYPES)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1 (or unset), got {self.micro_batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_label(name: str) -> str:
    """The name a model's results are filed under: a zoo or registry name as given, a directory by its last part
    (``/work/main/data/zoo/llama-xs-d30`` -> ``llama-xs-d30``)."""
    return Path(name).name if "/" in name else name


def model_card(name: str) -> dict[str, Any]:
    """The facts of a model's card the study records: tokens per parameter, source, origin (empty if no card)."""
    from quantpredict.models import resolve

    path = resolve(name) / "zoo_card.json"
    card = json.loads(path.read_text()) if path.exists() else {}
    return {k: card.get(k) for k in ("tokens_per_param", "source", "origin", "n_params_nonembed")}


def _windows_sha(ids: torch.Tensor) -> str:
    """A short digest of the test windows' token ids: cells with equal digests were scored on the same tokens, so
    their per-window NLLs pair (zoo models share one tokenizer)."""
    import hashlib

    import torch

    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _max_rss_gb() -> float:
    """This process's peak resident memory so far (GB; ``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean of ``a - b`` over windows [n] and its standard error (NaN for one window)."""
    d = (a - b).double()
    n = d.numel()
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": float(d.mean()), "se": se}


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)


def _method_summaries(nlls: dict[str, torch.Tensor], order: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per method (in ``order``; ``nlls["fp"]`` must be there): mean test NLL, perplexity, delta NLL to FP and its
    paired se over windows (0 for FP itself). ``nlls``: per-window NLLs ``[windows]`` on the same windows."""
    fp_mean = float(nlls["fp"].mean())
    out = {}
    for m in order:
        mean = float(nlls[m].mean())
        out[m] = {"nll": mean, "ppl": math.exp(mean), "delta_nll": mean - fp_mean,
                  "delta_nll_se": _paired(nlls[m], nlls["fp"])["se"] if m != "fp" else 0.0}
    return out


def _shared_context(model_fp, tokenizer, s: StudySettings, opts: RunOptions, ctx: dict) -> None:
    """Fill ``ctx`` with what every cell and control of one model and data budget share: the train ids, the test
    windows and their FP NLLs (cleared and rebuilt when the budget changes; the FP reference is added by
    :func:`study_one` when a cell needs it)."""
    from quantpredict import data
    from quantpredict.evaluate import make_windows, window_nlls

    key = (s.calib_samples, s.calib_seq_len, s.seed, s.seq_len, s.max_windows, s.track_windows, opts.reference_dtype)
    if ctx.get("key") == key:
        return
    ctx.clear()
    ctx["key"] = key
    ctx["calib_ids"] = data.token_stream(tokenizer, "wikitext2", "train")  # calibration: train only
    test = data.token_stream(tokenizer, "wikitext2", "test")
    ctx["windows"] = make_windows(test.ids, s.seq_len, max_windows=s.max_windows, bos_id=test.bos_id)
    ctx["track"] = ctx["windows"].ids[: s.track_windows]
    ctx["fp_nll"] = window_nlls(model_fp, ctx["windows"], batch_size=8)
    ctx["ptq"] = {}


def fp_control_cell(model_fp, tokenizer, name: str, settings: StudySettings, *, context: dict | None = None,
                    progress: bool = True, options: RunOptions | None = None) -> dict[str, Any]:
    """The FP fine-tuning control of one model and data budget, as a JSON-ready dict: a copy of the FP model
    trained exactly as the cells' QAT runs train (:func:`~quantpredict.qat.finetune.fp_finetune`, same windows,
    steps, lr, order), scored on the cells' test windows (``window_nll`` of ``fp`` and ``fp_ft``, paired)."""
    from quantpredict.evaluate import window_nlls
    from quantpredict.qat.finetune import fp_finetune
    from quantpredict.quantize import Recipe

    ctx = context if context is not None else {}
    s = settings
    opts = options or RunOptions()
    _shared_context(model_fp, tokenizer, s, opts, ctx)
    t0, c0 = time.perf_counter(), time.process_time()
    model = copy.deepcopy(model_fp)
    recipe = Recipe(STUDY_FORMATS[0], calib_samples=s.calib_samples, calib_seq_len=s.calib_seq_len, seed=s.seed)
    losses = fp_finetune(model, recipe, ctx["calib_ids"], config=s.qat_config("rtn",
                         micro_batch_size=opts.micro_batch_size), progress=progress)
    nlls = {"fp": ctx["fp_nll"], "fp_ft": window_nlls(model, ctx["windows"], batch_size=8)}
    del model
    methods = _method_summaries(nlls, tuple(nlls))
    return {"model": model_label(name), "kind": "fp_finetune", "settings": s.to_dict(),
            "eval_windows": ctx["windows"].n, "eval_tokens": ctx["windows"].scored_tokens, "methods": methods,
            "losses": losses, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "max_rss_gb": _max_rss_gb(), "options": opts.to_dict(),
            "window_nll": {m: [float(x) for x in v] for m, v in nlls.items()},
            "windows_sha": _windows_sha(ctx["windows"].ids)}


def study_one(model_fp, tokenizer, name: str, fmt: str, settings: StudySettings, *, context: dict | None = None,
              progress: bool = True, options: RunOptions | None = None) -> dict[str, Any]:
    """One (model, format) cell of the study, as a JSON-ready dict (see the module docstring).

    ``context`` caches what every format of one model shares (ids, windows, FP scores, the FP reference, and the
    PTQ baselines' measurements by format, reused by a cell of other QAT settings with the same calibration and test
    windows: GPTQ is deterministic, so they are the same numbers); pass the same dict for every cell of a model.
    Calibration (train) and test windows follow the tokenizer's BOS protocol (:func:`quantpredict.data.eval_protocol`;
    no BOS for the zoo's tokenizer and SmolLM2's).
    """
    import torch

    from quantpredict import arch, data
    from quantpredict.evaluate import window_nlls
    from quantpredict.qat.finetune import finetune
    from quantpredict.qat.trajectory import fp_reference, measure_point, ptq_trajectory
    from quantpredict.quantize import Recipe

    ctx = context if context is not None else {}
    s = settings
    opts = options or RunOptions()
    _shared_context(model_fp, tokenizer, s, opts, ctx)
    if "reference" not in ctx:
        calib_w = data.calibration_windows(ctx["calib_ids"], s.calib_samples, s.calib_seq_len, seed=s.seed)
        names = [r.name for r in arch.linear_layers(model_fp)]
        # model_fp is never modified here (QAT and the PTQ replays work on copies): its weights can be shared
        ctx["reference"] = fp_reference(model_fp, names, calib_w, batch_size=8,
                                        dtype=getattr(torch, opts.reference_dtype), share_weights=True)
        ctx["fp_point"] = measure_point(model_fp, ctx["reference"], ctx["track"], 0).to_dict()
    windows, track, reference = ctx["windows"], ctx["track"], ctx["reference"]
    recipe = Recipe(fmt, calib_samples=s.calib_samples, calib_seq_len=s.calib_seq_len, seed=s.seed)

    t0, c0 = time.perf_counter(), time.process_time()
    nlls: dict[str, torch.Tensor] = {"fp": ctx["fp_nll"]}
    paths: dict[str, list[dict]] = {}
    qat: dict[str, dict] = {}
    ptq_reports: dict[str, dict] = {}
    for init in ("rtn", "gptq"):
        cache_key = (fmt, init, opts.ptq_points)

        def on_init(model, report, init=init, cache_key=cache_key):
            if cache_key not in ctx["ptq"]:
                ctx["ptq"][cache_key] = (
                    window_nlls(model, windows, batch_size=8),
                    [p.to_dict() for p in ptq_trajectory(model_fp, model, reference, track, points=opts.ptq_points)],
                    report.summary())
            nlls[init], paths[init], ptq_reports[init] = ctx["ptq"][cache_key]

        model = copy.deepcopy(model_fp)
        config = s.qat_config(init, micro_batch_size=opts.micro_batch_size)
        res = finetune(model, recipe, ctx["calib_ids"], config=config, track_windows=track, reference=reference,
                       progress=progress, on_init=on_init)
        nlls[f"qat_{init}"] = window_nlls(model, windows, batch_size=8)
        paths[f"qat_{init}"] = [p.to_dict() for p in res.trajectory]
        qat[init] = {**res.summary(), "losses": list(res.losses)}
        del model

    methods = _method_summaries(nlls, METHODS)
    diffs = {
        "qat_gptq_minus_gptq": _paired(nlls["qat_gptq"], nlls["gptq"]),
        "qat_rtn_minus_gptq": _paired(nlls["qat_rtn"], nlls["gptq"]),
        "gptq_minus_rtn": _paired(nlls["gptq"], nlls["rtn"]),
        "qat_rtn_minus_rtn": _paired(nlls["qat_rtn"], nlls["rtn"]),
    }
    spearman = {k: _spearman([p["local"] for p in v], [p["nll"] for p in v]) for k, v in paths.items()}
    from quantpredict import arch as _arch
    from quantpredict.formats import get_format

    return {
        "model": model_label(name), "family": _arch.family(model_fp), "format": fmt,
        "bits": get_format(fmt).bits_per_element(recipe.weight_block_size, row_length=reference.weights[
            reference.names[0]].shape[1]),
        "n_params": int(sum(p.numel() for p in model_fp.parameters())),
        "settings": s.to_dict(), "eval_windows": windows.n, "eval_tokens": windows.scored_tokens,
        "methods": methods, "diffs": diffs, "paths": paths, "fp_point": ctx["fp_point"], "spearman": spearman,
        "qat": qat, "ptq": ptq_reports, "seconds": time.perf_counter() - t0,
        "options": opts.to_dict(), "max_rss_gb": _max_rss_gb(), "cpu_seconds": time.process_time() - c0,
        "window_nll": {m: [float(x) for x in nlls[m]] for m in METHODS}, "windows_sha": _windows_sha(windows.ids),
    }


def settings_key(settings: dict[str, Any] | None) -> str:
    """A record's settings as one comparable string: cells and controls match on ``(model, settings_key)``."""
    return json.dumps(settings, sort_keys=True)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file (one JSON object per line); missing file: empty list."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def run_study(models: Sequence[str], formats: Sequence[str] = STUDY_FORMATS, *,
              settings: StudySettings | Sequence[StudySettings] | None = None,
              results: str | Path = Path("reports") / RESULTS_FILE, progress: bool = True,
              options: RunOptions | None = None, device: Any = None, fp_control: bool = False
              ) -> list[dict[str, Any]]:
    """Run the study for ``models x settings x formats``, appending each finished cell to ``results`` (JSON lines).

    ``fp_control``: also run, before a model's cells, its FP fine-tuning control at each settings
    (:func:`fp_control_cell`, appended to :data:`CONTROL_FILE` beside ``results``; resumable the same way).

    ``settings``: one :class:`StudySettings` or several (e.g. two QAT learning rates), run in the order given for
    each model, so the first settings' cells finish first; cells of several settings share the model's FP reference
    and PTQ baselines. ``models``: zoo or registry names, or model directories (filed under their last path part).
    Cells already in ``results`` with the same settings are skipped, so an interrupted run resumes. Returns every
    record in the file afterwards. ``device``: where the models run (default CPU).
    """
    import torch

    from quantpredict.formats import get_format
    from quantpredict.models import load

    all_settings = [StudySettings()] if settings is None else (
        [settings] if isinstance(settings, StudySettings) else list(settings))
    if not all_settings:
        raise ValueError("no study settings given")
    for fmt in formats:
        get_format(fmt)  # unknown names fail before any work
    opts = options or RunOptions()
    out = Path(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["model"], r["format"], settings_key(r.get("settings"))) for r in read_results(out)}
    control_out = out.parent / CONTROL_FILE
    controlled = {(r["model"], settings_key(r.get("settings"))) for r in read_results(control_out)}
    for name in models:
        label = model_label(name)
        todo = [(st, f) for st in all_settings for f in formats
                if (label, f, settings_key(st.to_dict())) not in done]
        controls = [st for st in all_settings if fp_control
                    and (label, settings_key(st.to_dict())) not in controlled]
        if not todo and not controls:
            continue
        card = model_card(name)
        model_fp, tokenizer = load(name, dtype=torch.float32, attn_implementation="eager", device=device)
        context: dict = {}
        for st in controls:
            record = fp_control_cell(model_fp, tokenizer, name, st, context=context, progress=progress,
                                     options=opts)
            with control_out.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            m = record["methods"]
            print(f"{label} FP fine-tuned, lr {st.lr:g}: ppl FP {m['fp']['ppl']:.3f} -> {m['fp_ft']['ppl']:.3f} "
                  f"({record['seconds']:.0f} s)", flush=True)
        for st, fmt in todo:
            record = study_one(model_fp, tokenizer, name, fmt, st, context=context, progress=progress, options=opts)
            record["card"] = card
            with out.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            m = record["methods"]
            print(f"{label} {fmt} lr {st.lr:g}: ppl FP {m['fp']['ppl']:.3f} RTN {m['rtn']['ppl']:.3f} "
                  f"GPTQ {m['gptq']['ppl']:.3f} QAT<-RTN {m['qat_rtn']['ppl']:.3f} "
                  f"QAT<-GPTQ {m['qat_gptq']['ppl']:.3f} "
                  f"({record['seconds']:.0f} s, peak RSS {record['max_rss_gb']:.2f} GB)", flush=True)
        del model_fp, context
    return read_results(out)
