"""The 1B proof: memory and time of every stage on a Llama-architecture model of over a billion parameters.

No download: a random-weight Llama (hidden 2048, 16 blocks, MLP 8192, 32 heads with 8 key-value heads, a 49,152-token
vocabulary with tied embeddings: 1.07B parameters) is built from its config and saved in bf16 under ``--dir``
(default ``/tmp/quantpredict-1b``), with SmolLM2's tokenizer when it is imported (else the zoo's). Its numbers mean
nothing; it proves memory and time only. Each stage runs in its own process under ``/usr/bin/time -v`` with one
thread (peak RSS = that process's maximum resident set size):

* ``sensitivity``: the features' second-order pass, ``features.extract(which="landscape")`` for MXINT4 RTN (the
  directional derivatives ``g . delta`` and ``delta^T H delta``, one window per graph, plus the radial and
  random-direction losses) on 2 windows of 256 tokens; the bf16 model is measured in float32;
* ``quantize``: RTN then GPTQ (MXINT4) of transformer block 0 on 128 calibration windows of 256 tokens, the whole
  model in memory in bf16 and the block computed in float32 (the other blocks are kept, not quantized);
* ``compare``: ``evaluate.compare`` of the bf16 model with its MXINT4-RTN copy on 4 windows of WikiText-2 test, bf16
  forward passes (the 49k head in float32 chunks);
* ``predict``: ``predict_quality`` with the default predictor (its groups model, format, noise, landscape) on 2
  calibration windows.

Results go to ``reports/bench_1b.json``; ``--write`` renders the ``1b`` section of reports/benchmarks.md with the
extrapolation to 7B and 70B. A benchmark, not a CI test.

    .venv/bin/python benchmarks/bench_1b.py [--stages sensitivity,quantize,compare,predict] [--write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import REPORTS, measure_stage, run_measured, timed_compare, write_section  # noqa: E402

STAGES = ("sensitivity", "quantize", "compare", "predict")
RESULTS = REPORTS / "bench_1b.json"
TARGET_GIB = 12.0
CONFIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
              rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
FEATURE_WINDOWS = 2


def _tokenizer_dir() -> Path:
    from quantpredict.data import data_dir
    from quantpredict.models.imported import imported_path

    smol = imported_path("smollm2-135m")
    return smol if smol is not None else data_dir() / "zoo" / "tokenizer"


def build(directory: Path) -> dict:
    """Build and save the random-weight model (bf16) with a tokenizer; returns its facts."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**CONFIG)
    t0 = time.perf_counter()
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(_tokenizer_dir())).save_pretrained(directory)
    return {"seconds": time.perf_counter() - t0, "n_params": n_params, "tokenizer": str(_tokenizer_dir())}


