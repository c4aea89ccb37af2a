"""Seconds and peak memory of every stage on a real pre-trained model (SmolLM2-135M) beside a zoo model (llama-l).

Each (model, stage) runs in its own process under ``/usr/bin/time -v`` with one thread, so its peak resident set
size is that stage's alone (interpreter, torch, data and model included). Stages:

* ``load``: ``models.load`` and one read of every weight;
* ``rtn``: ``quantize_model`` to MXINT4 with RTN (data-free);
* ``gptq``: ``quantize_model`` to MXINT4 with GPTQ, 128 calibration windows of 256 tokens (``--gptq-blocks N``
  times the first N blocks and scales to the whole model: the blocks cost alike);
* ``compare``: ``evaluate.compare`` of the FP model with its MXINT4-RTN copy on 64 windows of WikiText-2 test;
* ``features_rtn`` / ``features_gptq``: ``features.extract(model, recipe, calib, which="model,format,noise,
  landscape")``, the default predictor's groups, for MXINT4 RTN and GPTQ;
* ``predict``: ``predict_quality(name, mxint4 RTN)`` (loads the model itself).

Results accumulate in ``reports/bench_memory.json`` (a stage already there is skipped unless ``--force``), and
``--write`` renders the ``memory`` section of reports/benchmarks.md from it.

    .venv/bin/python benchmarks/bench_memory.py [--models smollm2-135m,llama-l] [--stages ...] [--gptq-blocks N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import REPORTS, measure_stage, quantize_stages, timed_compare, write_section  # noqa: E402

STAGES = ("load", "rtn", "gptq", "compare", "features_rtn", "features_gptq", "predict")
RESULTS = REPORTS / "bench_memory.json"
GROUPS = "model,format,noise,landscape"
STAGE_NOTES = {
    "load": ["float32, every weight read once"],
    "rtn": ["data-free"],
    "gptq": ["whole model, 128 x 256 calibration tokens"],
    "compare": ["FP vs MXINT4-RTN copy, 64 windows x 256 tokens"],
    "features_rtn": ["peak includes tokenizing WikiText-2 train in one call"],
    "features_gptq": ["the direction is GPTQ on a copy of the model (8 windows)"],
    "predict": ["features + prediction, default predictor; tokenizing included"],
}
TARGET_GIB = 6.0


# ---- one stage, in a child process ---------------------------------------------------------------------------------


def child(name: str, stage: str, gptq_blocks: int | None) -> dict:
    import torch

    from quantpredict import data
    from quantpredict.quantize import Recipe

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if stage == "predict":
        from quantpredict.predict.quality import predict_quality

        pr = predict_quality(name, Recipe("mxint4"))
        return {"seconds": pr.seconds, "load_seconds": pr.load_seconds, "ppl": pr.ppl}
    done, model, tok, out = quantize_stages(name, stage, gptq_blocks)
    if done is not None:
        return done
    t0 = time.perf_counter()
    if stage == "compare":
        return {**timed_compare(model, tok, 64), **out}
    if stage.startswith("features_"):
        from quantpredict.features import extract

        calib = data.token_ids(tok, "wikitext2", "train")
        out["tokenize_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        f = extract(model, Recipe("mxint4", method=stage.split("_")[1]), calib, which=GROUPS)
        return {"seconds": time.perf_counter() - t0, "taylor_dnll": f["taylor_dnll"], **out}
    raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


# ---- the driver and the report ---------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def render(results: dict) -> str:
    rows = ["| model | stage | seconds | peak RSS GiB | notes |", "|---|---|---:|---:|---|"]
    for model, stages in results.items():
        if model.startswith("_"):
            continue
        for stage in STAGES:
            r = stages.get(stage)
            if r is None:
                continue
            notes = []
            if r.get("blocks_timed") and r["blocks_timed"] < r["blocks"]:
                notes.append(f"{r['blocks_timed']} of {r['blocks']} blocks timed ({r['measured_seconds']:.0f} s), "
                             "scaled to the whole model")
            notes += STAGE_NOTES.get(stage, [])
            if stage == "predict":
                notes.append(f"load {r['load_seconds']:.1f} s more")
            elif "tokenize_seconds" in r and r["tokenize_seconds"] >= 0.5:
                notes.append(f"tokenizing {r['tokenize_seconds']:.0f} s more")
            rows.append(f"| {model} | {stage} | {r['seconds']:.1f} | {_gib(r['peak_rss_bytes'])} | "
                        f"{'; '.join(notes)} |")
    smol = results.get("smollm2-135m", {})
    worst = max((r["peak_rss_bytes"] for r in smol.values()), default=0)
    met = "**met**" if smol and worst <= TARGET_GIB * 2**30 else "not met"
    meta = results.get("_meta", {})
    return "\n".join([
        "## Memory: every stage on SmolLM2-135M beside llama-l (`benchmarks/bench_memory.py`)",
        "",
        f"Measured {meta.get('date', '?')} on {meta.get('machine', '?')}, one torch thread per process. The machine "
        "was loaded by background jobs throughout (a zoo training run and a SmolLM2 sweep on both cores; load "
        f"average {meta.get('load', '?')} at the end): seconds are pessimistic, memory is not affected.",
        "",
        "Each stage is its own process under `/usr/bin/time -v`: *peak RSS* is that process's maximum resident set "
        "size (interpreter, torch, tokenizer, data and the model included); *seconds* is the stage itself. "
        "MXINT4 throughout; features = `which=\"model,format,noise,landscape\"` (the default predictor's groups, "
        "8 windows x 256 tokens), with the default `max_memory` (2 GiB of working memory): SmolLM2's Hessian terms "
        "run one window per graph and its 49k-token head in 64 MiB chunks; llama-l keeps the whole batch in one "
        "graph, as before. Before this work SmolLM2's predictor features (`quantpredict predict`) peaked at "
        "22.6 GB. Tokenizing all of WikiText-2 train in one call peaks near 2 GB by itself (the zoo models' "
        "features rows), then is given back.",
        "",
        *rows,
        "",
        f"Target: every SmolLM2 stage within {TARGET_GIB:.0f} GiB peak RSS: {met} (worst {_gib(worst)} GiB).",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,llama-l")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--gptq-blocks", type=int, default=None, help="time GPTQ on the first N blocks and scale up")
    ap.add_argument("--force", action="store_true", help="measure stages already in the results file again")
    ap.add_argument("--write", action="store_true", help="write the memory section of reports/benchmarks.md")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "STAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.gptq_blocks)))
        return 0
    import torch

    torch.set_num_threads(1)  # this script's setting: each stage's child runs with one thread too
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for model in [m for m in args.models.split(",") if m]:
        for stage in [s for s in args.stages.split(",") if s]:
            if stage in results.get(model, {}) and not args.force:
                continue
            argv = [__file__, "--child", model, stage]
            if args.gptq_blocks:
                argv += ["--gptq-blocks", str(args.gptq_blocks)]
            measure_stage(argv, label=f"{model:14s} {stage:14s}", target_gib=TARGET_GIB, results=results,
                          where=results.setdefault(model, {}), key=stage, results_path=RESULTS)
    if args.write:
        write_section("memory", render(results))
        print(f"wrote the memory section of {REPORTS / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
