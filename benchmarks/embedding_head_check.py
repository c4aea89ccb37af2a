"""The embedding and head terms of the weights-only price, checked on a real model against measurement.

Each recipe here rounds the linear layers to bf16 (a tiny error of their own) and the token embedding and/or LM head
to a llama.cpp type (``E=`` / ``H=``), so the measured KLD is almost all the two matrices'. For each recipe the
script prints and writes (``reports/llamacpp.md``, section ``embedding-head:MODEL``):

- the measured KLD (``evaluate.compare``, the project's protocol: ``--windows`` windows of 256 tokens of WikiText-2
  test, every position after the first scored) with its SE;
- the price from the weights (``rank_recipes``: ``token_gn_quad`` and its ``embedding_quad`` / ``head_quad`` parts,
  the profile's two token windows of calibration text) and the shipped predictor's KLD with its 90% interval;
- the same recipe with the linear layers alone (no ``E=`` / ``H=``), measured and priced, for the bf16 floor.

Run it on a quiet core: ``python benchmarks/embedding_head_check.py --model smollm2-135m --windows 32``. The real
models were 4-bit on the way in (their GGUF packages): the FP model is that dequantized model.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import stamp, write_between  # noqa: E402

#: per model: the recipes (embedding/head types a llama.cpp file uses, on rows they tile)
RECIPES = {
    "smollm2-135m": ["bf16-rtn", "bf16-rtn-H=q8_0", "bf16-rtn-H=q5_0", "bf16-rtn-H=q4_0"],
    "qwen2.5-coder-1.5b": ["bf16-rtn", "bf16-rtn-H=q8_0", "bf16-rtn-H=q6_k", "bf16-rtn-E=q4_k",
                           "bf16-rtn-E=q4_k-H=q6_k", "bf16-rtn-H=q4_k"],
}


#: what a reader needs to know about a model's rows
NOTES = {
    "smollm2-135m": "SmolLM2 ties its head to the embedding (one matrix: both terms), and its package stored that "
                    "matrix in Q8_0, so rounding it to Q8_0 again changes nothing (the H=q8_0 row).",
}


def measure(model_name: str, recipes: list[str], windows: int) -> dict[str, tuple[float, float]]:
    """``{recipe: (KLD, SE)}`` measured against the FP model (one FP pass, cached in memory across recipes)."""
    import torch

    from quantpredict import data, evaluate, models, quantize
    from quantpredict.evaluate import FPLogitsCache
    from quantpredict.recipe import Recipe

    fp, tok = models.load(model_name, dtype=torch.float32, attn_implementation="eager")
    calib = data.token_stream(tok, "wikitext2", "train", protocol=data.eval_protocol(tok))
    out = {}
    cache = FPLogitsCache()
    try:
        for label in recipes:
            q = copy.deepcopy(fp)
            quantize.quantize_model(q, Recipe.from_label(label), calib, progress=False)
            c = evaluate.compare(fp, q, tok, seq_len=256, max_windows=windows, fp_cache=cache, fp_key=model_name,
                                 batch_size=4, progress=False)
            del q
            out[label] = (c.kld, c.kld_se)
            print(f"{label:28s} measured KLD {c.kld:.5f} ± {c.kld_se:.5f} ({c.eval_tokens} tokens, {c.seconds:.0f} s)",
                  flush=True)
    finally:
        cache.close()
    return out


def section(model_name: str, windows: int, measured: dict, priced) -> str:
    rows = ["| recipe | measured KLD | price `token_gn_quad` (embedding + head parts) | price / measured | "
            "predicted KLD [90%] | inside |", "|---|---|---|---|---|---|"]
    for label, (k, se) in measured.items():
        p = priced.loc[label]
        inside = p["kld_low"] <= k <= p["kld_high"]
        rows.append(f"| {label} | {k:.5f} ± {se:.5f} | {p['token_gn_quad']:.5f} ({p['embedding_quad']:.5f} + "
                    f"{p['head_quad']:.5f}) | {p['token_gn_quad'] / k:.2f} | {p['kld']:.5f} [{p['kld_low']:.5f}, "
                    f"{p['kld_high']:.5f}] | {'yes' if inside else 'no'} |")
    return "\n".join([
        f"### {model_name} (**4-bit on the way in**): the embedding and head terms against measurement", "",
        f"The linear layers in bf16, the token embedding and/or head in a llama.cpp type: the measured KLD is almost "
        f"all the two matrices'. Measured: {windows} windows of 256 tokens of WikiText-2 test (the project's "
        f"protocol). Priced from the weights (`quantpredict.features.embedding_head`): the head exactly in logit "
        f"space, the embedding token-wise from sampled-label gradients, on the profile's 2 calibration windows; "
        f"`token_gn_quad` is in nats and is the second-order KLD itself (its constant is 1 by construction). "
        f"The predicted KLD is the shipped profile predictor's, fitted without any E=/H= run. "
        f"`python benchmarks/embedding_head_check.py --model {model_name} --windows {windows}`. {stamp()}",
        *([""] + [NOTES[model_name]] if model_name in NOTES else []), "", *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--recipes", nargs="+", default=None, help="default: the model's list in RECIPES")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "llamacpp.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    from quantpredict.predict.rank import rank_recipes
    from quantpredict.threads import torch_threads

    recipes = args.recipes or RECIPES[args.model]
    t0 = time.perf_counter()
    with torch_threads(args.threads):
        priced = rank_recipes(args.model, recipes, progress=False).set_index("recipe")
        print(priced[["token_gn_quad", "embedding_quad", "head_quad", "kld", "kld_low", "kld_high"]].to_string(),
              flush=True)
        measured = measure(args.model, recipes, args.windows)
    md = section(args.model, args.windows, measured, priced)
    print(md)
    write_between(args.out, f"llamacpp:embedding-head:{args.model}", md)
    if args.json:
        args.json.write_text(json.dumps({"measured": measured, "priced": priced[[
            "token_gn_quad", "embedding_quad", "head_quad", "kld", "kld_low", "kld_high"]].to_dict("index"),
            "seconds": time.perf_counter() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