def child(stage: str, directory: str) -> dict:
    import copy

    import torch

    from quantpredict import arch, models
    from quantpredict.quantize import Recipe, quantize_model, sample_calibration

    torch.set_num_threads(1)
    if stage == "build":
        return build(Path(directory))
    t0 = time.perf_counter()
    if stage == "predict":
        from quantpredict.predict.quality import predict_quality

        pr = predict_quality(directory, Recipe("mxint4"), extract_options={"n_windows": FEATURE_WINDOWS})
        return {"seconds": pr.seconds, "load_seconds": pr.load_seconds, "features": pr.feature_seconds}
    model, tok = models.load(directory, dtype="auto", attn_implementation="eager")  # bf16, as saved
    out = {"load_seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    if stage == "sensitivity":
        from quantpredict.data import load_text
        from quantpredict.features import extract

        ids = torch.tensor(tok(load_text("wikitext2", "train")[:200_000], add_special_tokens=False)["input_ids"])
        f = extract(model, Recipe("mxint4"), ids, which="landscape", n_windows=FEATURE_WINDOWS)
        return {"seconds": time.perf_counter() - t0, "landscape": {k: v for k, v in f.items()}, **out}
    if stage == "quantize":
        calib = sample_calibration(tok, 128, 256)
        out["calib_seconds"] = time.perf_counter() - t0
        kept = arch.blocks(model)  # held, so the whole model stays in memory
        fp_block = copy.deepcopy(kept[0].state_dict())  # GPTQ starts from the FP block, not from RTN's output
        parent = model.model
        times = {}
        for method in ("rtn", "gptq"):
            kept[0].load_state_dict(fp_block)
            parent.layers = torch.nn.ModuleList(kept[:1])
            model.config.num_hidden_layers = 1
            t0 = time.perf_counter()
            report = quantize_model(model, Recipe("mxint4", method=method), calib, progress=False,
                                    output_errors=True, dtype="fp32")
            times[method] = time.perf_counter() - t0
            out[f"{method}_output_error"] = sum(r.output_error for r in report.layers) / len(report.layers)
        parent.layers = torch.nn.ModuleList(kept)
        return {"seconds": times["rtn"] + times["gptq"], "rtn_seconds": times["rtn"],
                "gptq_seconds": times["gptq"], **out}
    if stage == "compare":
        return {**timed_compare(model, tok, 4), **out}
    raise SystemExit(f"unknown stage {stage!r}; stages: build, {', '.join(STAGES)}")


# ---- the report: measured stages and the paper extrapolation ---------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


# Llama-2-7B / Llama-2-70B shapes for the extrapolation
SHAPES = {
    "1B (measured model)": dict(layers=16, hidden=2048, inter=8192, heads=32, kv=8, vocab=49152, tied=True),
    "7B": dict(layers=32, hidden=4096, inter=11008, heads=32, kv=32, vocab=32000, tied=False),
    "70B": dict(layers=80, hidden=8192, inter=28672, heads=64, kv=8, vocab=32000, tied=False),
}
CPU_OVERHEAD = 1.5 * 2**30  # interpreter, torch, tokenizer and data (measured ~1.5 GiB in the 1B stages)
GPU_FP32 = 0.5 * 67e12  # an H100 SXM's float32 (non-tensor-core) peak at 50%: the features run in float32
GPU_BF16 = 0.4 * 990e12  # its dense bf16 peak at 40%: the comparison's forward passes
GPU_COLUMN_S = 1e-4  # GPTQ's column loop on a GPU: ~10 small kernels per column, ~0.1 ms
# FLOPs per token of the features' pass as multiples of 2 x params: the directional pass (forward, the x delta^T
# products, a backward with create_graph, its backward: ~8 forward-equivalents) plus the five no-grad forwards of
# the FP, radial and random-direction losses
FEATURE_FORWARDS = 13


def _linear_params(s: dict) -> float:
    head_dim = s["hidden"] // s["heads"]
    return s["layers"] * (2 * s["hidden"] ** 2 + 2 * s["hidden"] * s["kv"] * head_dim + 3 * s["hidden"] * s["inter"])


def _params(s: dict) -> float:
    return _linear_params(s) + s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)


def _graph_bytes(s: dict, seq: int = 256) -> float:
    """``features.state.graph_bytes_per_window`` for this shape (one window's double-backward graph)."""
    logits = seq * s["vocab"] * 4
    return 1.5 * (s["layers"] * seq * (16 * s["hidden"] + 8 * s["inter"] + 8 * s["heads"] * seq) * 4
                  + 4 * min(logits, 64 * 2**20))


