"""``quantpredict predict``: a model's predicted quantized perplexity for one or more recipes, without evaluating."""

from __future__ import annotations

import argparse
import itertools
import json

from quantpredict.cli import answer, options


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predict a quantized model's perplexity without evaluating it",
                              description="Predict WikiText-2 perplexity (90%% interval) of MODEL under each recipe; "
                                          "--format and --method take comma-separated lists (all combinations).")
    p.add_argument("model", metavar="MODEL", help="zoo model name or HF model directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--format", dest="weight_format", help="weight format(s), e.g. mxint4,mxfp4_e2m1")
    what.add_argument("--mix", default=None, help="named mix(es) instead, e.g. q4_k_m,q5_k_m (llama.cpp's per-layer "
                                                  "types for this model's layers)")
    p.add_argument("--method", default="rtn", help="rtn or gptq (comma-separated for several)")
    p.add_argument("--block-size", type=options.positive(int), default=None)
    p.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA")
    p.add_argument("--act-format", default=None)
    p.add_argument("--predictor", default="default", help="saved predictor directory (default: the shipped one)")
    answer.add_fp_options(p)
    options.add_feature_run(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantpredict.predict.quality import predict_quality, resolve_predictor

    predictor = resolve_predictor(args.predictor)  # fail fast, before loading the model
    device, budget = options.device(args), options.max_memory(args)
    options.check_texts(args)
    options.check_model(args.model)
    from quantpredict import models
    from quantpredict.quantize import Recipe

    model, tok = models.load(args.model, attn_implementation="eager", device=device, dtype="auto")  # eager: HVPs
    from quantpredict.mixes import named_mix

    calib = options.calib_stream(args, tok)

    from quantpredict.predict.fp_reference import full_eval_cost, resolve_fp_reference

    results = []
    with answer.caught_warnings() as caught:
        # the FP reference, resolved once by name (zoo card, cache, or measured once): every recipe rests on it
        ref = resolve_fp_reference(args.model, model=model, tokenizer=tok, ppl_fp=args.ppl_fp,
                                   fp_windows=args.fp_windows)
        for what, method in itertools.product(_split(args.weight_format or args.mix), _split(args.method)):
            recipe = Recipe(weight_format=what if args.weight_format else "q4_k", block_size=args.block_size,
                            method=method, smoothquant_alpha=args.smoothquant, act_format=args.act_format)
            if args.mix:
                recipe = named_mix(what, model, base=recipe)
            pr = predict_quality(model, recipe, predictor, tokenizer=tok, ppl_fp=ref, calib_ids=calib,
                                 model_name=args.model, extract_options={"max_memory": budget})
            results.append(pr.to_dict())
    cost = full_eval_cost(ref)
    notes = answer.notes(caught, [(r["recipe"], r["out_of_range"]) for r in results])
    if args.json:
        import math

        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                 | {"notes": notes} for r in results]  # strict JSON has no NaN (the delta-only kinds predict no KLD)
        print(json.dumps(clean if len(clean) > 1 else clean[0], indent=1))
        return 0
    import math

    has_kld = any(math.isfinite(r["kld"]) for r in results)
    fp_value = results[0]["ppl_fp"] if results else None
    print(f"{args.model}: predicted on WikiText-2 test ({predictor.kind} predictor, 90% intervals, which carry the "
          "FP perplexity's SE too)")
    print(answer.fp_line(ref, fp_value))
    kld_head = f" {'KLD':>9s} {'KLD interval':>21s} {'top-1%':>7s}" if has_kld else ""
    print(f"{'recipe':32s}{kld_head} {'ppl':>10s} {'interval':>21s} {'vs FP':>8s} {'delta NLL':>10s} "
          f"{'seconds':>8s}")
    for r in results:
        kld = (f" {r['kld']:9.5f} [{r['kld_low']:9.5f}, {r['kld_high']:9.5f}] {100 * r['top1']:7.2f}"
               if has_kld else "")
        print(f"{r['recipe']:32s}{kld} {answer.num(r['ppl'], 10)} [{answer.num(r['ppl_low'], 9)}, "
              f"{answer.num(r['ppl_high'], 9)}] {answer.pct(r['ppl_increase_pct']):>8s} {r['delta_nll']:10.5f} "
              f"{r['seconds']:8.2f}")
    print(answer.cost_line(cost))
    for line in notes:
        print(line)
    return 0


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]
