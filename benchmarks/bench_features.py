"""What the loss-landscape features cost against the evaluation they replace.

For each zoo model (largest first) and one representative recipe (default ``mxint4`` RTN), time
``features.extract`` (every group, default options: 8 windows x 256 tokens) against a full WikiText-2 test
perplexity evaluation of the same quantized model, in the same run, on the same machine. Tokenization is done once
up front and timed on neither side (both sides reuse cached token ids in practice). Prints each model's ratio and
each group's share, and writes the ``features`` section of reports/benchmarks.md.

    .venv/bin/python benchmarks/bench_features.py [--models a,b] [--recipe mxint4-rtn] [--budget-minutes 10]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import stamp, write_section  # noqa: E402

from quantpredict import arch  # noqa: E402
from quantpredict.data import token_ids  # noqa: E402
from quantpredict.features import GROUPS, extract  # noqa: E402
from quantpredict.models import list_zoo, load  # noqa: E402
from quantpredict.quantize import Recipe, quantize_model  # noqa: E402

TARGET = 0.10  # the feature set should cost at most 10% of the evaluation on the largest zoo models


def _vocab_key(tokenizer) -> str:
    # zoo models share one tokenizer saved in each directory: tokenize the splits once for all of them
    return hashlib.sha1(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()


def _evaluate(model, ids: torch.Tensor, max_windows: int | None = None) -> tuple[float, float]:
    """(seconds, NLL) of a full WikiText-2 test pass: the evaluate package's perplexity when present.

    With ``max_windows`` only that many 256-token windows are run and the time is scaled to the whole split (the
    evaluation is a loop of identical batches, so its time is linear in the number of windows)."""
    n_total = ids.numel() // 256
    scale = 1.0
    if max_windows is not None and max_windows < n_total:
        ids, scale = ids[: max_windows * 256], n_total / max_windows
    t0 = time.perf_counter()
    try:
        from quantpredict.evaluate import perplexity_of_ids

        nll = perplexity_of_ids(model, ids, seq_len=256, progress=False).nll
    except ImportError:  # a plain loop over non-overlapping 256-token windows
        n = (ids.numel() // 256) * 256
        windows = ids[:n].view(-1, 256)
        total = 0.0
        with torch.no_grad():
            for start in range(0, windows.shape[0], 8):
                w = windows[start : start + 8]
                logits = model(w, use_cache=False).logits[:, :-1]
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
        nll = total / (windows.shape[0] * 255)
    return (time.perf_counter() - t0) * scale, nll


def _predictor_groups(spec: str | None) -> tuple[str, ...]:
    from quantpredict.features.context import parse_which

    if spec:
        return parse_which(spec)
    from quantpredict.predict import DEFAULT_PREDICTOR_DIR, Predictor

    return tuple(Predictor.load(DEFAULT_PREDICTOR_DIR).required_groups)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated zoo names (default: all, largest first)")
    parser.add_argument("--recipe", default="mxint4-rtn", help="recipe label (default mxint4-rtn)")
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="stop starting new models after this")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="time only this many test windows and extrapolate to the whole split (busy machines)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="time each side this many times and keep the median (default 3)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave reports/benchmarks.md alone")
    parser.add_argument("--predictor-groups", default=None,
                        help="also time extract(which=these groups), the set a predictor computes (default: the "
                             "shipped default predictor's groups)")
    args = parser.parse_args(argv)
    pred_groups = _predictor_groups(args.predictor_groups)

    names = args.models.split(",") if args.models else list_zoo()
    if not names:
        print("no zoo models built (data/zoo is empty): run `quantpredict zoo build` first")
        return 1
    recipe = Recipe.from_label(args.recipe)
    loaded = []
    for name in names:
        # the model as a user loads it (SDPA attention for the evaluation; extract switches to eager where it
        # needs double backward and restores it)
        model, tok = load(name, dtype=torch.float32)
        loaded.append((arch.non_embedding_parameters(model), name, model, tok))
    loaded.sort(key=lambda t: -t[0])  # the target is about the largest models: measure them first

    token_cache: dict[tuple[str, str], torch.Tensor] = {}
    rows = []
    started = time.perf_counter()
    for n_params, name, model, tok in loaded:
        if rows and time.perf_counter() - started > 60 * args.budget_minutes:
            print(f"budget of {args.budget_minutes} min spent; skipping {name} and smaller")
            break
        key = _vocab_key(tok)
        for split in ("train", "test"):
            if (key, split) not in token_cache:
                token_cache[(key, split)] = token_ids(tok, "wikitext2", split)
        train, test = token_cache[(key, "train")], token_cache[(key, "test")]

        qmodel = copy.deepcopy(model)
        # RTN weights do not depend on calibration: skip the 128-window block pass (not timed either way)
        q_recipe = replace(recipe, calib_samples=8) if recipe.method == "rtn" and not recipe.smoothquant_alpha \
            else recipe
        quantize_model(qmodel, q_recipe, train, progress=False)
        # each side `repeat` times, interleaved so that load changes hit all three; the median of each
        evals, feat_times, pred_times, feat_runs = [], [], [], []
        for _ in range(max(1, args.repeat)):
            eval_s, nll_q = _evaluate(qmodel, test, args.eval_windows)
            evals.append(eval_s)
            t0 = time.perf_counter()
            feat_runs.append(extract(model, recipe, train, seed=0))
            feat_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            extract(model, recipe, train, seed=0, which=pred_groups)
            pred_times.append(time.perf_counter() - t0)
        eval_s, feat_s, pred_s = (statistics.median(x) for x in (evals, feat_times, pred_times))
        feats = feat_runs[feat_times.index(sorted(feat_times)[(len(feat_times) - 1) // 2])]
        shares = {g: feats[f"{g}_seconds"] / sum(feats[f"{h}_seconds"] for h in GROUPS) for g in GROUPS}
        rows.append(dict(name=name, params=n_params, tokens=test.numel(), eval_s=eval_s, feat_s=feat_s,
                         ratio=feat_s / eval_s, shares=shares, nll_q=nll_q, pred_s=pred_s, pred_ratio=pred_s / eval_s,
                         radial=feats["radial_dnll_100"], taylor=feats["taylor_dnll"]))
        print(f"{name:14s} {n_params / 1e6:6.2f}M  eval {eval_s:7.2f}s  features {feat_s:6.2f}s  "
              f"ratio {feat_s / eval_s:6.1%}  predictor's set {pred_s:6.2f}s ({pred_s / eval_s:.1%})  "
              + " ".join(f"{g}={s:.0%}" for g, s in shares.items()), flush=True)
        del qmodel

    largest = rows[0]
    verdict = "meets" if largest["ratio"] <= TARGET else "misses"
    pred_verdict = "meets" if largest["pred_ratio"] <= TARGET else "misses"
    header = ("| model | non-emb params | eval tokens | eval s | all features s | ratio | predictor's set s | ratio | "
              + " | ".join(GROUPS) + " |")
    lines = [
        "## features: cost of `features.extract` vs a full WikiText-2 test evaluation",
        "",
        stamp() + f" Load average at the end: {os.getloadavg()[0]:.1f} (both sides measured under the same load, "
        "interleaved per model).",
        "",
        f"Recipe `{recipe.label}`; features with default options (8 windows x 256 tokens of WikiText-2 train, "
        "curvature on 1 window: 4 Hutchinson probes, <= 8 power-iteration steps; 1 noise draw); evaluation = "
        "`evaluate.perplexity_of_ids` over the whole test split in 256-token windows, of the same model quantized by "
        "`quantize_model`" + (f" (timed on {args.eval_windows} windows, scaled to the split)" if args.eval_windows
                              else "") + ". "
        "Tokenization excluded from both. *All features*: every group; *predictor's set*: a separate "
        f"`extract(which={','.join(pred_groups)})`, the groups the shipped default predictor computes in "
        f"`predict_quality`. Each time is the median of {max(1, args.repeat)} runs of that side (the three sides "
        "interleaved). Group columns: share of the all-features time.",
        "",
        header,
        "|" + "---|" * (8 + len(GROUPS)),
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['tokens']:,} | {r['eval_s']:.2f} | "
                     f"{r['feat_s']:.2f} | {r['ratio']:.1%} | {r['pred_s']:.2f} | {r['pred_ratio']:.1%} | "
                     + " | ".join(f"{r['shares'][g]:.0%}" for g in GROUPS) + " |")
    lines += ["", f"Largest model ({largest['name']}): every feature group costs {largest['ratio']:.1%} of its "
              f"evaluation, which {verdict} the 10% target; the predictor's set costs {largest['pred_ratio']:.1%}, "
              f"which {pred_verdict} it."]
    text = "\n".join(lines)
    print()
    print(text)
    if not args.no_write:
        write_section("features", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
