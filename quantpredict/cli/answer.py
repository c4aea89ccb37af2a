"""What ``predict``, ``rank``, ``allocate`` and ``demo`` share in their answers: the FP reference flags and line,
the cost line of a full evaluation, compact perplexity numbers, and the predictor's warnings turned into one
readable note per answer instead of raw ``file.py:218: OutOfRangeWarning`` lines."""

from __future__ import annotations

import argparse
import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


def _ppl_fp_arg(text: str) -> float | str:
    from quantpredict.errors import PredictorError
    from quantpredict.predict.fp_reference import check_ppl_fp

    try:
        return check_ppl_fp(text, "--ppl-fp")
    except PredictorError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--ppl-fp {text!r}: ")) from None


def add_fp_options(p: argparse.ArgumentParser) -> None:
    """``--ppl-fp X|predicted`` and ``--fp-windows N`` (every command that prints a quantized perplexity)."""
    from quantpredict.cli.options import positive
    from quantpredict.recipe import DEFAULT_FP_WINDOWS

    p.add_argument("--ppl-fp", type=_ppl_fp_arg, default=None, metavar="PPL",
                   help="the model's measured FP perplexity on WikiText-2 test (a number >= 1), or 'predicted' to "
                        "predict it from the calibration NLL (labelled predicted); default: the zoo card, else a "
                        "measurement cached per model, else measured once and cached")
    p.add_argument("--fp-windows", type=positive(), default=None, metavar="N",
                   help=f"256-token WikiText-2 test windows to measure the FP perplexity on when neither the zoo card "
                        f"nor the cache has it (default {DEFAULT_FP_WINDOWS})")


def fp_line(ref: Any, value: float | None = None) -> str:
    """``FP perplexity 34.79 ± 1.07 (measured on ...)``; ``ref``: an FPReference or its dict."""
    from quantpredict.predict.fp_reference import FPReference

    if isinstance(ref, dict):
        fields = {k: (math.nan if v is None and k in ("ppl", "nll_se") else v) for k, v in ref.items()
                  if k in FPReference.__dataclass_fields__}
        ref = FPReference(**fields)
    return ref.describe(value)


def cost_line(cost: Any) -> str:
    """The shared estimate of a full evaluation (:func:`quantpredict.predict.fp_reference.full_eval_cost`)."""
    from quantpredict.predict.fp_reference import EvalCost

    if isinstance(cost, dict):
        cost = EvalCost(**cost)
    return cost.text()


def num(x: float, width: int = 8) -> str:
    """A perplexity or bound in ``width`` characters: fixed point while it fits, else ``1.35e+09``."""
    if not math.isfinite(x):
        return f"{'n/a':>{width}s}"
    s = f"{x:.2f}"
    return f"{s:>{width}s}" if len(s) <= width and abs(x) < 1e5 else f"{x:>{width}.2e}"


def pct(x: float) -> str:
    """A percentage increase, ``+57.3%`` (``>+999%`` past that)."""
    if not math.isfinite(x):
        return "n/a"
    return f"{x:+.1f}%" if x < 1000 else ">+999%"


def _ours(w: warnings.WarningMessage) -> bool:
    return getattr(w.category, "__module__", "").startswith("quantpredict")


@contextlib.contextmanager
def caught_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record quantpredict's own warnings raised inside (none printed): the answer turns them into notes
    (:func:`notes`). Other libraries' warnings are passed on to the warnings machinery as they were raised."""
    caught: list[warnings.WarningMessage] = []
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        try:
            yield caught
        finally:
            caught.extend(w for w in raw if _ours(w))
    for w in raw:
        if not _ours(w):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def notes(caught: Sequence[warnings.WarningMessage], out_of_range: Iterable[tuple[str, str]] = ()) -> list[str]:
    """One line per distinct warning, without source paths; the predictor's out-of-range warnings become one note
    naming the rows (``(name, inputs outside)`` pairs from the predictions' ``out_of_range`` column)."""
    from quantpredict.predict.physics import OutOfRangeWarning

    rows = [(n, why) for n, why in out_of_range if why]
    lines: list[str] = []
    if rows or any(issubclass(w.category, OutOfRangeWarning) for w in caught):
        inputs = sorted({part for _, why in rows for part in why.split("; ")})
        names = [n for n, _ in rows]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        what = (f"{len(names)} recipes lie" if len(names) != 1 else "1 recipe lies") if names else "some recipes lie"
        lines.append(f"note: {what} outside the predictor's training range{': ' + shown if shown else ''}"
                     f"{' (' + ', '.join(inputs) + ')' if inputs else ''}; "
                     + ("its interval is widened by the distance outside, and its prediction is an extrapolation"
                        if len(names) == 1 else "their intervals are widened by the distance outside, and their "
                        "predictions are extrapolations"))
    seen = set()
    for w in caught:
        if issubclass(w.category, OutOfRangeWarning):
            continue
        msg = " ".join(str(w.message).split())
        if msg not in seen:
            seen.add(msg)
            lines.append(f"note: {msg}")
    return lines
