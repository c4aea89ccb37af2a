"""``quantpredict rank MODEL``: every candidate recipe ranked by predicted quality, with the recommendation under a
bit, KLD or perplexity budget."""

from __future__ import annotations

import argparse
import json
import math
import sys

from quantpredict.cli import answer, options
from quantpredict.cli.profile import add_no_cache


def register(sub) -> None:
    p = sub.add_parser(
        "rank", help="rank every candidate recipe by predicted KLD and perplexity, and recommend one under a budget",
        description="Measure MODEL's sensitivity profile once, price every candidate recipe from its weights alone "
                    "and predict its KLD, delta NLL, perplexity and top-1 agreement with 90%% intervals. The default "
                    "candidates are the shipped grid (14 formats x RTN and GPTQ).")
    p.add_argument("model", metavar="MODEL", help="zoo name, imported model (smollm2-135m) or HF model directory")
    p.add_argument("--formats", default=None, help="comma-separated weight formats (default: the shipped 14)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: rtn,gptq; rtn with --imatrix)")
    p.add_argument("--recipes", default=None,
                   help="comma-separated recipe labels or named mixes (q4_k_m, q5_k_m-gptq, q4_k_pure ...: resolved "
                        "for MODEL's layers) instead of formats x methods")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-bits", type=float, default=None, metavar="B", help="bits per element at most")
    budget.add_argument("--max-kld", type=float, default=None, metavar="K", help="predicted KLD at most (nats)")
    budget.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                        help="predicted perplexity at most PCT percent above the FP one")
    p.add_argument("--predictor", default="default", help="a saved profile predictor (default: the shipped one)")
    options.add_runtime(p)
    options.add_protocol(p)
    options.add_imatrix(p, "price every candidate's RTN of llama.cpp types with it (RTN recipes of llama.cpp types "
                           "only: give --recipes or --formats)")
    answer.add_fp_options(p)
    p.add_argument("--all", action="store_true",
                   help="list every candidate; by default recipes past the damage bound (predicted perplexity more "
                        "than doubled, or KLD over 1 nat) are folded into one line")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", default=None, metavar="FILE", help="write the frontier figure (PNG) to FILE")
    add_no_cache(p)
    options.add_threads(p)
    p.set_defaults(func=run)


def _recipes(args):
    from quantpredict.mixes import is_mix_spec
    from quantpredict.predict.rank import DEFAULT_FORMATS
    from quantpredict.recipe import Recipe

    if args.recipes:
        specs = [r.strip() for r in args.recipes.split(",") if r.strip()]
        return [s if is_mix_spec(s) else Recipe.from_label(s) for s in specs]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else DEFAULT_FORMATS
    methods_text = args.methods or ("rtn" if args.imatrix else "rtn,gptq")  # llama.cpp's imatrix is RTN's
    methods = [m.strip() for m in methods_text.split(",") if m.strip()]
    return [Recipe(f, method=m) for f in formats for m in methods]


