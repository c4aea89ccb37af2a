"""``quantpredict predict``: a model's predicted quantized perplexity for one or more recipes, without evaluating."""

from __future__ import annotations

import argparse
import itertools
import json

from quantpredict.cli import answer, options
from quantpredict.cli.profile import CACHE_HELP, add_no_cache

#: the calibration windows the shipped physics predictor's features were measured on (``ExtractOptions.n_windows``)
MEASURE_WINDOWS = 8


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predict a quantized model's perplexity without evaluating it",
                              description="Predict the KLD and WikiText-2 perplexity (90%% intervals) of MODEL under "
                                          "each recipe; --format and --method take comma-separated lists (all "
                                          "combinations). By default each recipe is priced from its weights against "
                                          "MODEL's cached sensitivity profile, the path rank and allocate use, so "
                                          "the three print the same numbers. --measure prices by measuring instead. "
                                          f"{CACHE_HELP}.")
    p.add_argument("model", metavar="MODEL", help="zoo model name or HF model directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--format", dest="weight_format", help="weight format(s), e.g. mxint4,mxfp4_e2m1")
    what.add_argument("--mix", default=None, help="named mix(es) instead, e.g. q4_k_m,q5_k_m (llama.cpp's per-layer "
                                                  "types for this model's layers)")
    p.add_argument("--method", default="rtn", help="rtn or gptq (comma-separated for several)")
    p.add_argument("--block-size", type=options.positive(int), default=None)
    p.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA")
    p.add_argument("--act-format", default=None)
    options.add_runtime(p)
    options.add_imatrix(p, "price the recipe's RTN of llama.cpp types with it (weights-only path; RTN of llama.cpp "
                           "types only)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--predictor", default="default",
                     help="'default' (the shipped weights-only profile predictor), 'physics' (the shipped "
                          "measurement predictor) or a saved predictor directory")
    how.add_argument("--measure", type=options.positive(int), nargs="?", const=MEASURE_WINDOWS, default=None,
                     metavar="N", help="price each recipe by measuring it instead (the 'physics' predictor): "
                                       "quantize the model and run it on N calibration windows of 256 tokens "
                                       f"(default {MEASURE_WINDOWS}, what it was fitted on); a quantization and "
                                       "forward passes per recipe, minutes each on a real model")
    answer.add_fp_options(p)
    add_no_cache(p)
    options.add_feature_run(p)
    options.add_threads(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantpredict.predict.quality import HOW_MEASURED, predict_quality, resolve_predictor

    if args.runtime is not None and args.measure:
        from quantpredict.errors import PredictorError

        raise PredictorError("--runtime prices recipes from their weights against the profile; --measure measures "
                             "the project's own model: give one of them")
    if args.imatrix is not None and args.measure:
        from quantpredict.errors import PredictorError

        raise PredictorError("--imatrix prices recipes from their weights against the profile; --measure measures "
                             "the project's own model: give one of them")
    if args.imatrix is not None:
        from quantpredict.imatrix import load

        load(args.imatrix)  # a missing or malformed file fails before the model loads
    predictor = resolve_predictor("physics" if args.measure else args.predictor)  # fail fast, before loading
    device, budget = options.device(args), options.max_memory(args)
    options.check_texts(args)
    options.check_model(args.model)
    from quantpredict import models
    from quantpredict.mixes import named_mix
    from quantpredict.quantize import Recipe

    mp = None
    extract = {"max_memory": budget} | ({"n_windows": args.measure} if args.measure else {})
    with answer.caught_warnings() as caught:
        if predictor.kind == "profile":
            from quantpredict.predict.rank import profile_model

            # the profile rank and allocate read (same load, same calibration, same cache entry)
            model, tok, calib = None, None, None
            # loaded here only when profile_model cannot load it by name as rank does (the name keys the cache by
            # the weight files; a model object by hashing its tensors: another entry, measured again)
            if args.calib_text is not None or device.type != "cpu":
                model, tok = models.load(args.model, attn_implementation="eager", device=device)
                calib = options.calib_stream(args, tok) if args.calib_text is not None else None
            mp = profile_model(model if model is not None else args.model, tokenizer=tok, calib=calib,
                               name=args.model, cache=not args.no_cache)
            model, tok = mp.model, mp.tokenizer
        else:
            # eager: the measurement's second derivatives fail through CPU SDPA
            model, tok = models.load(args.model, attn_implementation="eager", device=device, dtype="auto")
            calib = options.calib_stream(args, tok)
        from quantpredict.predict.fp_reference import full_eval_cost, resolve_fp_reference

        # the FP reference, resolved once by name (zoo card, cache, or measured once): every recipe rests on it
        ref = resolve_fp_reference(args.model, model=model, tokenizer=tok, ppl_fp=args.ppl_fp,
                                   fp_windows=args.fp_windows, cache=not args.no_cache)
        results = []
        for what, method in itertools.product(_split(args.weight_format or args.mix), _split(args.method)):
            recipe = Recipe(weight_format=what if args.weight_format else "q4_k", block_size=args.block_size,
                            method=method, smoothquant_alpha=args.smoothquant, act_format=args.act_format)
            if args.mix:
                recipe = named_mix(what, model, base=recipe)
            pr = predict_quality(model, recipe, predictor, tokenizer=tok, ppl_fp=ref, calib_ids=calib,
                                 model_name=args.model, extract_options=extract, profile=mp,
                                 cache=not args.no_cache, runtime=args.runtime, imatrix=args.imatrix)
            results.append(pr.to_dict())
    cost = full_eval_cost(ref)
    notes = answer.notes(caught, [(r["recipe"], r["out_of_range"]) for r in results])
    notes += [f"note: {r['note']}" for r in results if r["note"]]
    if args.json:
        import math

        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                 | {"notes": notes} for r in results]  # strict JSON has no NaN (the delta-only kinds predict no KLD)
        print(json.dumps(clean if len(clean) > 1 else clean[0], indent=1))
        return 0
    import math

    has_kld = any(math.isfinite(r["kld"]) for r in results)
    fp_value = results[0]["ppl_fp"] if results else None
    kinds = ", ".join(dict.fromkeys(f"{r['predictor_kind']} predictor: {r['how']}" for r in results))
    imatrix = options.imatrix_words(results[0]["imatrix"] if results else None)
    print(f"{args.model}: predicted on WikiText-2 test ({kinds}; 90% intervals, which carry the FP perplexity's SE "
          f"too){options.runtime_words(args.runtime)}{imatrix}")
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
    if mp is not None:
        got = "read from the cache" if mp.cached else "measured once"
        print(f"profile: {got} in {mp.seconds:.1f} s (model load included); 'seconds' above is each recipe's "
              "pricing")
    if any(r["how"] == HOW_MEASURED for r in results):
        print("measured recipes: 'seconds' is each one's quantization and forward passes on the calibration "
              "windows")
    print(answer.cost_line(cost))
    for line in notes:
        print(line)
    return 0


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]
