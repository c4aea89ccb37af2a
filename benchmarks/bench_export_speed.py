"""A GGUF file from a Hugging Face checkpoint, two ways, end to end, in one run: llama.cpp's own route (its
``convert_hf_to_gguf.py`` to an F32 GGUF, then ``llama-quantize``) against ``quantpredict export`` (which runs the
same converter, then packs the recipe's tensors itself), for a named mix's whole file (``--recipe MIX-file``: the
token embedding and head in llama-quantize's types, so both sides write the same file).

Each command is a whole process under ``/usr/bin/time -v`` with one thread (``OMP_NUM_THREADS=1``, llama-quantize's
``nthread`` 1), the two routes of a row back to back. The converter writes float32 (``--outtype f32``: the weights
exactly, as export converts); a llama.cpp user converting to f16 instead writes half the bytes and gets another
file. Needs the built tools (``make llamacpp``).

    .venv/bin/python benchmarks/bench_export_speed.py [--models smollm2-135m qwen2.5-coder-1.5b] [--mix q4_k_m]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llamacpp_reference as ref  # noqa: E402
from _common import load_average, machine, write_section  # noqa: E402
from bench_llamacpp_speed import MIXES, timed  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
REAL = {"smollm2-135m": " (**4-bit on the way in**: its GGUF package)",
        "qwen2.5-coder-1.5b": " (**4-bit on the way in**: its GGUF package)"}


def llama_route(model: str, mix: str, tmp: Path, env: dict) -> dict:
    """llama.cpp's converter to F32, then llama-quantize: the seconds and peak RSS of each, and their sum."""
    from quantpredict import export
    from quantpredict.models import resolve

    f32, out = tmp / "f32.gguf", tmp / "llama.gguf"
    cmd, conv_env = export.converter_command(resolve(model), f32, "f32", export.converter_dir(download=False))
    conv = timed(cmd, env={**conv_env, **ONE_THREAD})
    quant = timed([str(ref._need("llama-quantize")), str(f32), str(out), MIXES[mix], "1"], env=env)
    f32.unlink()
    return {"convert": conv["seconds"], "quantize": quant["seconds"], "seconds": conv["seconds"] + quant["seconds"],
            "peak_rss_bytes": max(conv["peak_rss_bytes"] or 0, quant["peak_rss_bytes"] or 0), "out": out}


def same_contents(a: Path, b: Path) -> str:
    """Whether two GGUF files hold the same key/value fields (bytes of each) and the same tensors (type and bytes),
    and whether in the same order: llama-quantize appends ``general.file_type`` and orders the tensors its own way,
    where export keeps the converter's order."""
    import gguf
    import numpy as np

    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    fa = {f.name: [bytes(p) for p in f.parts] for f in ra.fields.values()}
    fb = {f.name: [bytes(p) for p in f.parts] for f in rb.fields.values()}
    ta = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in ra.tensors}
    tb = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in rb.tensors}
    if fa != fb or ta != tb:
        return "no"
    return "yes" if list(fa) == list(fb) and list(ta) == list(tb) else "yes (another order)"


def project_route(model: str, mix: str, tmp: Path, env: dict) -> dict:
    out = tmp / "project.gguf"
    r = timed([sys.executable, "-m", "quantpredict", "export", model, "--recipe", f"{mix}-file", "--gguf", str(out)],
              env=env)
    return {"seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"], "out": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--mix", default="q4_k_m", choices=sorted(MIXES))
    ap.add_argument("--load-note", default="nothing else stated")
    ap.add_argument("--write", action="store_true", help="write the section of reports/benchmarks.md")
    args = ap.parse_args(argv)
    if not ref.built():
        raise SystemExit("llama.cpp's tools are not built: make llamacpp")
    env = {**os.environ, **ONE_THREAD}
    rows = ["| model | llama.cpp: convert s | llama-quantize s | llama.cpp route s | `quantpredict export` s | "
            "ratio | same contents | peak GiB (llama.cpp / project) |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for model in args.models:
        with tempfile.TemporaryDirectory(prefix="bench-export-") as t:
            tmp = Path(t)
            llama = llama_route(model, args.mix, tmp, env)
            project = project_route(model, args.mix, tmp, env)
            same = same_contents(llama["out"], project["out"])
            ratio = project["seconds"] / llama["seconds"]
            print(f"{model}: llama.cpp {llama['convert']:.1f} + {llama['quantize']:.1f} s, export "
                  f"{project['seconds']:.1f} s ({ratio:.1f}x), same contents: {same}", flush=True)
            rows.append(f"| {model}{REAL.get(model, '')} | {llama['convert']:.1f} | {llama['quantize']:.1f} | "
                        f"{llama['seconds']:.1f} | {project['seconds']:.1f} | {ratio:.1f}x | {same} "
                        f"| {llama['peak_rss_bytes'] / 2**30:.2f} / {project['peak_rss_bytes'] / 2**30:.2f} |")
    text = "\n".join([
        "## A GGUF file from the HF checkpoint: llama.cpp's route against `quantpredict export` "
        "(`benchmarks/bench_export_speed.py`)", "",
        f"Measured on {machine()}, one thread each, each command a whole process; load average {load_average()} at "
        f"the end ({args.load_note}). The file is {MIXES[args.mix]} with the token embedding and head in "
        f"llama-quantize's types (`--recipe {args.mix}-file`). llama.cpp's route: `convert_hf_to_gguf.py --outtype "
        "f32`, then `llama-quantize`. `quantpredict export` runs the same converter, then packs every tensor of the "
        "recipe itself (`formats.ggml.to_gguf_bytes`) and writes the file with the `gguf` package. \"Same "
        "contents\": every key/value field and every tensor (its type and bytes) of the two files compared; "
        "llama-quantize also reorders them. There is no target for this; it is here so that a user choosing a "
        "route knows the cost.", "", *rows])
    print(text)
    if args.write:
        write_section("export-speed", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
