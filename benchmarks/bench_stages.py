"""Seconds and peak memory of every stage a user runs, on SmolLM2-135M beside Qwen2.5-Coder-1.5B, in one run.

The stages of today's product (issue #31's list), each in its own process under ``/usr/bin/time -v`` with one torch
thread, so each peak resident set size is that stage's alone (interpreter, torch, tokenizer, data, the model and,
for the 1.5B model, its memory-mapped safetensors pages included):

* ``load``: ``models.load`` and one read of every weight;
* ``rtn``: ``quantize_model`` to MXINT4 with RTN, in place (data-free);
* ``gptq``: ``quantize_model`` to MXINT4 with GPTQ, 128 calibration windows of 256 tokens; ``--gptq-blocks N``
  times the first N blocks and scales to the whole model (the blocks cost alike);
* ``compare``: the FP model against its MXINT4-RTN self on ``--windows`` WikiText-2 test windows (default 32), by
  the sweep's one-copy path (``runs.execute``): the FP side into an ``FPLogitsCache`` on disk, the model quantized
  in place, the quantized side compared with the cache;
* ``profile``: ``quantpredict profile MODEL`` with an empty profile cache (the weights hashed, the lean profile
  measured and written);
* ``predict`` / ``rank`` / ``allocate``: ``quantpredict predict MODEL --format mxint4``, ``rank MODEL --max-bits 4.5
  --methods rtn`` and ``allocate MODEL --target-bits 4.5``, the profile warm (the ``profile`` stage's);
* ``predict_cold``: ``predict`` with an empty profile cache, what a user's first ``predict`` costs.

The profile stages write into a profile folder of this benchmark (``$QUANTPREDICT_PROFILES`` for the children),
seeded with the FP references (FP perplexity, 64 windows) already measured in ``$QUANTPREDICT_HOME/profiles/fp``:
that measurement is the 64-window FP evaluation, reported by ``compare``'s FP side and ``eval``, not here. Results
accumulate in ``reports/bench_stages.json`` (a stage already there is skipped unless ``--force``); ``--write``
renders the ``stages`` section of reports/benchmarks.md.

    .venv/bin/python benchmarks/bench_stages.py [--models smollm2-135m,qwen2.5-coder-1.5b] [--stages ...]
        [--gptq-blocks N] [--windows 32] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import REPORTS, measure_stage, quantize_stages, write_section  # noqa: E402

STAGES = ("load", "rtn", "gptq", "compare", "profile", "predict", "rank", "allocate", "predict_cold", "predict_gptq")
RESULTS = REPORTS / "bench_stages.json"
WARM = ("predict", "rank", "allocate")  # read the profile stage's cache
# reads the user's profile cache, where `quantpredict profile MODEL --gptq` measured the calibration moments ahead
# (52 min at 1.5B): the stage is the pricing, not that measurement
USER_CACHE = ("predict_gptq",)
TARGET_GIB = 12.0
MODELS = ("smollm2-135m", "qwen2.5-coder-1.5b")
LABELS = {"smollm2-135m": "SmolLM2-135M", "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B"}
STAGE_TEXT = {
    "load": "load, every weight read once (float32)",
    "rtn": "MXINT4 RTN, in place",
    "gptq": "MXINT4 GPTQ, 128 x 256 calibration tokens",
    "compare": "FP vs MXINT4-RTN, {windows} windows x 256 tokens (one copy)",
    "profile": "`profile`, cold (hash weights, measure, write)",
    "predict": "`predict --format mxint4`, warm profile",
    "rank": "`rank --max-bits 4.5 --methods rtn`, warm profile",
    "allocate": "`allocate --target-bits 4.5`, warm profile",
    "predict_cold": "`predict --format mxint4`, empty profile cache",
    "predict_gptq": "`predict --format mxint4 --method gptq`, warm profile and calibration moments",
}


# ---- one stage, in a child process ---------------------------------------------------------------------------------


def _cli(argv: list[str]) -> dict:
    """``quantpredict`` ``argv`` in this process; its exit code and seconds."""
    from quantpredict.cli import main

    t0 = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise SystemExit(f"quantpredict {' '.join(argv)} exited {code}")
    return {"seconds": time.perf_counter() - t0}


def child(name: str, stage: str, gptq_blocks: int | None, windows: int) -> dict:
    import torch

    torch.set_num_threads(1)
    if stage == "profile":
        return _cli(["profile", name, "--threads", "1"])
    if stage in ("predict", "predict_cold"):
        return _cli(["predict", name, "--format", "mxint4"])
    if stage == "predict_gptq":
        return _cli(["predict", name, "--format", "mxint4", "--method", "gptq"])
    if stage == "rank":
        return _cli(["rank", name, "--max-bits", "4.5", "--methods", "rtn"])
    if stage == "allocate":
        return _cli(["allocate", name, "--target-bits", "4.5"])

    from quantpredict import evaluate
    from quantpredict.quantize import Recipe, quantize_model

    done, model, tok, out = quantize_stages(name, stage, gptq_blocks)
    if done is not None:
        return done
    t0 = time.perf_counter()
    if stage == "compare":
        with tempfile.TemporaryDirectory(prefix="bench-fp-logits-") as tmp:
            cache = evaluate.FPLogitsCache(directory=Path(tmp))
            setting = evaluate.EvalSetting(max_windows=windows)
            evaluate.fill_fp_cache(model, tok, setting, fp_cache=cache, fp_key=name, batch_size=1, progress=False)
            fp_seconds = time.perf_counter() - t0
            quantize_model(model, Recipe("mxint4"), torch.zeros(1, 8, dtype=torch.long), progress=False)
            with cache.strict():
                c = evaluate.compare(model, model, tok, setting, batch_size=1, progress=False, fp_cache=cache,
                                     fp_key=name)
        return {"seconds": time.perf_counter() - t0, "fp_seconds": fp_seconds, "windows": c.windows,
                "kld": c.kld, "kld_se": c.kld_se, **out}
    raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


# ---- the driver and the report ---------------------------------------------------------------------------------------


def _profiles_dir(root: Path, fresh: bool) -> Path:
    """The profile folder a stage's child sees: the benchmark's warm one, or a new empty one (both seeded with the
    FP references already measured, which are the 64-window FP evaluation, not the profile)."""
    from quantpredict.predict.profile_cache import profiles_root

    d = Path(tempfile.mkdtemp(prefix="cold-", dir=root)) if fresh else root / "warm"
    fp = profiles_root() / "fp"
    if fp.is_dir() and not (d / "fp").exists():
        shutil.copytree(fp, d / "fp")
    return d


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def render(results: dict) -> str:
    meta = results.get("_meta", {})
    models = [m for m in MODELS if m in results] + [m for m in results if not m.startswith("_") and m not in MODELS]
    head = "| stage | " + " | ".join(f"{LABELS.get(m, m)}: s | GiB" for m in models) + " |"
    rows = [head, "|---|" + "---:|---:|" * len(models)]
    windows = meta.get("windows", 32)
    worst: dict[str, float] = {}
    for stage in STAGES:
        cells = []
        for m in models:
            r = results[m].get(stage)
            if r is None:
                cells.append("| |")
                continue
            worst[m] = max(worst.get(m, 0.0), r["peak_rss_bytes"])
            sec = f"{r['seconds']:.0f}" if r["seconds"] >= 10 else f"{r['seconds']:.1f}"
            if r.get("blocks_timed") and r["blocks_timed"] < r["blocks"]:
                sec += f" ({r['blocks_timed']}/{r['blocks']} blocks timed: {r['measured_seconds']:.0f} s)"
            cells.append(f"{sec} | {_gib(r['peak_rss_bytes'])} |")
        rows.append(f"| {STAGE_TEXT[stage].format(windows=windows)} | " + " ".join(cells))
    later = [f"{LABELS.get(m, m)} `{stage}`: measured {r['measured']['date']}, load average {r['measured']['load']} "
             f"({r['measured'].get('load_note') or 'load not stated'})"
             for m in models for stage in STAGES if (r := results[m].get(stage)) and r.get("measured")]
    verdicts = []
    for m in models:
        w = worst.get(m, 0.0)
        verdicts.append(f"{LABELS.get(m, m)} worst {_gib(w)} GiB" + (" (**met**)" if w <= TARGET_GIB * 2**30
                                                                    else " (**not met**)"))
    return "\n".join([
        "## Every stage, SmolLM2-135M beside Qwen2.5-Coder-1.5B (`benchmarks/bench_stages.py`)",
        "",
        f"Measured {meta.get('date', '?')} on {meta.get('machine', '?')}, one torch thread per process; load "
        f"average {meta.get('load', '?')} at the end ({meta.get('load_note', 'state the load')}). Both real models "
        "were **4-bit on the way in** (GGUF packages). Each stage is its own process under `/usr/bin/time -v`: "
        "peak RSS is that process's maximum resident set size, memory-mapped weight pages included. `profile` and "
        "`predict_cold` start from an empty profile cache; `predict`, `rank` and `allocate` read the `profile` "
        "stage's; `predict_gptq` reads the user's profile cache, whose GPTQ calibration moments (128 x 256 tokens) "
        "`quantpredict profile MODEL --gptq` measured ahead (52 min and 9.2 GB on disk at 1.5B). The FP "
        "perplexity the predictions quote (64 windows) was measured before and copied in: it is the "
        "FP side of an evaluation, reported there. GPTQ at 1.5B is timed on its first blocks and scaled (the "
        "blocks cost alike); the sweep's whole-model GPTQ runs are in `reports/real_models.md`.",
        "",
        *rows,
        "",
        *([f"Stages measured after that run: {'; '.join(later)}.", ""] if later else []),
        f"Target: every stage within {TARGET_GIB:.0f} GiB peak RSS: " + "; ".join(verdicts) + ".",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--gptq-blocks", type=int, default=None, help="time GPTQ on the first N blocks and scale up")
    ap.add_argument("--windows", type=int, default=32, help="windows of the compare stage (default 32)")
    ap.add_argument("--load-note", default=None, help="what else ran on the machine (printed with the table)")
    ap.add_argument("--force", action="store_true", help="measure stages already in the results file again")
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    ap.add_argument("--write", action="store_true", help="write the stages section of reports/benchmarks.md")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "STAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.gptq_blocks, args.windows)))
        return 0
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    root = Path(tempfile.mkdtemp(prefix="bench-stages-profiles-"))
    try:
        for model in [m for m in args.models.split(",") if m]:
            for stage in [s for s in args.stages.split(",") if s]:
                if stage not in STAGES:
                    raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
                if stage in results.get(model, {}) and not args.force:
                    continue
                if stage in WARM and not (root / "warm").is_dir():
                    raise SystemExit(f"stage {stage} reads the profile stage's cache: run it with --stages "
                                     f"profile,{stage} (and --force if profile is already in {args.results})")
                os.environ["QUANTPREDICT_PROFILES"] = str(_profiles_dir(root, fresh=stage in ("profile",
                                                                                             "predict_cold")))
                if stage in USER_CACHE:
                    os.environ.pop("QUANTPREDICT_PROFILES")
                if stage == "profile":  # the warm folder the later stages read is this stage's
                    shutil.rmtree(root / "warm", ignore_errors=True)
                    os.rename(os.environ["QUANTPREDICT_PROFILES"], root / "warm")
                    os.environ["QUANTPREDICT_PROFILES"] = str(root / "warm")
                argv = [__file__, "--child", model, stage, "--windows", str(args.windows)]
                if args.gptq_blocks:
                    argv += ["--gptq-blocks", str(args.gptq_blocks)]
                first_run = results.get("_meta")  # the run that measured the table; a later stage keeps its own
                measure_stage(argv, label=f"{model:20s} {stage:14s}", target_gib=TARGET_GIB, results=results,
                              where=results.setdefault(model, {}), key=stage, results_path=args.results)
                results["_meta"]["windows"] = args.windows
                if args.load_note:
                    results["_meta"]["load_note"] = args.load_note
                if first_run is not None and first_run.get("date") != results["_meta"]["date"]:
                    results[model][stage]["measured"] = {k: results["_meta"].get(k) for k in
                                                         ("date", "load", "load_note", "machine")}
                    results["_meta"] = first_run
                args.results.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.write:
        write_section("stages", render(results))
        print(f"wrote the stages section of {REPORTS / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
