"""The run table as the report's figures read it: finished runs with their degradation, bits and format kind."""

from __future__ import annotations

import numpy as np
import pandas as pd

from quantpredict.report.style import FORMAT_KINDS


def _format_facts(name: str, block_size) -> tuple[float, str]:
    """(bits per element with shared scales, format kind label) of a format name; (NaN, "other") if unknown."""
    from quantpredict.errors import FormatError
    from quantpredict.formats import get_format

    try:
        f = get_format(str(name))
    except (FormatError, ValueError, KeyError):
        return float("nan"), "other"
    bs = None
    if f.family == "mx" and block_size is not None and not pd.isna(block_size):
        bs = int(block_size)
    try:
        bits = float(f.bits_per_element(bs))
    except (FormatError, ValueError):
        bits = float(f.bits_per_element())
    return bits, FORMAT_KINDS.get((f.family, f.element), "other")


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """The done runs with a finite measured degradation, plus derived columns.

    Adds ``delta`` (``nll_quant - nll_fp``, nats), ``bits`` (weight bits per element with shared scales: the
    ``bits_per_element`` feature where measured, else from :mod:`quantpredict.formats`), ``format_kind`` (MXINT,
    MXFP, INT, FP8 ...), ``params`` (non-embedding parameters where known, else ``n_params``), ``weight_mb``
    (``params * bits / 8 / 1e6``: the quantized weights' storage) and ``weight_only`` (no activation format).
    """
    df = runs.copy()
    if "status" in df:
        df = df[df["status"].astype(str) == "done"]
    nll_q = pd.to_numeric(df.get("nll_quant"), errors="coerce")
    nll_f = pd.to_numeric(df.get("nll_fp"), errors="coerce")
    df["delta"] = (nll_q - nll_f).astype(float)
    df = df[np.isfinite(df["delta"].to_numpy(float))].copy()
    block_col = "recipe_block_size" if "recipe_block_size" in df else "block_size"
    facts = [_format_facts(f, b) for f, b in zip(df.get("weight_format", pd.Series("", index=df.index)),
                                                  df.get(block_col, pd.Series(None, index=df.index)))]
    table_bits = np.array([b for b, _ in facts], float)
    measured = pd.to_numeric(df["bits_per_element"], errors="coerce").to_numpy(float) if "bits_per_element" in df \
        else np.full(len(df), np.nan)
    df["bits"] = np.where(np.isfinite(measured), measured, table_bits)
    df["format_kind"] = [k for _, k in facts]
    nonembed = pd.to_numeric(df["n_params_nonembed"], errors="coerce") if "n_params_nonembed" in df else None
    total = pd.to_numeric(df["n_params"], errors="coerce") if "n_params" in df else None
    if nonembed is not None and total is not None:
        params = nonembed.fillna(total)
    else:
        params = nonembed if nonembed is not None else total
    df["params"] = (params if params is not None else pd.Series(np.nan, index=df.index)).astype(float)
    df["weight_mb"] = df["params"] * df["bits"] / 8 / 1e6
    act = df["act_format"] if "act_format" in df else pd.Series(None, index=df.index)
    df["weight_only"] = act.map(lambda v: v is None or (isinstance(v, float) and np.isnan(v))
                                or str(v).strip().lower() in ("", "none", "nan"))
    for c in ("model", "family"):
        df[c] = df[c].astype(str) if c in df else "?"
    return df


def best_per_bits(runs: pd.DataFrame, y: str = "ppl_quant") -> pd.DataFrame:
    """Per (model, format kind, bits), the weight-only run with the lowest ``y`` (the best method at that size).

    ``runs`` as returned by :func:`finished`. Returns those rows, sorted by model size then bits.
    """
    w = runs[runs["weight_only"] & np.isfinite(pd.to_numeric(runs[y], errors="coerce").to_numpy(float))
             & np.isfinite(runs["bits"].to_numpy(float))]
    if w.empty:
        return w
    idx = w.groupby(["model", "format_kind", "bits"])[y].idxmin()
    return w.loc[idx.to_numpy()].sort_values(["params", "model", "bits"])


def pareto_frontier(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows no other row beats on both ``x`` and ``y`` (both lower-is-better), sorted by ``x``.

    A row is on the frontier when its ``y`` is strictly below the ``y`` of every row with ``x`` at most its own
    (ties in ``x`` keep the lowest ``y``). Rows with a non-finite ``x`` or ``y`` are ignored.
    """
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    d = df[ok].assign(_x=xs[ok], _y=ys[ok]).sort_values(["_x", "_y"], kind="mergesort")
    keep, best = [], np.inf
    for i, yv in zip(d.index, d["_y"]):
        if yv < best:
            keep.append(i)
            best = yv
    return d.loc[keep].drop(columns=["_x", "_y"])
