"""The PTQ-vs-QAT study: same data budget, FP / RTN / GPTQ / QAT-from-RTN / QAT-from-GPTQ, and the misalignment.

For each model and format, :func:`study_one` measures on the same WikiText-2 *test* windows the per-window NLL of
the FP model, of RTN and GPTQ (each exactly the model its QAT run starts from, captured through ``finetune``'s
``on_init``), and of QAT from each; paired differences carry standard errors over windows. Along the way it records
the paths: RTN and GPTQ replayed layer by layer (:func:`quantpredict.qat.ptq_trajectory`), QAT every
``track_every`` steps, each point holding the summed local objective, the NLL on a fixed test prefix and the
distance to the FP weights. :func:`run_study` appends one JSON line per (model, format) to a results file as it
goes (resumable: finished pairs are skipped), and :mod:`quantpredict.qat.report` renders ``reports/qat.md``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

STUDY_FORMATS: tuple[str, ...] = ("int4", "int3", "int2", "mxint4", "mxint3", "mxfp4_e2m1")
METHODS: tuple[str, ...] = ("fp", "rtn", "gptq", "qat_rtn", "qat_gptq")
RESULTS_FILE = "qat_results.jsonl"


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


def study_one(model_fp, tokenizer, name: str, fmt: str, settings: StudySettings, *, context: dict | None = None,
              progress: bool = True) -> dict[str, Any]:
    """One (model, format) cell of the study, as a JSON-ready dict (see the module docstring).

    ``context`` caches what every format of one model shares (ids, windows, FP scores, the FP reference); pass the
    same dict for every format of a model.
    """
    from quantpredict import arch, data
    from quantpredict.evaluate import make_windows, window_nlls
    from quantpredict.qat.finetune import finetune
    from quantpredict.qat.trajectory import fp_reference, measure_point, ptq_trajectory
    from quantpredict.quantize import Recipe

    ctx = context if context is not None else {}
    s = settings
    if not ctx:
        ctx["calib_ids"] = data.token_ids(tokenizer, "wikitext2", "train")  # calibration: train only
        test_ids = data.token_ids(tokenizer, "wikitext2", "test")
        ctx["windows"] = make_windows(test_ids, s.seq_len, max_windows=s.max_windows)
        ctx["track"] = ctx["windows"].ids[: s.track_windows]
        ctx["fp_nll"] = window_nlls(model_fp, ctx["windows"], batch_size=8)
        calib_w = data.calibration_windows(ctx["calib_ids"], s.calib_samples, s.calib_seq_len, seed=s.seed)
        names = [r.name for r in arch.linear_layers(model_fp)]
        ctx["reference"] = fp_reference(model_fp, names, calib_w, batch_size=8)
        ctx["fp_point"] = measure_point(model_fp, ctx["reference"], ctx["track"], 0).to_dict()
    windows, track, reference = ctx["windows"], ctx["track"], ctx["reference"]
    recipe = Recipe(fmt, calib_samples=s.calib_samples, calib_seq_len=s.calib_seq_len, seed=s.seed)

    t0 = time.perf_counter()
    nlls: dict[str, torch.Tensor] = {"fp": ctx["fp_nll"]}
    paths: dict[str, list[dict]] = {}
    qat: dict[str, dict] = {}
    ptq_reports: dict[str, dict] = {}
    for init in ("rtn", "gptq"):
        def on_init(model, report, init=init):
            nlls[init] = window_nlls(model, windows, batch_size=8)
            paths[init] = [p.to_dict() for p in ptq_trajectory(model_fp, model, reference, track)]
            ptq_reports[init] = report.summary()

        model = copy.deepcopy(model_fp)
        res = finetune(model, recipe, ctx["calib_ids"], steps=s.steps, lr=s.lr, batch_size=s.batch_size, init=init,
                       seed=s.seed, eval_windows=s.eval_windows, track_every=s.track_every, track_windows=track,
                       reference=reference, progress=progress, on_init=on_init)
        nlls[f"qat_{init}"] = window_nlls(model, windows, batch_size=8)
        paths[f"qat_{init}"] = [p.to_dict() for p in res.trajectory]
        qat[init] = {**res.summary(), "losses": list(res.losses)}
        del model

    fp_mean = float(nlls["fp"].mean())
    methods = {}
    for m in METHODS:
        mean = float(nlls[m].mean())
        methods[m] = {"nll": mean, "ppl": math.exp(mean), "delta_nll": mean - fp_mean,
                      "delta_nll_se": _paired(nlls[m], nlls["fp"])["se"] if m != "fp" else 0.0}
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
        "model": name, "family": _arch.family(model_fp), "format": fmt,
        "bits": get_format(fmt).bits_per_element(recipe.weight_block_size, row_length=reference.weights[
            reference.names[0]].shape[1]),
        "n_params": int(sum(p.numel() for p in model_fp.parameters())),
        "settings": s.to_dict(), "eval_windows": windows.n, "eval_tokens": windows.scored_tokens,
        "methods": methods, "diffs": diffs, "paths": paths, "fp_point": ctx["fp_point"], "spearman": spearman,
        "qat": qat, "ptq": ptq_reports, "seconds": time.perf_counter() - t0,
    }


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file (one JSON object per line); missing file: empty list."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def run_study(models: Sequence[str], formats: Sequence[str] = STUDY_FORMATS, *, settings: StudySettings | None = None,
              results: str | Path = Path("reports") / RESULTS_FILE, progress: bool = True,
              device: Any = None) -> list[dict[str, Any]]:
    """Run the study for ``models x formats``, appending each finished cell to ``results`` (JSON lines).

    Cells already in ``results`` with the same settings are skipped, so an interrupted run resumes. Returns every
    record in the file afterwards. ``device``: where the models run (default CPU).
    """
    from quantpredict.formats import get_format
    from quantpredict.models import load

    s = settings or StudySettings()
    for fmt in formats:
        get_format(fmt)  # unknown names fail before any work
    out = Path(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["model"], r["format"]) for r in read_results(out) if r.get("settings") == s.to_dict()}
    for name in models:
        todo = [f for f in formats if (name, f) not in done]
        if not todo:
            continue
        model_fp, tokenizer = load(name, dtype=torch.float32, attn_implementation="eager", device=device)
        context: dict = {}
        for fmt in todo:
            record = study_one(model_fp, tokenizer, name, fmt, s, context=context, progress=progress)
            with out.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            m = record["methods"]
            print(f"{name} {fmt}: ppl FP {m['fp']['ppl']:.3f} RTN {m['rtn']['ppl']:.3f} GPTQ {m['gptq']['ppl']:.3f} "
                  f"QAT<-RTN {m['qat_rtn']['ppl']:.3f} QAT<-GPTQ {m['qat_gptq']['ppl']:.3f} "
                  f"({record['seconds']:.0f} s)", flush=True)
    return read_results(out)
