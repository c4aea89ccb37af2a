"""`quantpredict collect`: run a sweep of models x formats x methods into a run store (resumable)."""

from __future__ import annotations

import argparse
import sys

from quantpredict.cli import options


def register(sub) -> None:
    p = sub.add_parser(
        "collect", help="run a sweep of models x formats x methods into a run store",
        description="Run every (model, recipe) of the grid models x formats x block sizes x methods x SmoothQuant x "
                    "activation formats that the store does not hold yet, recording each run as soon as it "
                    "finishes. Run the same command again to resume a stopped sweep; failed runs are retried "
                    "unless --no-retry-failed. Lists take spaces or commas; 'none' means the default.")
    p.add_argument("--models", nargs="+", required=True,
                   help="zoo names or model directories; 'zoo' expands to every zoo model on disk")
    p.add_argument("--formats", nargs="+", default=[], help="weight formats, e.g. mxint4 int8 mxfp4_e2m1")
    p.add_argument("--methods", nargs="+", default=[], help="rtn, gptq, qat (QAT from RTN) and/or qat_gptq")
    p.add_argument("--recipes", nargs="+", default=[], metavar="LABEL",
                   help="explicit recipe labels (per-layer allocations, QAT with its own options) or named mixes "
                        "(q4_k_m, q5_k_m, q4_k_s, q5_k_s, q4_k_pure ...; with options: q4_k_m-gptq), resolved for "
                        "each model's layers; run for every model next to the formats x methods grid")
    p.add_argument("--recipes-file", default=None, metavar="FILE",
                   help="a file of recipe labels, one per line (or the JSON `quantpredict allocate --out` writes)")
    p.add_argument("--eval-text", default=None, metavar="FILE",
                   help="evaluate on this UTF-8 text instead of WikiText-2 test (its sha256 enters the run key)")
    p.add_argument("--calib-text", default=None, metavar="FILE",
                   help="calibrate on this UTF-8 text instead of WikiText-2 train")
    p.add_argument("--smoothquant", nargs="+", default=["none"], metavar="ALPHA",
                   help="SmoothQuant strengths, 'none' for none (default: none)")
    p.add_argument("--act-formats", nargs="+", default=["none"], metavar="FORMAT",
                   help="activation formats, 'none' for weight-only (default: none)")
    p.add_argument("--block-sizes", nargs="+", default=["none"], metavar="N",
                   help="block sizes, 'none' for the format's default (default: none)")
    p.add_argument("--block-size-formats", nargs="+", default=None, metavar="PREFIX",
                   help="apply --block-sizes only to formats starting with these prefixes (e.g. mx); others "
                        "get their default")
    p.add_argument("--store", default="runs.sqlite", help="run store: SQLite path or SQLAlchemy URL "
                   "(default: runs.sqlite)")
    p.add_argument("--workers", type=options.positive(int), default=1, help="runs in parallel (processes; default 1)")
    p.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="local processes, or a Dask cluster (default: local)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="Dask scheduler address, e.g. tcp://host:8786 (with --executor dask; without it a "
                        "LocalCluster of --workers processes is started)")
    p.add_argument("--eval-max-windows", type=options.positive(int), default=None, metavar="N",
                   help="evaluate on the first N windows of WikiText-2 test (default: all of it)")
    p.add_argument("--seq-len", type=options.positive(int, minimum=2), default=256,
                   help="evaluation window length in tokens (default 256)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's choice)")
    p.add_argument("--run-fn", default=None, metavar="MODULE:FUNC",
                   help="run function (default: the real measurement, quantpredict.runs.execute:execute_run; "
                        "quantpredict.runs.fake:fake_run for a dry rehearsal)")
    p.add_argument("--run-kwargs", default=None, metavar="JSON",
                   help='extra keyword arguments of the run function as a JSON object, e.g. '
                        '\'{"feature_options": {"n_probes": 8}}\'')
    p.add_argument("--no-retry-failed", action="store_true", help="skip runs recorded as failed")
    p.add_argument("--no-weights-hash", action="store_true",
                   help="key runs by model name alone instead of name + weights hash")
    p.add_argument("--dry-run", action="store_true", help="print the plan (to run / already done) and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    options.add_device(p, default=None, help="where each run computes (cpu, cuda, cuda:N; passed to the run function "
                                             "as device=; default cpu). Checked here and again on each worker")
    options.add_max_memory(p, default=None, help="working-memory budget of each run (passed as max_memory=, e.g. "
                                                 "6GiB; default the run function's, 2GiB)")
    p.set_defaults(func=run)


def _models(values: list[str]) -> list[str]:
    out = [m.strip() for v in values for m in v.split(",") if m.strip()]
    if out == ["zoo"]:
        from quantpredict.data import data_dir
        from quantpredict.errors import ModelError
        from quantpredict.models import list_zoo

        data_dir()  # no data folder: the error naming $QUANTPREDICT_DATA, not advice to build the zoo
        out = list_zoo()
        if not out:
            raise ModelError("--models zoo: no zoo models on disk; build them with `quantpredict zoo build`")
    return out


def _run_kwargs(text: str | None) -> dict:
    import json

    from quantpredict.errors import QuantpredictError

    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise QuantpredictError(f"--run-kwargs {text!r} is not valid JSON ({exc}); pass an object such as "
                                '\'{"sleep_s": 0.5}\'') from None
    if not isinstance(value, dict):
        raise QuantpredictError(f"--run-kwargs must be a JSON object, got {text!r}")
    return value


def _recipe_labels(args: argparse.Namespace) -> list[str]:
    import json
    from pathlib import Path

    from quantpredict.errors import RecipeError
    from quantpredict.mixes import is_mix_spec
    from quantpredict.recipe import Recipe

    labels = [r for v in args.recipes for r in v.split(",") if r.strip()]
    if args.recipes_file:
        path = Path(args.recipes_file)
        if not path.is_file():
            raise RecipeError(f"--recipes-file {path} does not exist; pass a file of recipe labels")
        text = path.read_text()
        try:
            doc = json.loads(text)
            items = [doc["recipe"]] if isinstance(doc, dict) else list(doc)
        except (ValueError, KeyError, TypeError):
            items = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        for x in items:  # a JSON list may hold recipe dicts: checked field by field, filed under their label
            try:
                labels.append(Recipe.coerce(x).label if isinstance(x, dict) else str(x))
            except RecipeError as exc:
                raise RecipeError(f"--recipes-file {path}: {exc}") from None
    for label in labels:
        if not is_mix_spec(label):  # a named mix is resolved per model; its options were checked just now
            Recipe.from_label(label)  # a bad label fails here, before any model is touched
    return labels


def check_store(store: str) -> None:
    """A run store path this user can write (a SQLAlchemy URL other than a SQLite file is the database's business),
    checked before the sweep starts."""
    from pathlib import Path

    if "://" in store:
        from sqlalchemy.engine import make_url

        url = make_url(store)
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return
        store = url.database
    options.check_out(store, "--store", kind="dir" if Path(store).is_dir() else "file")


def run(args: argparse.Namespace) -> int:
    from quantpredict.errors import RecipeError
    from quantpredict.recipe import EvalSetting
    from quantpredict.runs import SweepGrid, collect, dry_run, model_id

    recipes = _recipe_labels(args)
    if not recipes and not (args.formats and args.methods):
        raise RecipeError("give --formats and --methods (the grid), or --recipes / --recipes-file")
    models = _models(args.models)
    identify = None if args.no_weights_hash else model_id
    run_kwargs = _run_kwargs(args.run_kwargs)
    if args.threads:
        run_kwargs["torch_threads"] = args.threads
    if args.device is not None:
        from quantpredict.memory import resolve_device

        resolve_device(args.device, flag="--device")  # fail here, not in every worker
        run_kwargs["device"] = args.device
    if args.max_memory is not None:
        from quantpredict.memory import parse_bytes

        run_kwargs["max_memory"] = parse_bytes(args.max_memory, flag="--max-memory")
    # the flags first, then the paths
    if args.run_fn is None:  # the real measurement: a missing or corrupt model fails here, once, not in every
        for m in models:  # worker (another --run-fn may take names that are no model directory)
            options.check_model(m)
    if not args.dry_run:
        check_store(args.store)
    grid = SweepGrid(models, args.formats, args.methods, smoothquant=args.smoothquant,
                     act_formats=args.act_formats, block_sizes=args.block_sizes,
                     block_size_formats=args.block_size_formats, recipes=recipes)
    evaluation = EvalSetting(args.seq_len, args.eval_max_windows).with_text_file(args.eval_text)
    if args.dry_run:
        plan = dry_run(grid, evaluation, store=args.store, identify=identify, retry_failed=not args.no_retry_failed)
        for s in plan.todo:
            print(s.key)
        print(plan)
        return 0
    summary = collect(grid, store=args.store, evaluation=evaluation, run_fn=args.run_fn, run_kwargs=run_kwargs,
                      executor=args.executor, workers=args.workers, scheduler=args.scheduler, identify=identify,
                      retry_failed=not args.no_retry_failed, progress=not args.no_progress,
                      calib_text=args.calib_text)
    print(summary)
    if summary.failed:
        print(f"{summary.failed} run(s) failed; see `quantpredict runs show --store {args.store} --status failed`",
              file=sys.stderr)
        return 1
    return 0
