"""``quantpredict allocate MODEL --target-bits B``: per-layer formats minimising the predicted KLD under a budget."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quantpredict.cli import answer, options
from quantpredict.cli.profile import add_no_cache


def register(sub) -> None:
    p = sub.add_parser(
        "allocate", help="choose per-layer formats minimising the predicted KLD under an average-bits budget",
        description="Profile MODEL once, price every (layer, candidate format) from the weights alone, and choose "
                    "one format per linear layer minimising the summed per-layer second-order KL with at most "
                    "--target-bits bits per element on average (cross-layer terms are not modelled). Writes the "
                    "recipe, which quantize, features, predict and collect all take.")
    p.add_argument("model", metavar="MODEL", help="zoo name, imported model or HF model directory")
    p.add_argument("--target-bits", type=float, default=None, metavar="B",
                   help="average bits per element, at most (default with --match: the mix's)")
    p.add_argument("--candidates", default=None,
                   help="comma-separated candidate formats (FORMAT or FORMAT_bN; default: MX 3-8 bit formats, or "
                        "with --match the formats the mix uses)")
    p.add_argument("--match", default=None, metavar="MIX",
                   help="allocate against a named mix (q4_k_m, q5_k_m, ...): its bits, its formats, and the mix "
                        "priced beside the allocation")
    p.add_argument("--compare", default=None, metavar="RECIPES",
                   help="comma-separated recipe labels or named mixes to price beside the allocation")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="one method for every layer (default rtn: cheaper to price; gptq is often better, and the "
                        "answer compares the allocation with the best uniform recipe of the same method)")
    p.add_argument("--predictor", default="default", help="a saved profile predictor (default: the shipped one)")
    answer.add_fp_options(p)
    p.add_argument("--out", default=None, metavar="FILE", help="write the recipe (JSON with its label) to FILE")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_no_cache(p)
    options.add_threads(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantpredict.errors import QuantpredictError
    from quantpredict.predict.allocate import DEFAULT_CANDIDATES, allocate

    if args.target_bits is None and args.match is None:
        raise QuantpredictError("give --target-bits B, or --match MIX to allocate at a named mix's bits")
    options.check_model(args.model)  # the model and --out before the profile is measured; allocate() checks the
    options.check_out(args.out, "--out")  # budget against the least feasible one from the model's shapes
    cands = [c.strip() for c in args.candidates.split(",") if c.strip()] if args.candidates else None
    if cands is None and args.match is None:
        cands = list(DEFAULT_CANDIDATES)
    compare = [c.strip() for c in args.compare.split(",") if c.strip()] if args.compare else []
    with answer.caught_warnings() as caught:
        res = allocate(args.model, args.target_bits, candidates=cands, method=args.method, predictor=args.predictor,
                       ppl_fp=args.ppl_fp, match=args.match, compare=compare, cache=not args.no_cache,
                       fp_windows=args.fp_windows)
    priced = [("the allocation", res.prediction)] + [(c["mix"] or c["recipe"][:40], c["prediction"])
                                                     for c in res.compared]
    if res.best_uniform and "prediction" in res.best_uniform:
        priced.append((res.best_uniform["recipe"], res.best_uniform["prediction"]))
    notes = answer.notes(caught, [(n, str(q.get("out_of_range") or "")) for n, q in priced])
    counts = res.layers.groupby("format")["elements"].agg(["count", "sum"])
    doc = {"model": args.model, "recipe": res.recipe.label, "recipe_fields": res.recipe.to_dict(),
           "target_bits": res.target_bits, "bits_per_element": res.bits_per_element, "objective": res.objective,
           "prediction": {k: v for k, v in res.prediction.items() if isinstance(v, (int, float, str))},
           "fp_reference": res.fp_reference, "full_eval": res.full_eval,
           "best_uniform": None if not res.best_uniform else (
               {k: v for k, v in res.best_uniform.items() if k != "prediction"}
               | {"prediction": {k: v for k, v in res.best_uniform.get("prediction", {}).items()
                                 if isinstance(v, (int, float, str))}}),
           "uniform_better": res.uniform_better, "seconds": res.seconds, "notes": list(res.notes) + notes,
           "formats": {f: {"layers": int(r["count"]), "elements": int(r["sum"])} for f, r in counts.iterrows()},
           "compared": [{k: v for k, v in c.items() if k != "prediction"}
                        | {"prediction": {k: v for k, v in c["prediction"].items() if isinstance(v, (int, float))}}
                        for c in res.compared]}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
        return 0
    p = res.prediction
    print(f"{args.model}: {res.bits_per_element:.3f} bits per element (budget {res.target_bits:g}), method "
          f"{args.method}")
    if res.fp_reference:
        print(answer.fp_line(res.fp_reference, p.get("ppl_fp")))
    for f, r in counts.iterrows():
        print(f"  {f:14s} {int(r['count']):4d} layers, {int(r['sum']):,} elements")
    print(f"predicted KLD {p['kld']:.5f} [{p['kld_low']:.5f}, {p['kld_high']:.5f}], perplexity {p['ppl']:.3f} "
          f"[{p['ppl_low']:.3f}, {p['ppl_high']:.3f}] ({answer.pct(p['ppl_increase_pct'])} over the FP) (summed "
          f"per-layer second-order KL {res.objective:.5f})" if "kld" in p
          else f"summed per-layer second-order KL {res.objective:.5f}")
    u = res.best_uniform
    if u and "prediction" in u:
        q = u["prediction"]
        line = (f"best uniform {args.method} recipe within the budget: {u['recipe']} ({u['bits_per_element']:.3f} "
                f"bits): predicted KLD {q['kld']:.5f}, perplexity {q['ppl']:.3f} ({answer.pct(q['ppl_increase_pct'])})")
        print(line)
        if res.uniform_better:
            print(f"=> the uniform {u['recipe']} is predicted BETTER than this allocation (KLD {q['kld']:.4f} vs "
                  f"{p['kld']:.4f}) at no more bits: ship the uniform recipe, not this mix")
        else:
            print(f"=> the allocation is predicted better than the best uniform {args.method} recipe (KLD "
                  f"{p['kld']:.4f} vs {q['kld']:.4f})")
    elif u:
        print(f"best uniform candidate within the budget: {u['recipe']} ({u['bits_per_element']:.3f} bits, summed "
              f"per-layer KL {u['objective']:.5f})")
    else:
        print(f"no uniform {args.method} candidate fits the budget of {res.target_bits:g} bits")
    if args.method == "rtn":
        print("method rtn (the default): GPTQ recipes are often better at the same bits; compare with `quantpredict "
              f"allocate {args.model} --method gptq ...` or `quantpredict rank {args.model}`")
    for c in res.compared:
        q = c["prediction"]
        print(f"compared: {c['mix'] or c['recipe'][:60]}: {c['bits_per_element']:.3f} bits, summed per-layer KL "
              f"{c['objective']:.5f}, predicted KLD {q['kld']:.5f}, perplexity {q['ppl']:.3f}")
    print(f"recipe: {res.recipe.label[:200]}{'...' if len(res.recipe.label) > 200 else ''}")
    if args.out:
        print(f"wrote {args.out}")
    print(f"{res.seconds:.1f} s; note: {res.notes[0]}")
    if res.full_eval:
        print(answer.cost_line(res.full_eval))
    for line in notes:
        print(line)
    return 0
