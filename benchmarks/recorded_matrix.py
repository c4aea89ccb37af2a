"""The recorded-number tests (``pytest -m recorded``) under every vector width this CPU offers and 1 and 2 threads.

Numbers recorded on one machine must reproduce on another within the tolerances the tests derive from float32
rounding; a machine's float32 sums follow its kernels (ATen's vectorised loops, MKL's BLAS) and the thread count. This
runs the marked tests once per ``(ATEN_CPU_CAPABILITY, threads)`` pair, with MKL's instruction set pinned to the same
width (``MKL_ENABLE_INSTRUCTIONS``), so one machine stands in for several:

    python benchmarks/recorded_matrix.py                     # every capability of this CPU x threads 1, 2
    python benchmarks/recorded_matrix.py --threads 1,2,4 -- -x   # arguments after -- go to pytest

torch 2.13 knows three ``ATEN_CPU_CAPABILITY`` values on x86: ``default``, ``avx2``, ``avx512`` (any other, e.g.
``avx512_vnni`` or ``amx``, is ignored with a warning and the CPU's best is used); the capabilities are read from
/proc/cpuinfo the way ATen checks them. Prints a table (machine, date, each run's result) and exits 1 if any run
failed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ATEN_CPU_CAPABILITY -> the CPU flags ATen requires for it, and MKL's instruction set of the same width
CAPABILITIES = {
    "default": ((), "SSE4_2"),
    "avx2": (("avx2", "fma"), "AVX2"),
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq"), "AVX512"),
}


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and flags (Linux /proc/cpuinfo; elsewhere the platform's name and no flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", platform.machine()), set(fields.get("flags", "").split())


def supported(flags: set[str]) -> list[str]:
    return [cap for cap, (needs, _) in CAPABILITIES.items() if all(f in flags for f in needs)]


def run(cap: str, threads: int, pytest_args: list[str]) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, MKL_ENABLE_INSTRUCTIONS=CAPABILITIES[cap][1],
               QUANTPREDICT_TEST_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    used = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "recorded",
                           *pytest_args], env=env, cwd=ROOT, capture_output=True, text=True)
    summary = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.strip()), "(no output)").strip("= ")
    return {"cap": cap, "torch_cap": used, "threads": threads, "rc": proc.returncode, "summary": summary,
            "seconds": time.perf_counter() - start, "output": proc.stdout + proc.stderr}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    parser.add_argument("--capabilities", default=None,
                        help="comma-separated ATEN_CPU_CAPABILITY values (default: every one this CPU supports)")
    args = parser.parse_args(argv)
    import torch

    model, flags = cpu_info()
    caps = args.capabilities.split(",") if args.capabilities else supported(flags)
    unknown = [c for c in caps if c not in CAPABILITIES]
    if unknown:
        parser.error(f"unknown capability {unknown}: torch {torch.__version__} knows {list(CAPABILITIES)}")
    extra = sorted(f for f in flags if f.startswith(("avx512_", "amx")))
    print(f"machine: {model} ({os.cpu_count()} CPUs; also {', '.join(extra) or 'no AVX-512/AMX extensions'}, which "
          f"ATEN_CPU_CAPABILITY does not select)")
    print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; torch {torch.__version__}; "
          f"python {platform.python_version()}")
    print()
    print("| ATEN_CPU_CAPABILITY | torch reports | MKL_ENABLE_INSTRUCTIONS | threads | result | seconds |")
    print("|---|---|---|---|---|---|")
    failed = 0
    for cap in caps:
        for threads in (int(t) for t in args.threads.split(",")):
            r = run(cap, threads, pytest_args)
            ok = r["rc"] == 0 and r["torch_cap"].lower() == cap.lower()
            failed += not ok
            print(f"| {cap} | {r['torch_cap']} | {CAPABILITIES[cap][1]} | {threads} | {r['summary']} | "
                  f"{r['seconds']:.0f} |", flush=True)
            if not ok:
                print(r["output"][-4000:], file=sys.stderr)
    print()
    print(f"{failed} of {len(caps) * len(args.threads.split(','))} runs failed" if failed else "every run passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
