"""`quantpredict demo`: the main job on the embedded default (README's first Quick-start command).

With the shipped default predictor it predicts a zoo model's WikiText-2 perplexity for a few recipes and prints
the seconds spent next to the seconds a full evaluation costs. Without one (a checkout before the sweep has been
run), it quantizes the model's weights in each format and prints what it can measure cheaply.
"""

from __future__ import annotations

import argparse

from quantpredict.cli import options

DEFAULT_MODEL = "llama-m"
DEFAULT_RECIPES = "mxint8:rtn,mxfp4_e2m1:rtn,mxint4:rtn,mxint4:gptq,int3:gptq"


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default (README's first command)")
    p.add_argument("--model", default=None, help=f"zoo model or HF directory (default: {DEFAULT_MODEL}, or the "
                   "largest zoo model present)")
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated FORMAT:METHOD pairs")
    options.add_device(p)
    options.add_threads(p)
    p.set_defaults(func=run)


def _pick_model(requested: str | None) -> str:
    from quantpredict.errors import ModelError
    from quantpredict.models import list_zoo

    if requested:
        return requested
    zoo = list_zoo()
    if not zoo:
        raise ModelError("no zoo models on disk: run `quantpredict zoo build` (or pass --model DIR)")
    return DEFAULT_MODEL if DEFAULT_MODEL in zoo else zoo[-1]


def run(args: argparse.Namespace) -> int:
    from quantpredict.data import data_dir
    from quantpredict.predict.quality import PROFILE_PREDICTOR_DIR

    device = options.device(args)
    recipes = parse_recipes(args.recipes)  # checked before any model is loaded
    data_dir()  # the zoo, the texts and the default predictor: an installed package names $QUANTPREDICT_DATA here
    model = _pick_model(args.model)
    options.check_model(model)
    if (PROFILE_PREDICTOR_DIR / "predictor.json").is_file():
        return _predict(model, recipes, device)
    print(f"(no default predictor at {PROFILE_PREDICTOR_DIR} yet: showing the cheap quantization measurements)")
    return _measure(model, recipes, device)


def parse_recipes(text: str) -> list[tuple[str, str]]:
    """``[(format, method)]`` of ``--recipes`` text (``mxint4:gptq,int8:rtn``); a bad pair raises naming it."""
    from quantpredict.errors import RecipeError
    from quantpredict.formats import get_format
    from quantpredict.recipe import METHODS

    out = []
    for item in (r.strip() for r in text.split(",")):
        if not item:
            continue
        fmt, sep, method = item.partition(":")
        if not sep or method not in METHODS:
            raise RecipeError(f"--recipes {item!r}: expected FORMAT:METHOD with METHOD one of {', '.join(METHODS)} "
                              f"(e.g. {DEFAULT_RECIPES.split(',')[0]})")
        get_format(fmt)  # FormatError names the format and lists the valid ones
        out.append((fmt, method))
    if not out:
        raise RecipeError(f"--recipes {text!r} names no recipe; pass FORMAT:METHOD pairs, e.g. {DEFAULT_RECIPES}")
    return out


def _predict(model_name: str, recipes, device=None) -> int:
    from quantpredict import models
    from quantpredict.cli import answer
    from quantpredict.predict.fp_reference import full_eval_cost, resolve_fp_reference
    from quantpredict.predict.quality import predict_quality, resolve_predictor
    from quantpredict.predict.rank import profile_model
    from quantpredict.quantize import Recipe

    predictor = resolve_predictor("default")
    import math

    rows = []
    with answer.caught_warnings() as caught:
        # the profile and the FP reference predict, rank and allocate use too (cached, or measured once)
        model, tok = (models.load(model_name, attn_implementation="eager", device=device) if device.type != "cpu"
                      else (model_name, None))  # by name on the CPU: the cache entry rank and allocate read
        mp = profile_model(model, tokenizer=tok, name=model_name)
        ref = resolve_fp_reference(model_name, model=mp.model, tokenizer=mp.tokenizer)
        for fmt, method in recipes:
            rows.append(predict_quality(mp.model, Recipe(weight_format=fmt, method=method), predictor,
                                        tokenizer=mp.tokenizer, ppl_fp=ref, model_name=model_name, profile=mp))
    print(f"{model_name}: predicted on WikiText-2 test ({predictor.kind} predictor: {rows[0].how}; 90% intervals, "
          "which carry the FP perplexity's SE too)")
    print(answer.fp_line(ref))
    print(f"{'recipe':20s} {'KLD':>9s} {'KLD 90% interval':>21s} {'ppl':>8s} {'ppl 90% interval':>19s} "
          f"{'vs FP':>8s} {'top-1%':>7s} {'seconds':>8s}")
    for pr in rows:
        kld = (f"{pr.kld:9.5f} [{pr.kld_low:9.5f}, {pr.kld_high:9.5f}]" if math.isfinite(pr.kld)
               else f"{'n/a':>9s} {'':21s}")
        top1 = f"{100 * pr.top1:7.2f}" if math.isfinite(pr.top1) else f"{'n/a':>7s}"
        print(f"{pr.recipe:20s} {kld} {answer.num(pr.ppl)} [{answer.num(pr.ppl_low)}, {answer.num(pr.ppl_high)}] "
              f"{answer.pct(pr.ppl_increase_pct):>8s} {top1} {pr.seconds:8.2f}")
    got = "read from the cache" if mp.cached else "measured once"
    print(f"profile: {got} in {mp.seconds:.1f} s (model load included); 'seconds' above is each recipe's pricing")
    print(answer.cost_line(full_eval_cost(ref)))
    for line in answer.notes(caught, [(pr.recipe, pr.out_of_range) for pr in rows]):
        print(line)
    return 0


def _measure(model_name: str, recipes, device=None) -> int:
    import torch

    from quantpredict import arch, models
    from quantpredict.formats import fake_quantize, get_format

    model, _ = models.load(model_name, device=device)
    print(f"{model_name}: round-to-nearest weight quantization of {len(arch.linear_layers(model))} linear layers")
    print(f"{'format':14s} {'bits/elem':>9s} {'weight SQNR dB':>15s} {'worst layer dB':>15s}")
    for fmt in dict.fromkeys(f for f, _ in recipes):
        spec = get_format(fmt)
        sig = err = 0.0
        worst = float("inf")
        for ref in arch.linear_layers(model):
            w = ref.weight.detach()
            e = (fake_quantize(w, fmt, axis=-1) - w).pow(2).sum().item()
            s = w.pow(2).sum().item()
            sig, err = sig + s, err + e
            worst = min(worst, 10 * torch.log10(torch.tensor(s / max(e, 1e-30))).item())
        sqnr = 10 * torch.log10(torch.tensor(sig / max(err, 1e-30))).item()
        print(f"{fmt:14s} {spec.bits_per_element(spec.default_block_size):9.3f} {sqnr:15.2f} {worst:15.2f}")
    return 0
