"""``render_report``: a run store in, ``index.md`` and its PNG figures out, all regenerated from the runs.

The page embeds the report's own figures (predicted vs measured perplexity, the size-precision frontier, delta NLL
against the strongest features, feature importance) with one sentence each, the validation page of
:func:`quantpredict.report.validation.write_report` (its predicted-vs-measured delta figure), and whatever other
results already sit in the results folder: the PTQ-vs-QAT study (``qat.md``, ``qat*.png``), the attention
benchmark (``attention*.png``) and the other pages.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from quantpredict.errors import StoreError

FIGURES: dict[str, str] = {
    "predicted_vs_measured": "ppl_predicted_vs_measured.png",
    "frontier": "frontier.png",
    "features": "delta_vs_features.png",
    "importance": "importance.png",
}
VALIDATION_PAGE = Path("validation") / "predictors.md"
# Figures other commands write into the results folder, and what each shows (unknown ones get a generic line).
KNOWN_FIGURES: dict[str, str] = {
    "qat_ppl.png": "Test NLL increase over FP per format and method: post-training quantization (RTN, GPTQ) "
                   "against quantization-aware training at the same data budget.",
    "qat_misalignment.png": "Local/global misalignment: the summed layer-output error GPTQ minimises against the "
                            "global NLL, along GPTQ's layer-by-layer path and QAT's steps.",
    "qat_basin.png": "Distance to the FP weights against NLL: whether QAT leaves the FP basin.",
    "qat_loss.png": "QAT training loss curves.",
    "attention_bench.png": "Decode-step throughput, dense against block-sparse attention, on the machine it ran on.",
}
EXTERNAL_FIGURES = (("PTQ vs QAT", "qat*.png", "qat.md", "quantpredict study ptq-vs-qat"),
                    ("Sparse attention", "attention*.png", "attention.md", "quantpredict attention bench"))
OTHER_PAGES = {"predictors.md": "predictor validation written by `quantpredict fit --validate`",
               "zoo.md": "the model zoo", "ptq.md": "PTQ perplexities of the zoo",
               "benchmarks.md": "benchmarks", "qat.md": "the PTQ-vs-QAT study",
               "attention.md": "sparse attention"}


@dataclass(frozen=True)
class ReportResult:
    """What :func:`render_report` wrote. ``figures``: the report's own figures by name (see :data:`FIGURES`);
    ``validation``: the validation page and its figures; ``embedded``: other commands' figures embedded on the page;
    ``best_kind``: the predictor kind with the lowest held-out median relative delta error (None if none fitted);
    ``groups``: the grouping held out (``"family"``, or ``"model"`` when the runs have a single family)."""

    index: Path
    figures: dict[str, Path]
    validation: tuple[Path, ...]
    embedded: tuple[Path, ...]
    best_kind: str | None
    groups: str
    metrics: pd.DataFrame = field(repr=False)


def load_runs(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A run table from a DataFrame, a ``.parquet``/``.csv`` export, or a run store (path or SQLAlchemy URL)."""
    if isinstance(source, pd.DataFrame):
        return source
    from quantpredict.runs.table import read_runs

    text = str(source)
    if text.endswith((".parquet", ".csv")):
        return read_runs(runs=text)
    if "://" not in text and not Path(text).exists():
        raise StoreError(f"run store {text} does not exist; collect runs into it first (`quantpredict collect "
                         f"--store {text} ...`) or pass the path of an existing store")
    from quantpredict.runs import RunStore

    with RunStore(text, create=False) as store:
        return store.to_frame()


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _metrics_table(metrics: pd.DataFrame) -> list[str]:
    cols = [("kind", "kind", "{}"), ("n_runs", "runs", "{:.0f}"), ("r2", "R² (Δ NLL)", "{:.3f}"),
            ("median_rel_error", "median rel. error (Δ NLL)", "{:.1%}"),
            ("median_rel_ppl_error", "median rel. error (ppl)", "{:.2%}"), ("coverage", "90% coverage", "{:.0%}")]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in metrics.iterrows():
        cells = []
        for c, _, fmt in cols:
            v = r.get(c)
            ok = isinstance(v, str) or (v is not None and np.isfinite(float(v)))
            cells.append(fmt.format(v) if ok else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(runs: str | Path | pd.DataFrame, out: str | Path = "reports", *,
                  kinds: Sequence[str] = ("ols", "rf", "gbm", "bits", "paper"), n_estimators: int = 50,
                  n_repeats: int = 3, random_state: int = 0, results_dir: str | Path | None = None,
                  source: str | None = None, progress: bool = False) -> ReportResult:
    """Render the report of a run store into ``out`` (``index.md``, the figures, ``validation/predictors.md``).

    ``runs``: a run store path/URL, an exported ``.parquet``/``.csv``, or a run table. ``kinds``: predictor kinds
    validated (leave-one-family-out; leave-one-model-out if the runs hold one family); the tree kinds use
    ``n_estimators`` trees (small: the report must stay quick). ``n_repeats``: shuffles per feature and fold of the
    permutation importance. ``results_dir``: where other commands' results (``qat.md``, ``qat*.png``,
    ``attention*.png``, ...) are looked for (default ``out``). Deterministic for a fixed ``random_state``.
    """
    from quantpredict.predict import validate
    from quantpredict.predict.design import LINEAR_KINDS
    from quantpredict.report import figures as F
    from quantpredict.report.importance import permutation_importance
    from quantpredict.report.tables import finished
    from quantpredict.report.validation import best_kind, write_report

    t0 = time.perf_counter()
    source = source if source is not None else ("a run table" if isinstance(runs, pd.DataFrame) else str(runs))
    table = load_runs(runs)
    for col in ("nll_fp", "nll_quant", "model"):
        if col not in table:
            raise StoreError(f"{source}: the runs lack the column {col!r}; pass a run store or its export "
                             "(`quantpredict runs export`)")
    done = finished(table)
    if done.empty:
        raise StoreError(f"{source} holds no finished runs (status 'done' with measured NLLs); collect runs first "
                         "with `quantpredict collect`")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_dir = Path(results_dir) if results_dir is not None else out
    groups = "family" if done["family"].nunique() >= 2 else "model"

    params = {k: ({} if k in LINEAR_KINDS else {"n_estimators": int(n_estimators)}) for k in kinds}
    val = validate(table, kinds=list(kinds), groups=(groups,), random_state=random_state, predictor_params=params,
                   progress=progress)
    best = best_kind(val.metrics, groups)
    shown = [best] if best else []
    if "paper" in kinds and best != "paper":
        shown.append("paper")
    if not shown:
        shown = [k for k in kinds if np.isfinite(val.predictions.loc[val.predictions["kind"] == k, "ppl"]).any()][:2]
    validation = tuple(write_report(val, out / VALIDATION_PAGE, source=source))
    page = out / VALIDATION_PAGE  # the page names the command that wrote it
    page.write_text(page.read_text().replace("by `quantpredict fit --validate`", "by `quantpredict report`", 1))

    figs = {
        "predicted_vs_measured": F.plot_ppl_predictions(val.predictions, out / FIGURES["predicted_vs_measured"],
                                                        shown, groups),
        "frontier": F.plot_frontier(done, out / FIGURES["frontier"]),
        "features": F.plot_feature_scatter(done, out / FIGURES["features"]),
    }
    importance, imp_note = None, ""
    if best is not None:
        try:
            importance = permutation_importance(table, best, groups=groups, n_repeats=n_repeats,
                                                random_state=random_state, predictor_params=params[best])
        except Exception as exc:  # noqa: BLE001 -- one figure failing must not lose the whole report
            imp_note = f" (not computed: {exc})"
    title = (f"permutation importance, {best} predictor, leave-one-{groups}-out" if importance is not None else
             f"no feature importance: no predictor kind could be validated{imp_note}")
    figs["importance"] = F.plot_importance(importance, out / FIGURES["importance"], title)

    # ---- the page ------------------------------------------------------------------------------------------------
    m = val.metrics
    mb = m[m["kind"] == best].iloc[0] if best else None
    lines = [
        "# quantpredict report", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `quantpredict report` from {source}: {len(done)} finished "
        f"runs of {done['model'].nunique()} models in {done['family'].nunique()} families "
        f"({len(table) - len(done)} other runs left out). Every figure here is regenerated from the runs by that "
        "command; none is edited by hand.", "",
        f"## Predicted vs measured perplexity (leave-one-{groups}-out)", "",
        _rel(figs["predicted_vs_measured"], out).join(["![predicted vs measured perplexity](", ")"]), "",
        (f"Each {groups} is predicted by a predictor fitted without it; the best kind, `{best}`, puts the quantized "
         f"perplexity within a median {mb['median_rel_ppl_error']:.2%} of the measured one (Δ NLL within a median "
         f"{mb['median_rel_error']:.1%}), and its 90% interval covers {mb['coverage']:.0%} of the runs"
         + (" (right: the `paper` baseline)." if "paper" in shown[1:] else ".")) if mb is not None else
        "No predictor kind could be validated on these runs (see the validation page).", "",
        *_metrics_table(m), "",
        f"The hard part is the degradation itself, drawn per kind in [the validation page]"
        f"({VALIDATION_PAGE.as_posix()}) (predicted vs measured Δ NLL, symmetric-log axes).", "",
        "## Size-precision frontier", "",
        f"![perplexity against bits per element]({_rel(figs['frontier'], out)})", "",
        "Perplexity against weight bits per element for each format kind, one line per model coloured by size "
        "(best method at each bit width, weight-only runs); the bottom panel puts every run at the size of its "
        "quantized weights, and the black frontier says which model size at which precision gives the best "
        "perplexity for the bytes. The frontier and its axes cover the region a user would ship: runs below 3 bits "
        "per element (int2, mxint2; shaded in the top row), which the zoo's small models survive but no real model "
        "does, and runs whose perplexity more than doubles or whose KLD exceeds 1 nat are left out, as the note on "
        "the panel says.", "",
        "## Δ NLL against the strongest features", "",
        f"![delta NLL against features]({_rel(figs['features'], out)})", "",
        "Measured degradation against the RTN weight SQNR, the second-order term 0.5 δᵀHδ along the quantization "
        "direction, and model size, one colour per family; the Δ NLL axis is linear within the median measurement "
        "standard error (below it a delta is noise) and logarithmic beyond.", "",
        "## Feature importance", "",
        f"![feature importance]({_rel(figs['importance'], out)})", "",
        (f"Permutation importance of the `{best}` predictor's features, measured on held-out {groups} groups: how much "
         "the held-out error (mean |asinh(predicted Δ / s) − asinh(measured Δ / s)|, s the median standard error "
         f"of Δ) grows when one feature is shuffled, mean ± std over {m[m['kind'] == best]['n_folds'].iloc[0]} "
         f"folds × {n_repeats} shuffles (model-agnostic, not the forest's impurity importance).")
        if importance is not None else f"Not computed{imp_note}.", "",
    ]
    embedded: list[Path] = []
    for title_, pattern, page, command in EXTERNAL_FIGURES:
        found = sorted(results_dir.glob(pattern))
        has_page = (results_dir / page).is_file()
        if not found and not has_page:
            continue
        lines += [f"## {title_}", ""]
        if has_page:
            lines += [f"Written by `{command}`: see [{page}]({_rel(results_dir / page, out)}).", ""]
        for fig in found:
            lines += [f"![{fig.stem}]({_rel(fig, out)})", "",
                      KNOWN_FIGURES.get(fig.name, f"`{fig.name}`, written by `{command}`."), ""]
            embedded.append(fig)
    pages = [(p, what) for p, what in OTHER_PAGES.items() if (results_dir / p).is_file()]
    if pages:
        lines += ["## Other pages", ""]
        lines += [f"- [{p}]({_rel(results_dir / p, out)}): {what}" for p, what in pages]
        lines.append("")
    lines += [f"_Rendered in {time.perf_counter() - t0:.1f} s; kinds {', '.join(kinds)}, {n_estimators} trees per "
              f"forest, random state {random_state}._", ""]
    index = out / "index.md"
    index.write_text("\n".join(lines))
    return ReportResult(index, figs, validation, tuple(embedded), best, groups, m)
