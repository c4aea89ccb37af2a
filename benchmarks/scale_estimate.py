"""From the stages measured on Qwen2.5-Coder-1.5B to 7B and 72B of the same family: estimates, not measurements.

Reads ``reports/bench_stages.json`` (``benchmarks/bench_stages.py``: every stage at 1.5B, one process each, one torch
thread, seconds and peak RSS) and scales each stage to the published shapes of Qwen2.5-7B and Qwen2.5-72B by the
cost that stage is made of, one rule per stage, each stated in the table it writes (section ``scale`` of
``reports/benchmarks.md``):

* time: the measured 1.5B seconds times the ratio of the stage's operation count (forward FLOPs per token for the
  comparison and the profile, linear-layer parameters for load and RTN, GPTQ's per-block count of calibration
  forwards, Hessian accumulation and column updates times the blocks, the pricing's quadratic forms for
  predict/rank/allocate);
* memory: the measured peak RSS scaled by the parameter count (the float32 weights are 7.1 GB of the 1.5B model's
  7.1-12 GiB stages); a GPU column gives what the device would hold, from the same bytes-per-parameter;
* GPU seconds: the operation count at a stated fraction of an H100's peak (see the constants), no measurement.

    .venv/bin/python benchmarks/scale_estimate.py [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPORTS, write_section  # noqa: E402

#: The measured model and two larger ones of its family (their published config.json: hidden size, layers, MLP
#: width, query and KV heads, vocabulary; all three have an untied head)
SHAPES = {
    "Qwen2.5-Coder-1.5B (measured)": dict(layers=28, hidden=1536, inter=8960, heads=12, kv=2, vocab=151936),
    "Qwen2.5-7B": dict(layers=28, hidden=3584, inter=18944, heads=28, kv=4, vocab=152064),
    "Qwen2.5-72B": dict(layers=80, hidden=8192, inter=29568, heads=64, kv=8, vocab=152064),
}
CALIB_TOKENS = 128 * 256  # GPTQ's calibration batch (the recipe default)
MACHINE_BYTES = 24 * 2**30  # this machine's memory
SESSION_S = 3 * 3600  # a background job's life here: one session; GPTQ and the comparison resume past it
GPU_BF16 = 0.4 * 990e12  # an H100 SXM's dense bf16 peak at 40%: forward passes (comparison, calibration)
GPU_FP32 = 0.5 * 67e12  # its float32 (non-tensor-core) peak at 50%: the profile's float32 passes
GPU_COLUMN_S = 1e-4  # GPTQ's column loop on a GPU: ~10 small kernels per column, ~0.1 ms


def _linears(s: dict) -> list[tuple[int, int]]:
    """``(out, in)`` of one block's linear layers: q, k, v, o, gate, up, down."""
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv"]
    return [(h, h), (kv, h), (kv, h), (h, h), (s["inter"], h), (s["inter"], h), (h, s["inter"])]


def linear_params(s: dict) -> float:
    return s["layers"] * sum(o * i for o, i in _linears(s))


def params(s: dict) -> float:
    return linear_params(s) + 2 * s["vocab"] * s["hidden"]  # embedding and an untied head


def forward_flops_per_token(s: dict) -> float:
    """2 x (linear weights + head): the matmuls a token passes through (attention over 256 positions is < 2%)."""
    return 2 * (linear_params(s) + s["vocab"] * s["hidden"])


def gptq_block_ops(s: dict) -> float:
    """One block of GPTQ: the block's forward twice on the calibration batch (inputs, then outputs as quantized),
    each linear's Hessian ``X^T X`` (2 N in^2), and GPTQ's lazy-batch column updates (~ out x in^2 per layer)."""
    lin = _linears(s)
    return (CALIB_TOKENS * (2 * 2 * sum(o * i for o, i in lin) + 2 * sum(i * i for _, i in lin))
            + sum(o * i * i for o, i in lin))


def pricing_ops(s: dict) -> float:
    """A recipe priced against the profile: per layer a quadratic form of the weight change with the layer's input
    second moment (``dW A``: out x in^2), every layer."""
    return s["layers"] * sum(o * i * i for o, i in _linears(s))


