"""Whole-model RTN quantization to each llama.cpp type and named mix: llama-quantize against ``quantpredict
quantize``, end to end, in one run (issue #30's speed target: every type within 3x of llama-quantize).

Both sides quantize the same tensors of the same model with one thread, each command timed as a whole process
(startup, reading, quantizing, writing) under ``/usr/bin/time -v``, the two commands of a type run back to back so
that the machine's load falls on both alike:

* llama.cpp: ``llama-quantize [--pure] --token-embedding-type f16 --output-tensor-type f16 F32.gguf OUT.gguf TYPE 1``
  from the F32 GGUF of the model (``benchmarks/llamacpp_reference.py convert``): every linear weight quantized,
  the embedding and the head written in F16, as the project's recipes leave them (16-bit);
* project: ``quantpredict quantize MODEL --format TYPE --method rtn --out DIR`` (``--mix NAME`` for a mix) with
  ``OMP_NUM_THREADS=1``: loads the float32 HF checkpoint, quantizes every linear layer, saves the fake-quantized
  checkpoint (float32 safetensors: four times the bytes of the F16/quantized GGUF).

The F32 GGUF comes from llama.cpp's converter once (not timed). Needs the built tools (``make llamacpp``).

    .venv/bin/python benchmarks/bench_llamacpp_speed.py [--model smollm2-135m] [--types q8_0,q4_k,...] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llamacpp_reference as ref  # noqa: E402
from _common import REPORTS, load_average, machine, write_section  # noqa: E402

TYPES = ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k", "iq4_nl", "iq4_xs")
MIXES = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q3_k_m": "Q3_K_M", "iq4_xs_mix": "IQ4_XS"}
PURE = {"q6_k": "q6_k_pure", "q5_k": "q5_k_pure", "q4_k": "q4_k_pure", "q3_k": "q3_k_s"}  # llama-quantize --pure
RESULTS = REPORTS / "bench_llamacpp_speed.json"
TARGET = 3.0
REAL = {m: " (**4-bit on the way in**: its GGUF package)" for m in ("smollm2-135m", "qwen2.5-coder-1.5b")}


class Failed(Exception):
    """A timed command that exited non-zero; its message is the command's own last lines."""


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """``cmd`` under ``/usr/bin/time -v``: wall seconds, peak RSS and stdout; :class:`Failed` with the command's last
    lines (before time's report) when it fails."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    own_err = re.split(r"Command exited with non-zero status|\tCommand being timed:", p.stderr)[0]
    if p.returncode != 0:
        raise Failed(" | ".join((p.stdout + own_err).strip().splitlines()[-2:]))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return {"seconds": wall, "peak_rss_bytes": int(m.group(1)) * 1024 if m else None, "stdout": p.stdout}


def llama_quantize(f32: Path, out: Path, ftype: str, pure: bool) -> dict:
    cmd = [str(ref._need("llama-quantize"))] + (["--pure"] if pure else []) + [
        "--token-embedding-type", "f16", "--output-tensor-type", "f16", str(f32), str(out), ftype, "1"]
    return timed(cmd)


def project_quantize(model: str, what: str, out: Path) -> dict:
    """``quantpredict quantize``: a named mix by ``--mix``, a K type by its ``--pure`` mix where there is one (the
    same recipe where 256-element super-blocks tile the rows, llama.cpp's fallback where they do not), any other
    type by ``--format``; ``quantize_seconds`` is the quantization step alone (its ``--json`` total)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    which = (["--mix", what] if what in MIXES else ["--mix", PURE[what]] if what in PURE else ["--format", what])
    r = timed([sys.executable, "-m", "quantpredict", "quantize", model, *which, "--method", "rtn", "--out", str(out),
               "--json"], env=env)
    r["quantize_seconds"] = json.loads(r.pop("stdout"))["total_seconds"]
    r["recipe"] = " ".join(which)
    return r


def render_model(model: str, results: dict) -> list[str]:
    meta = results.get("_meta", {})
    rows = [f"### {model}{REAL.get(model, '')}", "",
            f"Measured {meta.get('date', '?')} on {meta.get('machine', '?')}, one thread each; load average "
            f"{meta.get('load', '?')} at the end ({meta.get('load_note', 'other jobs not stated')}).", "",
            "| type or mix | project recipe | llama-quantize s | project s | ratio | project's quantizing step s | "
            "llama-quantize GiB | project GiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for name, r in results.get("rows", {}).items():
        ratio = r["project"]["seconds"] / r["llama"]["seconds"]
        worst = max(worst, ratio)
        rows.append(f"| {name} | `{r['project']['recipe']}` | {r['llama']['seconds']:.1f} | "
                    f"{r['project']['seconds']:.1f} | {ratio:.1f}x | {r['project']['quantize_seconds']:.1f} | "
                    f"{r['llama']['peak_rss_bytes'] / 2**30:.2f} | {r['project']['peak_rss_bytes'] / 2**30:.2f} |")
    earlier: dict[tuple, list[str]] = {}  # rows kept from an earlier run by --merge
    for name, r in results.get("rows", {}).items():
        if "measured" in r:
            m = r["measured"]
            earlier.setdefault((m.get("date"), m.get("load"), m.get("load_note")), []).append(name)
    kept = [f"- {', '.join(names)}: kept from the run of {d} (load average {ld} at its end; "
            f"{note or 'other jobs not stated'})" for (d, ld, note), names in earlier.items()]
    skipped = [f"- {name}: not one uniform recipe on this model ({why.rpartition(' | ')[2] or why})"
               for name, why in results.get("skipped", {}).items()]  # the error line, not a progress bar before it
    met = "**met**" if results.get("rows") and worst <= TARGET else "**not met**"
    floor = results.get("startup_seconds")
    floor_line = ([f"Python importing torch took {floor:.1f} s in the same run. The direct path imports it only "
                   "for a layer whose type the C kernel does not quantize whole (all but Q4_0, Q4_1, Q5_0, Q5_1, "
                   "Q8_0 and Q3_K-Q6_K; before 2026-12-08 every row imported it). Every project row writes a float32 "
                   "checkpoint (4 bytes a weight, where llama-quantize writes its 0.5-1 byte GGUF blocks).", ""]
                  if floor is not None else [])
    return [*rows, *([""] + kept if kept else []), *([""] + skipped if skipped else []), "", *floor_line,
            f"Target: every type and mix within {TARGET:.0f}x of llama-quantize: {met} (worst {worst:.1f}x).", ""]


def render(results: dict) -> str:
    return "\n".join([
        "## llama-quantize vs `quantpredict quantize`, end to end (`benchmarks/bench_llamacpp_speed.py`)",
        "",
        "One thread each, the two commands of a row back to back. Each is a whole process under `/usr/bin/time -v`: "
        "llama-quantize from the F32 GGUF (`--pure` for a type, the embedding and head in F16), `quantpredict "
        "quantize --method rtn` from the float32 HF checkpoint (start Python, and torch where a layer's "
        "type needs it, read, quantize every linear layer, write float32 safetensors; for llama-layout checkpoints "
        "straight from the files, mapped and written tensor by tensor, without building the model: "
        "`quantpredict.checkpoint_rtn`). Types whose 256-element super-blocks do not tile a row fall back alike on "
        "both sides (llama.cpp's rule).",
        "",
        *[line for model, r in results.items() for line in render_model(model, r)],
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default=",".join(TYPES) + "," + ",".join(MIXES))
    ap.add_argument("--f32", type=Path, default=None, help="the model's F32 GGUF (default: the reference's cache)")
    ap.add_argument("--load-note", default=None, help="what else ran on the machine")
    ap.add_argument("--write", action="store_true", help="write the section of reports/benchmarks.md")
    ap.add_argument("--merge", action="store_true",
                    help="keep the model's stored rows of the types not in --types (each row says when it ran)")
    args = ap.parse_args()
    if not ref.built():
        raise SystemExit("llama.cpp's tools are not built: make llamacpp")
    f32 = args.f32 or ref.home() / "work" / f"{args.model}-f32.gguf"
    if not f32.is_file():
        print(f"converting {args.model} to {f32} (not timed)", flush=True)
        f32.parent.mkdir(parents=True, exist_ok=True)
        ref.convert(args.model, f32)
    everything = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if "rows" in everything:  # the first layout: one model's results
        everything = {everything["_meta"]["model"]: everything}
    results: dict = {"rows": {}, "skipped": {}}
    previous = everything.get(args.model, {})
    if args.merge and previous:
        stamp = {k: previous.get("_meta", {}).get(k) for k in ("date", "load", "load_note")}
        results["rows"] = {k: {"measured": stamp, **v} for k, v in previous.get("rows", {}).items()}
        results["skipped"] = dict(previous.get("skipped", {}))
    # what a row pays where a layer's type needs torch: a Python that has imported it
    floor = timed([sys.executable, "-c", "import torch"],
                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    results["startup_seconds"] = floor["seconds"]
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-speed-") as tmp:
        for name in [t for t in args.types.split(",") if t]:
            is_mix = name in MIXES
            if not is_mix and name not in TYPES:
                raise SystemExit(f"unknown type {name!r}; types: {', '.join(TYPES)}; mixes: {', '.join(MIXES)}")
            ftype = MIXES[name] if is_mix else name.upper()
            try:
                project = project_quantize(args.model, name, Path(tmp) / "out-dir")
            except Failed as e:  # a type the model's rows do not allow as one uniform recipe
                results["skipped"][name] = str(e)
                print(f"{name:12s} skipped: {e}", flush=True)
                continue
            finally:
                shutil.rmtree(Path(tmp) / "out-dir", ignore_errors=True)
            llama = llama_quantize(f32, Path(tmp) / "out.gguf", ftype, pure=not is_mix)
            (Path(tmp) / "out.gguf").unlink(missing_ok=True)
            llama.pop("stdout")
            results["skipped"].pop(name, None)
            results["rows"][name] = {"llama": llama, "project": project}
            print(f"{name:12s} llama-quantize {llama['seconds']:6.1f} s   project {project['seconds']:6.1f} s "
                  f"(quantizing {project['quantize_seconds']:.1f} s)   {project['seconds'] / llama['seconds']:.1f}x",
                  flush=True)
    results["_meta"] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "load": load_average(),
                        "model": args.model, **({"load_note": args.load_note} if args.load_note else {})}
    everything[args.model] = results
    RESULTS.write_text(json.dumps(everything, indent=1) + "\n")
    if args.write:
        write_section("llamacpp-speed", render(everything))
        print(f"wrote the llamacpp-speed section of {REPORTS / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
