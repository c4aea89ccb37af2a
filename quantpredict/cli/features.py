"""``quantpredict features MODEL --format F --method M``: the loss-landscape features of a model under a recipe."""

from __future__ import annotations

import argparse
import json

from quantpredict.cli import options
from quantpredict.errors import DataError, QuantpredictError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "features", help="loss-landscape features of a model under a recipe",
        description="Compute every feature of quantpredict.schema (or the groups in --which) for MODEL "
                    "quantized by the recipe, on a small calibration batch from WikiText-2 train.")
    p.add_argument("model", metavar="MODEL", help="zoo model name or local Hugging Face model directory")
    p.add_argument("--format", required=True, dest="weight_format", help="weight format (see `quantpredict formats`)")
    p.add_argument("--method", default="rtn", help="rtn or gptq (default: rtn)")
    p.add_argument("--block-size", type=int, default=None, help="elements per scale (default: the format's)")
    p.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA", help="SmoothQuant migration strength")
    p.add_argument("--act-format", default=None, help="activation format of the recipe (not part of the features' "
                                                      "weight direction)")
    p.add_argument("--which", default=None, help="comma-separated groups (default: all): "
                                                 "model,format,noise,curvature,landscape,gptq_proxy")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows, probes and noise")
    p.add_argument("--n-windows", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--n-probes", type=int, default=None, help="Hutchinson probes")
    p.add_argument("--max-iter", type=int, default=None, help="power-iteration steps at most")
    options.add_feature_run(p)
    options.add_threads(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from quantpredict.features import FEATURES, extract, parse_which
    from quantpredict.models import load
    from quantpredict.quantize import Recipe

    try:
        groups = parse_which(args.which)
    except ValueError as exc:
        raise DataError(f"--which: {exc}") from exc
    for name in ("n_windows", "seq_len", "n_probes", "max_iter"):
        value = getattr(args, name)
        if value is not None and value < (2 if name in ("seq_len", "n_probes") else 1):
            raise DataError(f"--{name.replace('_', '-')} {value} is too small")
    try:
        recipe = Recipe(args.weight_format, block_size=args.block_size, method=args.method,
                        smoothquant_alpha=args.smoothquant, act_format=args.act_format)
    except ValueError as exc:
        if isinstance(exc, QuantpredictError):  # e.g. FormatError naming the valid formats
            raise
        raise DataError(f"bad recipe: {exc}") from exc
    device, budget = options.device(args), options.max_memory(args)
    options.check_texts(args)
    options.check_model(args.model)
    # the checkpoint's dtype: the features upcast a bf16 one in place (same values as a float32 load, less memory)
    model, tokenizer = load(args.model, dtype="auto", attn_implementation="eager", device=device)
    calib_ids = options.calib_stream(args, tokenizer)  # the protocol's BOS-led windows, or the user's text
    knobs = {k: getattr(args, k) for k in ("n_windows", "seq_len", "n_probes", "max_iter")
             if getattr(args, k) is not None}
    out = extract(model, recipe, calib_ids, seed=args.seed, which=groups, progress=not args.json,
                  max_memory=budget, **knobs)

    if args.json:
        print(json.dumps({"model": args.model, "recipe": recipe.label, "features": out}, indent=2))
        return 0
    group_of = {f.name: f.group for f in FEATURES}
    width = max(len(k) for k in out)
    print(f"{args.model} under {recipe.label}")
    print(f"{'feature':<{width}}  {'value':>14}  group")
    for name, value in out.items():
        if name.endswith("_seconds"):
            continue
        print(f"{name:<{width}}  {value:>14.6g}  {group_of.get(name, '')}")
    total = sum(out[f"{g}_seconds"] for g in groups)
    print()
    print(f"{'group':<12}  {'seconds':>9}  share")
    for g in groups:
        s = out[f"{g}_seconds"]
        print(f"{g:<12}  {s:>9.2f}  {100 * s / total if total else 0:5.1f}%")
    print(f"{'total':<12}  {total:>9.2f}")
    return 0
