"""The PTQ-vs-QAT study (issue 5): FP / RTN / GPTQ / QAT-from-RTN / QAT-from-GPTQ at the same calibration budget.

A thin wrapper over ``quantpredict study ptq-vs-qat`` (all options pass through), single-threaded by default, writing
``reports/qat_results.jsonl`` as cells finish (resumable), then ``reports/qat.md`` and ``reports/qat_*.png``.

    python benchmarks/study_ptq_vs_qat.py                       # every zoo model, every study format
    python benchmarks/study_ptq_vs_qat.py --models llama-xs --steps 32 --max-windows 64
    python benchmarks/study_ptq_vs_qat.py --report-only         # re-render from the results file
"""

from __future__ import annotations

import sys

from quantpredict.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "ptq-vs-qat", *sys.argv[1:]]))
