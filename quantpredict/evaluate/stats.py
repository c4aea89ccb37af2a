"""Standard errors of per-token means estimated from per-window sums.

A corpus mean ``m = sum_k S_k / sum_k c_k`` (``S_k`` the window's summed statistic, ``c_k`` its scored tokens) is a
ratio estimator; windows, not tokens, are the independent units (tokens within a window are correlated, so a
per-token standard error would be too small). Its linearised influence per window is
``u_k = (S_k - m c_k) / sum c``, and ``Var(m) ~= n / (n - 1) * sum_k u_k**2``. With equal ``c_k`` this is exactly
``std(window means, ddof=1) / sqrt(n)``. A smooth function of several such means (``exp``, differences) gets its
standard error from the same influences by the delta method, which keeps pairing: a difference of two means over
the same windows uses ``u_k - v_k``.
"""

from __future__ import annotations

import math

import numpy as np


def influence(sums: np.ndarray, counts: np.ndarray) -> tuple[float, np.ndarray]:
    """The ratio mean ``sum(sums) / sum(counts)`` and its per-window influences ``[n]`` (float64)."""
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    mean = float(sums.sum() / total)
    return mean, (sums - mean * counts) / total


def se_from_influence(u: np.ndarray) -> float:
    """Standard error from per-window influences; NaN with fewer than two windows."""
    n = len(u)
    if n < 2:
        return math.nan
    return float(math.sqrt(n / (n - 1) * float(np.sum(np.square(u)))))


def ratio_mean_se(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """``(mean, standard error)`` of the per-token mean from per-window sums and counts."""
    mean, u = influence(sums, counts)
    return mean, se_from_influence(u)
