"""`quantpredict runs show|export`: look at a run store, or export it as Parquet/CSV."""

from __future__ import annotations

import argparse

ROW_COLUMNS = ("model", "recipe", "status", "ppl_fp", "ppl_quant", "dppl_pct", "delta_nll", "delta_nll_se", "kld",
               "eval_windows", "seconds", "error")


def register(sub) -> None:
    p = sub.add_parser("runs", help="show or export a run store")
    rsub = p.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    sp = rsub.add_parser("show", help="counts by status, model and format, then the runs as a table")
    sp.add_argument("--store", required=True, help="run store: SQLite path or SQLAlchemy URL")
    sp.add_argument("--status", choices=("done", "failed"), default=None, help="only runs of this status")
    sp.add_argument("--limit", type=int, default=None, help="show at most N rows (the latest)")
    sp.add_argument("--columns", nargs="+", default=None, help=f"row columns (default: {' '.join(ROW_COLUMNS)})")
    sp.set_defaults(func=run_show)
    ep = rsub.add_parser("export", help="write the store as a table: one row per run, one column per feature")
    ep.add_argument("--store", required=True, help="run store: SQLite path or SQLAlchemy URL")
    ep.add_argument("--out", required=True, help="output file, .parquet or .csv")
    ep.add_argument("--status", choices=("done", "failed"), default=None, help="only runs of this status")
    ep.set_defaults(func=run_export)


def _open(store: str):
    from quantpredict.runs import RunStore

    return RunStore(store, create=False)


def summary_text(df, *, limit: int | None = None, columns=None) -> str:
    """The `runs show` text for a :meth:`RunStore.to_frame` frame."""
    import pandas as pd

    if df.empty:
        return "0 runs"
    lines = [f"{len(df)} runs: " + ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())]
    for by in ("model", "weight_format", "method"):
        counts = pd.crosstab(df[by].fillna("?"), df["status"])
        lines += ["", f"by {by}:", counts.to_string()]
    rows = df.copy()
    rows["dppl_pct"] = 100.0 * (rows["ppl_quant"] / rows["ppl_fp"] - 1.0)
    rows["error"] = rows["error"].map(lambda e: (str(e).splitlines() or [""])[0][:60] if isinstance(e, str) else "")
    cols = [c for c in (columns or ROW_COLUMNS) if c in rows.columns]
    if limit is not None:
        rows = rows.tail(limit)
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                           "display.float_format", "{:.4g}".format):
        lines += ["", rows[cols].to_string(index=False)]
    return "\n".join(lines)


def run_show(args: argparse.Namespace) -> int:
    with _open(args.store) as store:
        df = store.to_frame(args.status)
        print(f"store {store.url} (schema {store.schema_version})")
    print(summary_text(df, limit=args.limit, columns=args.columns))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from quantpredict.files import check_output

    check_output(args.out, "--out")
    with _open(args.store) as store:
        out = store.export(args.out, args.status)
        n = len(store.to_frame(args.status))
    print(f"wrote {n} runs to {out}")
    return 0
