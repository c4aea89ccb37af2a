"""``quantpredict report``: render the figures and ``reports/index.md`` from a run store."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="render figures and reports/index.md from a run store",
        description="Render the report of a run store: predicted vs measured perplexity (leave-one-family-out), the "
                    "size-precision frontier, delta NLL against the strongest features, feature importance, and "
                    "links to the QAT and attention results found in the results folder. Every figure is "
                    "regenerated from the runs.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="run store (SQLite path or SQLAlchemy URL)")
    src.add_argument("--runs", help="exported runs (.parquet or .csv)")
    p.add_argument("--out", default="reports", help="output folder for index.md and the figures (default: reports)")
    p.add_argument("--kinds", default="ols,rf,gbm,bits,paper",
                   help="predictor kinds to validate, comma-separated (default: ols,rf,gbm,bits,paper)")
    p.add_argument("--n-estimators", type=int, default=50,
                   help="trees per forest for the report's own fits (default: 50; small keeps the report quick)")
    p.add_argument("--repeats", type=int, default=3, help="shuffles per feature and fold of the permutation "
                   "importance (default: 3)")
    p.add_argument("--results-dir", default=None,
                   help="where other commands' results (qat.md, qat*.png, attention*.png) are (default: --out)")
    p.add_argument("--random-state", type=int, default=0, help="seed of every fit and shuffle (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantpredict.errors import PredictorError
    from quantpredict.predict.design import KINDS
    from quantpredict.report import render_report

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise PredictorError(f"--kinds {args.kinds!r}: unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    if args.n_estimators < 1 or args.repeats < 1:
        raise PredictorError("--n-estimators and --repeats must be at least 1")
    from quantpredict.files import check_output

    check_output(args.out, "--out", kind="dir")
    res = render_report(args.store or args.runs, args.out, kinds=kinds, n_estimators=args.n_estimators,
                        n_repeats=args.repeats, random_state=args.random_state, results_dir=args.results_dir,
                        progress=True)
    print(f"best kind (leave-one-{res.groups}-out): {res.best_kind}")
    for path in (*res.figures.values(), *res.validation):
        print(f"wrote {path}")
    if res.embedded:
        print("embedded " + ", ".join(p.name for p in res.embedded))
    print(f"wrote {res.index}")
    return 0
