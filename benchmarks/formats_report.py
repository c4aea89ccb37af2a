"""reports/formats.md: KLD and perplexity against bits per element for the shipped layouts (uintK, NF4, llama.cpp
types and named mixes), with and without AWQ, next to the MX/INT formats of the shipped sweep, per model.

    .venv/bin/python benchmarks/formats_report.py [--stores data/runs/formats.sqlite ...] [--out reports/formats.md]

Renders from whatever runs the stores hold (the sweeps of /work/queue 41-formats-zoo.sh and 47-formats-smollm2.sh
fill data/runs/formats.sqlite and data/runs/smollm2_formats.sqlite); rerun it as they progress.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantpredict.studies.formats_report import Sources, render  # noqa: E402

RUNS = ROOT / "data" / "runs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", nargs="+", type=Path,
                    default=[RUNS / "formats.sqlite", RUNS / "smollm2_formats.sqlite"],
                    help="run stores of the new layouts (default: the zoo and SmolLM2 format sweeps)")
    ap.add_argument("--baseline", nargs="+", type=Path, default=[RUNS / "runs.sqlite", RUNS / "smollm2.sqlite"],
                    help="shipped sweeps whose MX/INT runs are drawn beside them")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "formats.md")
    args = ap.parse_args(argv)
    text = render(Sources(tuple(args.stores), tuple(args.baseline)), args.out)
    print(next((p.strip() for p in text.split("\n\n") if p.strip().startswith("Based on")), ""))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