def _fmt_s(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


#: stage -> (label, how its seconds scale, a factor on the measured seconds, rule as written in the table)
STAGES = {
    "load": ("load (float32)", params, 1, "parameters"),
    "rtn": ("RTN, in place", linear_params, 1, "linear parameters"),
    "gptq": ("GPTQ, whole model", lambda s: s["layers"] * gptq_block_ops(s), 1, "blocks x per-block count"),
    "compare": ("compare, 64 windows", forward_flops_per_token, 2, "forward FLOPs; 32 windows measured, x2"),
    "profile": ("profile, cold", forward_flops_per_token, 1, "forward FLOPs"),
    "predict": ("predict, warm profile", pricing_ops, 1, "pricing quadratic forms"),
    "rank": ("rank --methods rtn, warm", pricing_ops, 1, "pricing quadratic forms"),
    "allocate": ("allocate, warm", pricing_ops, 1, "pricing quadratic forms"),
}


def gpu_seconds(stage: str, s: dict) -> float | None:
    """The stages a lent GPU runs first (issue #31): the profile, GPTQ and a 64-window comparison."""
    if stage == "compare":
        return 2 * forward_flops_per_token(s) * 64 * 256 / GPU_BF16
    if stage == "profile":
        return 3 * forward_flops_per_token(s) * 8 * 256 / GPU_FP32  # forward + backward on its windows
    if stage == "gptq":
        columns = s["layers"] * sum(i for _, i in _linears(s))
        return s["layers"] * (gptq_block_ops(s) - sum(o * i * i for o, i in _linears(s))) / GPU_BF16 \
            + columns * GPU_COLUMN_S
    return None


def render(stages: dict, meta: dict) -> str:
    base = SHAPES["Qwen2.5-Coder-1.5B (measured)"]
    names = list(SHAPES)
    head = ("| stage | scaled by | " + " | ".join(f"{n}: CPU time | peak RSS" for n in names)
            + " | 72B on a GPU (paper) |")
    rows = [head, "|---|---|" + "---:|---:|" * len(names) + "---:|"]
    fits: dict[str, list[str]] = {n: [] for n in names}
    for key, (label, cost, factor, rule) in STAGES.items():
        m = stages.get(key)
        if m is None:
            continue
        cells = []
        for n, s in SHAPES.items():
            t = factor * m["seconds"] * cost(s) / cost(base)
            rss = m["peak_rss_bytes"] * params(s) / params(base)
            cells.append(f"{_fmt_s(t)} | {rss / 2**30:.0f} GiB")
            # GPTQ and the comparison resume block by block and window by window: time is no limit for them
            if rss <= MACHINE_BYTES and (t <= SESSION_S or key in ("gptq", "compare")):
                fits[n].append(label)
        g = gpu_seconds(key, SHAPES["Qwen2.5-72B"])
        rows.append(f"| {label} | {rule} | " + " | ".join(cells) + f" | {_fmt_s(g) if g is not None else ''} |")
    gptq = stages.get("gptq", {})
    lines = [
        "## Scale: from the measured 1.5B stages to 7B and 72B (`benchmarks/scale_estimate.py`; estimates)",
        "",
        f"Every number for 7B and 72B is an **estimate**: the 1.5B stage measured on {meta.get('date', '?')} "
        f"({meta.get('machine', '?')}, one torch thread, load average {meta.get('load', '?')}: the `stages` section "
        "above; Qwen2.5-Coder-1.5B was **4-bit on the way in**) scaled by the count named in the second column, "
        "for the published shapes of Qwen2.5-7B and Qwen2.5-72B. Memory is the measured peak scaled by the "
        "parameter count (float32 weights dominate). GPTQ at 1.5B is itself scaled from "
        f"{gptq.get('blocks_timed', '?')} of {gptq.get('blocks', '?')} blocks. The GPU column is FLOPs at 40% "
        "of an H100's dense bf16 peak (50% of float32 for the profile) plus 0.1 ms per GPTQ column: paper, no "
        "device has run it.",
        "",
        *rows,
        "",
        "What runs where, by these estimates:",
    ]
    for n in names:
        ok = fits[n]
        lines.append(f"- **{n}**: " + ("every stage runs on this CPU machine (24 GiB, float32; GPTQ and the "
                                       "comparison resume across sessions)" if len(ok) == len(rows) - 2 else
                                       "no stage fits this machine's 24 GiB in float32" if not ok else
                                       "on this CPU machine: " + ", ".join(ok) + "; the rest does not fit") + ".")
    lines += [
        "- The float32 weights are what rule out 7B here: bf16 weights would halve the load, RTN and comparison "
        "memory (not measured); the profile and GPTQ keep float32 copies of what they work on.",
        "- A lent GPU should run first: `benchmarks/gpu_check.py` (CUDA against CPU on a seeded model), then the "
        "profile, whole-model GPTQ and a 64-window comparison timed on a random-weight Qwen2 of the 1.5B shape "
        "(no weights travel: the device's tree is limited to 64 MiB). That timing script is not written yet; no "
        "device has been lent to this work so far.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=Path, default=REPORTS / "bench_stages.json")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="the measured model's key in the stages file")
    ap.add_argument("--write", action="store_true", help="write the section into reports/benchmarks.md")
    args = ap.parse_args(argv)
    data = json.loads(args.stages.read_text())
    if args.model not in data:
        print(f"scale_estimate: error: {args.stages} has no stages of {args.model!r} (has: "
              f"{', '.join(k for k in data if not k.startswith('_'))}); run benchmarks/bench_stages.py",
              file=sys.stderr)
        return 2
    text = render(data[args.model], data.get("_meta", {}))
    print(text)
    if args.write:
        write_section("scale", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
