"""How a model's weights-only prices move with the profile's token windows (the shipped profile keeps 2).

Measures a profile that keeps the per-token terms of 16 calibration windows (WikiText-2 train, 256 tokens, seed 0),
prices each recipe on every window alone, and prints the mean over the first 2 windows and over all 16 with the
windows' spread: whether more windows would move the prices (a bias) or only steady them (noise). Then, over all
the windows, the within-layer *full-window* estimate ``0.5 / T sum_w sum_l (sum_t v_lt)^2`` beside the token-wise
``0.5 / T sum_l sum_t v_lt^2`` (``v_lt = s_t^T dW_l x_t``): its ratio is what the cross-position terms of each
layer add (unbiased over the sampled labels, but one label per window: noisy per window). And the token-wise
estimate across layers, ``0.5 / T sum_t (sum_l v_lt)^2`` (each position's terms of all layers summed before
squaring: the cross-layer terms at one position), over the token-wise price.

    python benchmarks/token_windows_study.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import dataclasses
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", nargs="+", default=["q4_k_m", "q5_k_m", "q8_0-rtn", "mxint4-rtn", "int4-rtn",
                                                       "q3_k_m"])
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args(argv)
    import torch

    from quantpredict import arch, data, models
    from quantpredict.features.extract import feature_windows
    from quantpredict.features.fisher import measure_profile, price_deltas, profile_deltas
    from quantpredict.mixes import resolve_recipe
    from quantpredict.quantize import layer_plan

    torch.set_num_threads(1)
    model, tok = models.load(args.model, attn_implementation="eager")
    windows = feature_windows(model, data.token_stream(tok, "wikitext2", "train"), args.windows, 256, 0)
    seq = windows.shape[1]
    refs = arch.linear_layers(model)
    t = time.perf_counter()
    prof = measure_profile(model, windows, seed=0, token_windows=args.windows, kfac=False)
    print(f"profile of {args.windows} token windows: {time.perf_counter() - t:.0f} s", flush=True)
    for spec in args.recipes:
        recipe = resolve_recipe(spec, model)
        plan = {p.ref.name: (p.weight_format, p.block_size) for p in layer_plan(model, recipe)}
        deltas = profile_deltas(refs, [plan.get(r.name) for r in refs], recipe.method, prof)
        per = []
        for k in range(args.windows):
            one = dataclasses.replace(
                prof, token_inputs={n: v[k * seq:(k + 1) * seq] for n, v in prof.token_inputs.items()},
                token_grads={n: v[k * seq:(k + 1) * seq] for n, v in prof.token_grads.items()})
            per.append(price_deltas(one, [r.name for r in refs], deltas, kfac=False)["token_gn_quad"])
        p = torch.tensor(per, dtype=torch.float64)
        full = 0.0
        across = torch.zeros(args.windows * seq, dtype=torch.float64)
        for ref, d in zip(refs, deltas, strict=True):
            if d is not None:
                x, s = prof.token_inputs[ref.name].float(), prof.token_grads[ref.name].float()
                v = ((s @ d.float()) * x).sum(1).double()
                across += v
                full += float(v.reshape(args.windows, seq).sum(1).pow(2).sum())
        full = 0.5 * full / (args.windows * seq)
        layers = 0.5 * float(across.pow(2).sum()) / (args.windows * seq)
        print(f"{spec:12s} first 2: {float(p[:2].mean()):.5f}  all {args.windows}: {float(p.mean()):.5f}  "
              f"per-window sd/mean {float(p.std() / p.mean()):.2f}  full-window/token-wise "
              f"{full / float(p.mean()):.2f}  across-layers/token-wise {layers / float(p.mean()):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