def run(args: argparse.Namespace) -> int:
    from quantpredict.errors import OutputError
    from quantpredict.predict.rank import rank_recipes

    if args.plot and not str(args.plot).lower().endswith(".png"):
        raise OutputError(f"--plot {args.plot}: the figure is a PNG; give a file name ending in .png")
    recipes = _recipes(args)  # bad labels or formats fail here, before the model is loaded
    options.check_model(args.model)
    options.check_out(args.plot, "--plot")
    with answer.caught_warnings() as caught:
        frame = rank_recipes(args.model, recipes, predictor=args.predictor, max_bits=args.max_bits,
                             max_kld=args.max_kld, max_ppl_increase=args.max_ppl_increase, ppl_fp=args.ppl_fp,
                             progress=True, cache=not args.no_cache, fp_windows=args.fp_windows,
                             runtime=args.runtime, imatrix=args.imatrix, protocol=args.protocol)
    names = [r["mix"] if isinstance(r.get("mix"), str) else r["recipe"] for _, r in frame.iterrows()]
    frame.attrs["notes"] = answer.notes(caught, zip(names, frame["out_of_range"].fillna("") if "out_of_range" in frame
                                                               else [""] * len(frame)))
    _print(args, frame)  # the result first: a figure that cannot be written never costs the table
    if args.plot:
        from quantpredict.report.frontier import frontier_figure

        try:
            frontier_figure(frame, args.plot)
        except OSError as exc:
            raise OutputError(f"--plot {args.plot} could not be written ({exc.strerror or exc}); the table above "
                              "is complete: rerun with a writable --plot path for the figure") from None
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _print(args: argparse.Namespace, frame) -> None:
    from quantpredict.predict.rank import COLUMNS, DAMAGE_KLD, DAMAGE_PPL_INCREASE_PCT

    a = frame.attrs
    if args.json:
        rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                for r in frame[list(COLUMNS)].to_dict("records")]
        print(json.dumps({"model": a["model"], "recommended": a["recommended"], "constraint": a["constraint"],
                          "fp_reference": a["fp_reference"], "seconds": a["seconds"],
                          "profile_seconds": a["profile_seconds"], "profile_cached": a["profile_cached"],
                          "full_eval_seconds": a["full_eval_seconds"], "full_eval": a["full_eval"],
                          "kept_16bit": a["kept_16bit"], "runtime": a.get("runtime"), "imatrix": a.get("imatrix"),
                          "protocol": a.get("protocol", "project"),
                          "notes": a.get("notes", []),
                          "candidates": rows},
                         indent=1, default=str))
        return
    fp = a["fp_reference"]
    fp_value = float(frame["ppl_fp"].iloc[0]) if len(frame) else None
    print(f"{a['model']}: {len(frame)} candidates, predicted on WikiText-2 test ({a['predictor_kind']} predictor, "
          f"90% intervals, which carry the FP perplexity's SE too){options.runtime_words(a.get('runtime'))}"
          f"{options.protocol_words(a.get('protocol'))}"
          f"{options.imatrix_words(a.get('imatrix'))}; * = "
          "Pareto-optimal in KLD vs bits")
    print(answer.fp_line(fp, fp_value))
    print(f"{'recipe':22s} {'bits':>5s} {'MiB':>7s} {'KLD':>9s} {'KLD interval':>21s} {'dNLL':>8s} {'ppl':>8s} "
          f"{'ppl interval':>19s} {'vs FP':>8s} {'top1%':>6s}")
    folded = []
    for _, r in frame.iterrows():
        name = r["mix"] if isinstance(r.get("mix"), str) else r["recipe"]
        if r["past_damage_bound"] and not r["recommended"] and not args.all:
            folded.append(name)
            continue
        mark = "<-" if r["recommended"] else ("*" if r["pareto"] else "")
        print(f"{name[:22]:22s} {r['bits_per_element']:5.2f} {r['size_bytes'] / 2**20:7.1f} {r['kld']:9.5f} "
              f"[{r['kld_low']:9.5f}, {r['kld_high']:9.5f}] {r['delta_nll']:8.4f} {answer.num(r['ppl'])} "
              f"[{answer.num(r['ppl_low'])}, {answer.num(r['ppl_high'])}] {answer.pct(r['ppl_increase_pct']):>8s} "
              f"{100 * r['top1']:6.2f} {mark}")
    if folded:
        print(f"{len(folded)} recipes past the damage bound (predicted perplexity up more than "
              f"{DAMAGE_PPL_INCREASE_PCT:.0f}% or KLD over {DAMAGE_KLD:g} nat), not shown (--all lists them): "
              f"{', '.join(folded)}")
    c = {k: v for k, v in a["constraint"].items() if v is not None}
    if c:
        what = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in c.items())
        best = frame[frame["recommended"]]
        if best.empty:
            print(f"recommended under {what}: none of the candidates meets it")
        else:
            r = best.iloc[0]
            print(f"recommended under {what}: {a['recommended']}: perplexity {r['ppl']:.2f} "
                  f"[{r['ppl_low']:.2f}, {r['ppl_high']:.2f}], {answer.pct(r['ppl_increase_pct'])} over the FP "
                  f"{r['ppl_fp']:.2f}, KLD {r['kld']:.4f}, {r['bits_per_element']:.2f} bits per element")
    print(f"kept in 16 bits: {', '.join(a['kept_16bit'])}")
    how = "reading the cached profile" if a.get("profile_cached") else "measuring the profile once"
    print(f"seconds: {a['seconds']:.1f} in all ({a['profile_seconds']:.1f} {how}, "
          f"{a['seconds_per_recipe']:.2f} per recipe)")
    print(answer.cost_line(a["full_eval"]))
    for line in a.get("notes", []):
        print(line)
