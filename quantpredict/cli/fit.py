"""``quantpredict fit``: fit a predictor on a run store (or exported runs), optionally validating every kind."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit (and validate) a predictor on a run store",
                              description="Fit a predictor of delta NLL / perplexity on the done runs of a store.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", nargs="+", help="run store(s) (SQLite paths or SQLAlchemy URLs; several are merged)")
    src.add_argument("--runs", help="exported runs (.parquet or .csv)")
    p.add_argument("--kind", default="ols",
                   help="predictor kind to fit and save: physics, profile (KLD-first: KLD, delta NLL, top-1, ppl), or "
                        "the delta-only ols, rf, gbm, bits, paper")
    p.add_argument("--out", required=True, help="directory to save the predictor in")
    p.add_argument("--validate", action="store_true",
                   help="leave-one-model-out and leave-one-family-out validation of every kind, with a report")
    p.add_argument("--kinds", default=None,
                   help="kinds to validate (comma-separated; default: physics,profile and the baselines const_law, "
                        "paper for a KLD-first kind, else ols,rf,gbm,bits,paper)")
    p.add_argument("--groups", default=None,
                   help="validation splits (comma-separated; KLD-first kinds: family,model,largest_size,real; "
                        "delta-only kinds: model,family)")
    p.add_argument("--report", default="reports/predictors.md", help="validation report path (with --validate)")
    p.add_argument("--subsample", default=None, metavar="JSON",
                   help='per-window deltas for the subsample baseline: {"window_seconds": s, "window_deltas": '
                        '[[run 1 windows...], ...]} (with --validate)')
    p.add_argument("--feature-groups", default=None, metavar="GROUPS",
                   help="feature groups the ols/rf/gbm kinds use (comma-separated, e.g. "
                        "model,format,noise,landscape,gptq_proxy; default: every group). The saved predictor then "
                        "computes only these groups at predict time")
    p.add_argument("--n-estimators", type=int, default=None, help="trees for rf/gbm/paper (default: 300)")
    p.add_argument("--random-state", type=int, default=0)
    p.set_defaults(func=run)


def _csv(text: str | None, default: str) -> list[str]:
    return [k.strip() for k in (text or default).split(",") if k.strip()]


def run_physics(args: argparse.Namespace, runs) -> int:
    from quantpredict.predict.physics import PhysicsPredictor

    pred = PhysicsPredictor(args.kind).fit(runs)
    print(pred.summary())
    if args.validate:
        from quantpredict.predict.targets import validate_targets
        from quantpredict.report.targets import subsample_sections, write_targets_report

        # gbm (the former default, delta NLL only) needs every feature group of the zoo sweep, which the long and
        # real-model runs do not all carry; ask for it with --kinds to compare on the runs that have them
        kinds = _csv(args.kinds, "physics,profile,const_law,paper")
        splits = _csv(args.groups, "family,model,largest_size,real")
        metrics, predictions = validate_targets(runs, kinds=kinds, splits=splits)
        pred.attach_validation(metrics[metrics["kind"] == args.kind])
        sources = args.store or [args.runs]
        extra = subsample_sections(runs, predictions, sources, [k for k in kinds if k in ("physics", "profile")])
        path = write_targets_report(metrics, predictions, runs, args.report, sources=sources, fitted=args.kind,
                                    extra_sections=extra)
        print(f"wrote {path}")
    out = pred.save(args.out)
    print(f"saved to {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from quantpredict.files import check_output
    from quantpredict.predict import Predictor, validate
    from quantpredict.predict.design import LINEAR_KINDS
    from quantpredict.predict.physics import PHYSICS_KINDS
    from quantpredict.runs.table import read_runs

    check_output(args.out, "--out", kind="dir")  # before any work: a read-only --out never costs the fit
    if args.validate:
        check_output(args.report, "--report")
    runs = read_runs(args.store, args.runs)
    if args.kind in PHYSICS_KINDS:
        return run_physics(args, runs)
    tree_params = {} if args.n_estimators is None else {"n_estimators": args.n_estimators}
    params = {k: ({} if k in LINEAR_KINDS else tree_params) for k in ("ols", "rf", "gbm", "bits", "paper")}
    if args.feature_groups:
        from quantpredict.errors import PredictorError
        from quantpredict.features import FEATURES
        from quantpredict.features.context import parse_which

        try:
            groups = parse_which(args.feature_groups)
        except ValueError as exc:
            raise PredictorError(f"--feature-groups: {exc}") from None
        # a group's features the runs do not carry (older runs, other extractors) are left out, not an error
        names = [f.name for f in FEATURES if f.group in groups and f.name in runs and runs[f.name].notna().any()]
        for k in ("ols", "rf", "gbm"):
            params[k] = {**params[k], "features": names}
    pred = Predictor(args.kind, args.random_state, **params.get(args.kind, {})).fit(runs)
    print(f"fitted {pred!r} on {pred.metadata['n_models']} models; features: {', '.join(pred.features)}")
    if args.validate:
        import pandas as pd

        from quantpredict.report.validation import best_kind, write_report

        kinds = _csv(args.kinds, "ols,rf,gbm,bits,paper")
        groups = _csv(args.groups, "model,family")
        val = validate(runs, kinds=kinds, groups=groups, random_state=args.random_state, predictor_params=params,
                       progress=True)
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(val.metrics.drop(columns=["n_folds"]).round(4).to_string(index=False))
        pred.attach_validation(val.metrics[val.metrics["kind"] == args.kind])
        if args.subsample:
            curve = _subsample(args.subsample)
        else:
            from quantpredict.predict import store_subsample_curve

            curve = store_subsample_curve(runs)
        source = ", ".join(args.store) if args.store else args.runs
        paths = write_report(val, args.report, source=source, fitted=args.kind, subsample=curve)
        print(f"best kind (leave-one-{groups[-1]}-out): {best_kind(val.metrics, groups[-1])}")
        print("wrote " + ", ".join(str(p) for p in paths))
    out = pred.save(args.out)
    print(f"saved to {out}")
    return 0


def _subsample(path: str):
    import json
    from pathlib import Path

    from quantpredict.errors import PredictorError
    from quantpredict.predict import subsample_curve

    try:
        d = json.loads(Path(path).read_text())
        return subsample_curve(d["window_deltas"], d["window_seconds"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PredictorError(f"--subsample {path}: expected a JSON file with window_deltas (one list of per-window "
                             f"delta NLLs per run) and window_seconds ({type(exc).__name__}: {exc})") from None
