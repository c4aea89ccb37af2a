"""``quantpredict predict``: a model's predicted quantized perplexity for one or more recipes, without evaluating."""

from __future__ import annotations

import argparse
import itertools
import json

from quantpredict.cli import options


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predict a quantized model's perplexity without evaluating it",
                              description="Predict WikiText-2 perplexity (90%% interval) of MODEL under each recipe; "
                                          "--format and --method take comma-separated lists (all combinations).")
    p.add_argument("model", metavar="MODEL", help="zoo model name or HF model directory")
    p.add_argument("--format", required=True, dest="weight_format", help="weight format(s), e.g. mxint4,mxfp4_e2m1")
    p.add_argument("--method", default="rtn", help="rtn or gptq (comma-separated for several)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA")
    p.add_argument("--act-format", default=None)
    p.add_argument("--predictor", default="default", help="saved predictor directory (default: the shipped one)")
    p.add_argument("--ppl-fp", type=float, default=None, help="the model's measured FP perplexity, if known")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    options.add_device(p)
    options.add_max_memory(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantpredict.predict.quality import predict_quality, resolve_predictor

    predictor = resolve_predictor(args.predictor)  # fail fast, before loading the model
    device, budget = options.device(args), options.max_memory(args)
    from quantpredict import models
    from quantpredict.quantize import Recipe

    model, tok = models.load(args.model, attn_implementation="eager", device=device, dtype="auto")  # eager: HVPs
    results = []
    for fmt, method in itertools.product(_split(args.weight_format), _split(args.method)):
        recipe = Recipe(weight_format=fmt, block_size=args.block_size, method=method,
                        smoothquant_alpha=args.smoothquant, act_format=args.act_format)
        pr = predict_quality(model, recipe, predictor, tokenizer=tok, ppl_fp=args.ppl_fp,
                             model_name=args.model, extract_options={"max_memory": budget})
        results.append(pr.to_dict())
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=1))
        return 0
    print(f"{args.model}: predicted WikiText-2 perplexity ({predictor.kind} predictor, 90% interval)")
    print(f"{'recipe':32s} {'ppl':>10s} {'interval':>21s} {'delta NLL':>10s} {'FP ppl':>14s} {'seconds':>8s} "
          f"{'full eval s':>11s}")
    for r in results:
        ev = "n/a" if r["eval_seconds"] is None else f"{r['eval_seconds']:.1f}"
        print(f"{r['recipe']:32s} {r['ppl']:10.3f} [{r['ppl_low']:9.3f}, {r['ppl_high']:9.3f}] "
              f"{r['delta_nll']:10.5f} {r['ppl_fp']:8.3f} ({r['ppl_fp_source'][:4]}) {r['seconds']:8.2f} {ev:>11s}")
    return 0


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]
