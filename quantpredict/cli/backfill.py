"""``quantpredict backfill``: add feature groups to a store's runs without evaluating them again."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "backfill", help="add feature groups to a store's runs without evaluating them again",
        description="Compute the given feature groups for every done run of the store that lacks them (each model "
                    "loaded once, its profile measured once) and write them into the runs; measured columns are "
                    "untouched. Resumable: runs that have the features are skipped. --groups profile alone prices "
                    "each run's recipe as rank does (from the weights, against the model's cached lean profile; no "
                    "K-FAC terms), which fits a 1.5B model in memory.")
    p.add_argument("--store", required=True, help="run store: SQLite path or SQLAlchemy URL")
    p.add_argument("--groups", default=None, help="comma-separated feature groups, e.g. fisher,profile")
    p.add_argument("--attributes", action="store_true",
                   help="also add model attributes the runs lack (training tokens per parameter, from the cards)")
    p.add_argument("--models", nargs="+", default=None, help="only the runs of these models")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="only the runs of these methods (rtn first: a GPTQ run is quantized again to be backfilled)")
    p.add_argument("--limit", type=int, default=None, help="stop after N runs")
    p.add_argument("--recompute", choices=("activation", "calibrated", "all"), default=None,
                   help="with --groups profile: price again, and overwrite, the runs that have the features: "
                        "'activation' the weight+activation (SmoothQuant, act_format) runs, whose stored price "
                        "predates the activation term; 'calibrated' the GPTQ and AWQ runs, whose stored price may "
                        "predate their pricing against their own calibration windows' Hessians; 'all' every run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantpredict.errors import QuantpredictError
    from quantpredict.features.context import parse_which
    from quantpredict.runs.backfill import backfill, backfill_attributes

    if not args.groups and not args.attributes:
        raise QuantpredictError("give --groups GROUPS (e.g. fisher,profile) and/or --attributes")
    if args.threads is not None and args.threads < 1:
        raise QuantpredictError(f"--threads must be at least 1, got {args.threads}")
    groups = None
    if args.groups:
        try:
            groups = parse_which(args.groups)
        except ValueError as exc:
            raise QuantpredictError(f"--groups {args.groups!r}: {exc}") from None
    if args.recompute and (groups is None or list(groups) != ["profile"]):
        raise QuantpredictError("--recompute works with --groups profile alone (the weights-only pricing path)")
    from quantpredict.runs import RunStore

    RunStore(args.store, create=False).close()  # a missing or foreign store fails before any work
    if args.attributes:
        print(f"model attributes added to {backfill_attributes(args.store)} runs")
    if groups is None:
        return 0
    pricer = _weights_only_pricer() if list(groups) == ["profile"] else None
    recompute = {"all": lambda r: True, "activation": _is_activation_run, "calibrated": _is_calibrated_run,
                 None: None}[args.recompute]
    summary = backfill(args.store, groups, models=args.models, methods=args.methods, torch_threads=args.threads,
                       progress=not args.no_progress, limit=args.limit, pricer=pricer, recompute=recompute)
    print(summary)
    return 1 if summary.failed else 0


def _weights_only_pricer():
    """The ``profile`` group by the one pricing path (:func:`quantpredict.predict.rank.recipe_row` against the
    model's cached lean profile): what ``rank``, ``allocate`` and ``predict`` compute for the recipe, so a run's
    stored features are the ones its prediction reads. Recipes the weights-only path does not price (QAT, AWQ with
    activation quantization) fail with that reason and keep their rows as they were; SmoothQuant and
    activation-quantized recipes get the price with the activation term (:mod:`quantpredict.features.act_price`),
    AWQ recipes their search on the profile's statistics (:mod:`quantpredict.features.awq_price`)."""
    import math

    from quantpredict.predict.rank import profile_model, recipe_row
    from quantpredict.schema import FEATURES

    wanted = {f.name for f in FEATURES if f.group == "profile"} | {"fp_entropy_calib"}

    def for_model(name: str):
        mp = profile_model(name)  # loads the model; the profile from the cache, or measured once and cached

        def price(recipe):
            row = recipe_row(mp, recipe)
            return {k: float(v) for k, v in row.items() if k in wanted and math.isfinite(float(v))}

        return price

    return for_model


def _is_calibrated_run(run: dict) -> bool:
    """A run whose weights-only price reads its calibration windows' Hessians: GPTQ or AWQ in its recipe."""
    from quantpredict.recipe import Recipe

    recipe = Recipe.from_label(str(run["recipe"]))
    return recipe.method == "gptq" or recipe.awq


def _is_activation_run(run: dict) -> bool:
    """A weight+activation run: activation quantization or SmoothQuant in its recipe."""
    alpha = run.get("smoothquant_alpha")
    return bool(run.get("act_format")) or (alpha is not None and alpha == alpha)  # NaN: no SmoothQuant

