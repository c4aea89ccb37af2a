"""Per-claim verdicts computed from results, so that a report page never states a finding by hand.

A claim is tested cell by cell: each :class:`Evidence` is a signed estimate with its standard error, oriented so that
a positive value is what the claim asserts (e.g. ``GPTQ NLL - QAT NLL`` for "QAT beats GPTQ"). A cell *supports*
the claim when ``value > z * se``, *contradicts* it when ``value < -z * se`` (z = 2: about a 5% two-sided test per
cell), and is *inconclusive* otherwise. The verdict over a set of cells (:func:`verdict`):

* **holds**: supported in more than half of the cells and contradicted in none;
* **fails**: contradicted in more than half of the cells and supported in none;
* **undecided**: anything else (mixed signs, or most cells within their noise), with the counts shown.

A rank correlation enters as one cell with ``se = 1.06 / sqrt(n - 3)`` (Fieller, Hartley & Pearson's standard error
of Spearman's rho on the Fisher scale, used here on rho itself: adequate for |rho| well below 1); fewer than 4 points
give an infinite se, i.e. never a decided cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z = 2.0
VERDICTS = ("holds", "fails", "undecided")


@dataclass(frozen=True)
class Evidence:
    """One cell's test of a claim: ``value`` (positive = as claimed) and its standard error; ``cell`` names it."""

    cell: str
    value: float
    se: float

    @property
    def outcome(self) -> int:
        """+1 supports, -1 contradicts, 0 inconclusive (NaN values and ses are inconclusive)."""
        if not (math.isfinite(self.value) and self.se >= 0 and not math.isnan(self.se)):
            return 0
        if self.value > Z * self.se:
            return 1
        if self.value < -Z * self.se:
            return -1
        return 0


@dataclass(frozen=True)
class Verdict:
    """A claim's verdict on one scope (e.g. a model at one learning rate), with its cell counts."""

    claim: str
    scope: str
    verdict: str
    support: int
    contradict: int
    cells: int
    mean: float  # mean value over the cells (the claim's orientation)

    def row(self) -> str:
        """A markdown table row: claim | scope | verdict | supported / contradicted / cells | mean."""
        return (f"| {self.claim} | {self.scope} | **{self.verdict}** | {self.support} / {self.contradict} / "
                f"{self.cells} | {self.mean:+.4g} |")


VERDICT_HEADER = ("| claim | scope | verdict | cells supporting / contradicting / all | mean value |\n"
                  "|---|---|---|---|---|")


def verdict(claim: str, scope: str, evidence: Sequence[Evidence]) -> Verdict:
    """The :class:`Verdict` of ``evidence`` (see the module docstring); no evidence: undecided over 0 cells."""
    support = sum(e.outcome == 1 for e in evidence)
    contradict = sum(e.outcome == -1 for e in evidence)
    n = len(evidence)
    if n and support > n / 2 and contradict == 0:
        v = "holds"
    elif n and contradict > n / 2 and support == 0:
        v = "fails"
    else:
        v = "undecided"
    values = [e.value for e in evidence if math.isfinite(e.value)]
    return Verdict(claim, scope, v, support, contradict, n, float(np.mean(values)) if values else math.nan)


def paired(a: Sequence[float], b: Sequence[float] | None = None) -> tuple[float, float]:
    """Mean of ``a - b`` over windows (``b=None``: of ``a``) and its standard error (NaN for one window)."""
    d = np.asarray(a, dtype=float) - (0.0 if b is None else np.asarray(b, dtype=float))
    if d.size == 0:
        return math.nan, math.nan
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
    return float(d.mean()), se


def spearman_evidence(cell: str, x: Sequence[float], y: Sequence[float]) -> Evidence:
    """Spearman's rho of ``x`` and ``y`` as one cell of evidence (positive rho supports), se ``1.06/sqrt(n-3)``."""
    from scipy.stats import spearmanr

    n = len(x)
    if n < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return Evidence(cell, math.nan, math.inf)
    rho = float(spearmanr(x, y).statistic)
    return Evidence(cell, rho, 1.06 / math.sqrt(n - 3) if n > 3 else math.inf)


def verdict_table(verdicts: Sequence[Verdict]) -> str:
    """The markdown table of ``verdicts`` (header included); empty string for none."""
    if not verdicts:
        return ""
    return VERDICT_HEADER + "\n" + "\n".join(v.row() for v in verdicts)
