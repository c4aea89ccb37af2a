"""The exported allocation against llama.cpp's own mix, judged by llama.cpp's own tool (issue #30).

For MODEL and a named mix (default Q4_K_M):

1. ``quantpredict allocate MODEL --match MIX --out alloc.json``: per-layer llama.cpp types at the mix's bits,
   priced from the weights (the profile cache is used when warm);
2. ``quantpredict export MODEL --recipe-file alloc.json --embedding-type T [--output-type U]``, T and U being the
   types llama-quantize gives the token embedding and the output head in its own MIX file (read from that file),
   so that both files spend the same bytes there;
3. ``llama-quantize F32.gguf MIX`` for llama.cpp's own file;
4. ``llama-perplexity --kl-divergence`` of both files against the F32 GGUF (the base logits cached as in
   ``llamacpp_reference.py kld-table``), and both files' sizes.

Neither side uses an importance matrix. Writes the ``llamacpp:alloc:MODEL`` section of reports/llamacpp.md.

    .venv/bin/python benchmarks/llamacpp_allocation.py [--model smollm2-135m] [--mix q4_k_m] [--chunks 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llamacpp_reference as ref  # noqa: E402
from _common import load_average, machine, write_between  # noqa: E402

REPORT = ref.ROOT / "reports" / "llamacpp.md"
REAL = ("smollm2-135m", "qwen2.5-coder-1.5b")


def project(argv: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "quantpredict", *argv], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"quantpredict {' '.join(argv[:2])} failed: {done.stderr.strip()[-400:]}")
    return done.stdout


def kld_of(base: Path, quant: Path, *, text: Path, chunks: int, logits: Path) -> tuple[float, float]:
    out = ref.kld(base, quant, text=text, chunks=chunks, logits=logits)
    m = ref._KLD.search(out)
    if not m:
        raise SystemExit(f"no KLD in llama-perplexity's output for {quant}")
    return float(m.group(1)), float(m.group(2))


def _kld(x) -> str:
    """A KLD to four decimals, or to three significant digits below 0.001 (an allocation that reproduces weights
    already on llama.cpp's grid is priced near 0, which four decimals would print as 0.0000)."""
    x = float("nan") if x is None else float(x)
    return f"{x:.4f}" if not abs(x) < 1e-3 else f"{x:.3g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--mix", default="q4_k_m")
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--load-note", default="state the load")
    ap.add_argument("--imatrix", type=Path, default=None,
                    help="an importance-matrix file both sides quantize with (llama-quantize --imatrix, export "
                         "--imatrix); the allocation itself is chosen without it")
    args = ap.parse_args()
    if not ref.built():
        raise SystemExit("llama.cpp's tools are not built: make llamacpp")
    from quantpredict.export import MIX_FILE_TYPE

    ftype = MIX_FILE_TYPE[args.mix].removeprefix("MOSTLY_")
    work = ref.home() / "work"
    base = work / f"{args.model}-f32.gguf"
    if not base.is_file():
        ref.convert(args.model, base)
    text = ref.ROOT / "data" / "wikitext-2-raw" / "wiki.test.raw"
    logits = work / f"{args.model}-kld-base-{args.chunks}x512.bin"
    with tempfile.TemporaryDirectory(prefix="llamacpp-alloc-", dir=work) as tmp:
        theirs = Path(tmp) / f"{ftype}.gguf"
        with_im = ["--imatrix", str(args.imatrix)] if args.imatrix else []
        subprocess.run([str(ref._need("llama-quantize")), *with_im, str(base), str(theirs), ftype, "1"], check=True,
                       capture_output=True)
        types = ref.tensor_types(theirs)
        alloc = Path(tmp) / "alloc.json"
        answer = json.loads(project(["allocate", args.model, "--match", args.mix, "--out", str(alloc), "--json"]))
        io = ["--embedding-type", types["token_embd.weight"]]
        if "output.weight" in types:
            io += ["--output-type", types["output.weight"]]
        ours = Path(tmp) / "alloc.gguf"
        project(["export", args.model, "--recipe-file", str(alloc), *io, *with_im, "--gguf", str(ours),
                 "--no-progress"])
        rows = []
        for name, path in ((f"llama.cpp {ftype}", theirs), ("quantpredict allocation", ours)):
            k, se = kld_of(base, path, text=text, chunks=args.chunks, logits=logits)
            rows.append((name, path.stat().st_size, k, se))
            print(f"{name:26s} {path.stat().st_size / 2**20:8.2f} MiB  KLD {k:.4f} ± {se:.4f}", flush=True)
    (_, b_theirs, k_theirs, se_theirs), (_, b_ours, k_ours, se_ours) = rows
    lower = k_ours < k_theirs
    fewer = b_ours <= b_theirs
    verdict = ("**met**" if lower and fewer else "**not met**") + (
        f": KLD {k_ours:.4f} vs {k_theirs:.4f} ({(k_ours / k_theirs - 1) * 100:+.0f}%, "
        f"{abs(k_ours - k_theirs) / (se_ours**2 + se_theirs**2) ** 0.5:.1f} SE), bytes {b_ours:,} vs {b_theirs:,}")
    pred = answer.get("prediction") or {}
    table = ["| file | bytes | llama.cpp's KLD |", "|---|---:|---|",
             *[f"| {n} | {b:,} | {k:.4f} ± {s:.4f} |" for n, b, k, s in rows]]
    real = " (**4-bit on the way in**: its GGUF package)" if args.model in REAL else ""
    section = "\n".join([
        f"### {args.model}{real}: the exported allocation against llama.cpp's {ftype}"
        f"{', both with an importance matrix' if args.imatrix else ''}, by llama.cpp", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, load average {load_average()} "
        f"({args.load_note}). `quantpredict allocate {args.model} --match {args.mix}` chose one llama.cpp type per "
        f"linear layer at the mix's bits; `quantpredict export` wrote it with the token embedding and output head "
        f"in the types llama-quantize gives them in its own {ftype} file ({', '.join(io[1::2])}); both files were "
        f"measured by `llama-perplexity --kl-divergence` against the F32 GGUF, {args.chunks} chunks of 512 tokens "
        "of WikiText-2 test, 1 thread. "
        + (f"Both files quantized with the same importance matrix {args.imatrix.name} (`quantpredict imatrix`, "
           "WikiText-2 train; the allocation was chosen without it)." if args.imatrix else
           "No importance matrix on either side."), "",
        *table, "",
        f"The allocation's predicted KLD, for the project's protocol (256-token windows, embedding and head in 16 "
        f"bits, no runtime activation rounding{', priced without the imatrix' if args.imatrix else ''}): "
        f"{_kld(pred.get('kld'))} [{_kld(pred.get('kld_low'))}, {_kld(pred.get('kld_high'))}]; the allocation: "
        f"`{answer.get('recipe', '?')[:80]}{'...' if len(answer.get('recipe', '')) > 80 else ''}`.",
        f"Target (lower KLD at no more bytes): {verdict}.",
    ])
    write_between(REPORT, f"llamacpp:alloc:{args.model}{':imatrix' if args.imatrix else ''}", section)
    print(f"wrote the allocation section of {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
