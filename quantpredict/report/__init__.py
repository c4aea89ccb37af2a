"""Figures and the report page from a run store: ``render_report(store, "reports")`` writes ``reports/index.md``.

Modules: :mod:`.build` (:func:`render_report`), :mod:`.figures` (one function per figure), :mod:`.tables` (the run
table as the figures read it, the Pareto frontier), :mod:`.importance` (held-out permutation importance),
:mod:`.style` (one look for every figure), :mod:`.cli_reference` (README's CLI reference, generated from the parser),
:mod:`.validation` (the delta-only kinds' validation page) and :mod:`.targets` (the KLD-first kinds' validation page,
``reports/predictors.md``). The seed studies' pages (``qat.md``, ``rank.md``, ``formats.md``, ...) are rendered in
:mod:`quantpredict.studies`.
"""

from __future__ import annotations

from quantpredict.report.build import FIGURES, ReportResult, load_runs, render_report
from quantpredict.report.importance import permutation_importance
from quantpredict.report.tables import best_per_bits, finished, pareto_frontier

__all__ = ["FIGURES", "ReportResult", "best_per_bits", "finished", "load_runs", "pareto_frontier",
           "permutation_importance", "render_report"]