def _fmt_s(seconds: float) -> str:
    if seconds != seconds:  # NaN: the 1B stage was not measured
        return "n/a"
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def extrapolate(results: dict) -> list[str]:
    """Memory and time of the features' landscape pass (the default 8 windows), whole-model GPTQ and a 64-window
    comparison, for this model and for 7B and 70B.

    Memory: what each stage holds (bytes per parameter plus per-block and per-window terms). CPU time: the 1B
    stage's measured seconds scaled by FLOPs (the comparison and the features are linear in parameters; GPTQ is one
    block's measured cost times the blocks, scaled by the block's parameters). GPU time: FLOPs at the rates above,
    plus GPTQ's column loop. Estimates."""
    nan = float("nan")
    one = SHAPES["1B (measured model)"]
    p1, blk1 = _params(one), _linear_params(one) / one["layers"]
    sens, quant, comp = (results.get(k) for k in ("sensitivity", "quantize", "compare"))
    feat_tokens, calib_tokens, eval_tokens = 8 * 256, 128 * 256, 64 * 256  # the defaults: 8 feature windows
    lines = ["| model | params | landscape pass (8 windows): memory | CPU | GPU | whole-model GPTQ: CPU memory | "
             "GPU memory | CPU | GPU | 64-window compare: memory | CPU | GPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in SHAPES.items():
        p, lin = _params(s), _linear_params(s)
        blk = lin / s["layers"]
        feat_mem = 4 * p + 2 * lin + _graph_bytes(s) + CPU_OVERHEAD
        feat_cpu = sens["seconds"] * (feat_tokens / (FEATURE_WINDOWS * 256)) * p / p1 if sens else nan
        feat_gpu = FEATURE_FORWARDS * 2 * p * feat_tokens / GPU_FP32
        gptq_cpu_mem = 2 * p + 4 * blk + 2 * calib_tokens * s["hidden"] * 4 + CPU_OVERHEAD
        gptq_gpu_mem = 4 * blk + 2 * calib_tokens * s["hidden"] * 4 + 4 * s["inter"] ** 2 * 2  # + the Hessians
        gptq_cpu = quant["gptq_seconds"] * s["layers"] * blk / blk1 if quant else nan
        columns = s["layers"] * (4 * s["hidden"] + 2 * s["hidden"] + s["inter"])  # q k v o gate up: hidden; down
        gptq_gpu = 2 * 2 * lin * calib_tokens / GPU_FP32 + columns * GPU_COLUMN_S
        comp_mem = 2 * 2 * p + CPU_OVERHEAD
        comp_cpu = comp["seconds"] * (p / p1) * (eval_tokens / (4 * 256)) if comp else nan
        comp_gpu = 2 * 2 * p * eval_tokens / GPU_BF16
        lines.append(f"| {name} | {p / 1e9:.2f}B | {feat_mem / 2**30:.0f} GiB | {_fmt_s(feat_cpu)} | "
                     f"{_fmt_s(feat_gpu)} | {gptq_cpu_mem / 2**30:.0f} GiB | {gptq_gpu_mem / 2**30:.1f} GiB | "
                     f"{_fmt_s(gptq_cpu)} | {_fmt_s(gptq_gpu)} | {comp_mem / 2**30:.0f} GiB | {_fmt_s(comp_cpu)} | "
                     f"{_fmt_s(comp_gpu)} |")
    return lines


def render(results: dict) -> str:
    meta = results.get("_meta", {})
    build_r = results.get("build", {})
    rows = ["| stage | seconds | peak RSS GiB | notes |", "|---|---:|---:|---|"]
    notes = {
        "sensitivity": f"landscape group, MXINT4 RTN, {FEATURE_WINDOWS} windows x 256 tokens, float32",
        "quantize": "RTN {rtn:.0f} s + GPTQ {gptq:.0f} s of block 0 of 16, 128 x 256 calibration tokens",
        "compare": "4 windows x 256 tokens, bf16 forward passes, float32 head/KL",
        "predict": f"default predictor's groups, {FEATURE_WINDOWS} windows; load {{load:.0f}} s more",
    }
    worst = 0
    for stage in STAGES:
        r = results.get(stage)
        if r is None:
            continue
        worst = max(worst, r["peak_rss_bytes"])
        note = notes[stage].format(rtn=r.get("rtn_seconds", 0), gptq=r.get("gptq_seconds", 0),
                                   load=r.get("load_seconds", 0))
        rows.append(f"| {stage} | {r['seconds']:.0f} | {_gib(r['peak_rss_bytes'])} | {note} |")
    met = "**met**" if worst and worst <= TARGET_GIB * 2**30 else "not met"
    return "\n".join([
        "## The 1B proof (`benchmarks/bench_1b.py`)",
        "",
        f"Measured {meta.get('date', '?')} on {meta.get('machine', '?')}, one torch thread per process; the "
        "machine was loaded by background jobs on both cores (a zoo training run and a SmolLM2 sweep; load average "
        f"{meta.get('load', '?')} at the end), so the seconds are pessimistic.",
        "",
        f"A random-weight Llama built from its config (hidden 2048, 16 blocks, MLP 8192, 32/8 heads, 49,152-token "
        f"vocabulary, tied embeddings): {build_r.get('n_params', 0) / 1e9:.2f}B parameters, saved in bf16 "
        f"({build_r.get('seconds', 0):.0f} s to build and save). Its numbers mean nothing; it proves memory and time "
        "only. Each stage is its own process under `/usr/bin/time -v`; peak RSS includes the interpreter, torch and "
        "the tokenizer.",
        "",
        *rows,
        "",
        f"Target: each stage within {TARGET_GIB:.0f} GiB peak RSS: {met} (worst {_gib(worst)} GiB).",
        "",
        "### On paper: 7B and 70B (estimates, not measurements)",
        "",
        "Memory from what each stage holds: the features keep float32 weights (4 B/param), the bf16 quantization "
        "direction (2 B per linear weight) and one window's double-backward graph (`graph_bytes_per_window`); "
        "GPTQ keeps the bf16 weights (2 B/param) plus one block in float32 and a block's inputs and outputs "
        "(spilled to disk above `--max-memory`; on a GPU only that block and its activations are there); the "
        "comparison holds two bf16 models. CPU times scale the 1B measurements by parameters (FLOPs per token "
        "are 2 x parameters per forward pass; GPTQ by one block's measured seconds times the blocks). GPU times "
        f"count FLOPs on one H100/H200-class GPU: the features' pass ~{FEATURE_FORWARDS} forward-equivalents per "
        "token in float32 at 50% of 67 TFLOP/s, the comparison in bf16 at 40% of 990 TFLOP/s, GPTQ's two float32 "
        "block passes plus ~0.1 ms per column of its column loop. Every row is an estimate (the 1B row scales "
        "this model's stages to the defaults: 8 feature windows, all 16 blocks, 64 windows); CPU times inherit the "
        "load of the machine they were measured on.",
        "",
        *extrapolate(results),
        "",
        "What still scales with the model beyond the weights: the embedding and the head (a 128k-token vocabulary "
        "is 2 GB of bf16 at 8B); the features' float32 weights and direction (6 B/param: a 70B model's features "
        "need ~440 GiB, more than one GPU holds; the landscape group would have to run block-sharded there); the "
        "comparison's two models (one FP and one quantized copy).",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/quantpredict-1b", help="where the random model is saved")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--force", action="store_true", help="measure stages already in the results file again")
    ap.add_argument("--write", action="store_true", help="write the 1b section of reports/benchmarks.md")
    ap.add_argument("--clean", action="store_true", help="delete the saved model afterwards")
    ap.add_argument("--child", metavar="STAGE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dir)))
        return 0
    import torch

    torch.set_num_threads(1)  # this script's setting; each stage's child runs with one thread too
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    directory = Path(args.dir)
    if not (directory / "config.json").exists():
        results["build"] = run_measured([__file__, "--child", "build", "--dir", str(directory)])
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"built {results['build']['n_params'] / 1e9:.2f}B parameters in {results['build']['seconds']:.0f} s, "
              f"peak {_gib(results['build']['peak_rss_bytes'])} GiB")
    for stage in [s for s in args.stages.split(",") if s]:
        if stage in results and not args.force:
            continue
        measure_stage([__file__, "--child", stage, "--dir", str(directory)], label=f"{stage:12s}",
                      target_gib=TARGET_GIB, results=results, where=results, key=stage, results_path=RESULTS)
    if args.write:
        write_section("1b", render(results))
        print(f"wrote the 1b section of {REPORTS / 'benchmarks.md'}")
    if args.clean:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
